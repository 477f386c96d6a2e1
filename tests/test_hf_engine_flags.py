"""The hf engine's own flags (``--hf-*``, plugins/backends/hf/options.py): parsed as the hf rollout
backend's, checked on the driver naming the flag, and reaching the engine that the rollout manager
builds (one in-process engine here; an engine pool gets the same options, ``from_placement``)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from plugrl.core.config import config_problems, parse_config  # noqa: E402
from plugrl.core.flags import ConfigError  # noqa: E402
from plugrl.core.plugin_config import PluginConfig  # noqa: E402
from plugrl.core.plugins import make_plugin_manager  # noqa: E402
from plugrl.core.rollout_manager import RolloutManager  # noqa: E402
from plugrl.plugins.backends.hf.engine import HFRolloutEngine  # noqa: E402
from plugrl.plugins.backends.hf.options import engine_options  # noqa: E402
from plugrl.plugins.backends.tiny_default import build_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def ps():
    return make_plugin_manager(entry_points=False)


def _config(ps, checkpoint, *flags):
    return parse_config(["--recipe", "tiny-default", "--hf-checkpoint", str(checkpoint), *flags], ps)


def _view(args):
    return PluginConfig.for_plugin(args, "rollout_backend", "hf")


def test_unset_flags_leave_the_engine_defaults(ps, checkpoint):
    assert engine_options(_view(_config(ps, checkpoint))) == {}


def test_each_flag_becomes_its_engine_option(ps, checkpoint):
    args = _config(ps, checkpoint, "--hf-decode-attention", "matmul", "--hf-compile-decode", "off",
                   "--hf-cuda-graphs", "off", "--hf-max-prefill-tokens", "512")
    assert engine_options(_view(args)) == {"decode_attention": "matmul", "compile_decode": False,
                                           "cuda_graphs": False, "max_prefill_tokens": 512}
    assert engine_options(_view(_config(ps, checkpoint, "--hf-compile-decode", "auto"))) == {"compile_decode": "auto"}
    assert engine_options(_view(_config(ps, checkpoint, "--hf-fast-decode", "off"))) == {"fast_decode": False}
    assert engine_options(_view(_config(ps, checkpoint, "--hf-kv-bucket", "64"))) == {"kv_bucket": 64}


def test_the_flags_are_the_hf_engines(ps, checkpoint):
    with pytest.raises(ConfigError, match="--hf-decode-attention belongs to the hf backend; drop it or use --rollout-backend hf"):
        _config(ps, checkpoint, "--rollout-backend", "sglang", "--hf-decode-attention", "matmul")


@pytest.mark.parametrize("flags, words", [
    (("--device", "cpu", "--hf-decode-attention", "flash"), ("--hf-decode-attention flash", "CUDA")),
    (("--device", "cpu", "--hf-cuda-graphs", "on"), ("--hf-cuda-graphs on", "--device cpu")),
    (("--hf-max-prefill-tokens", "0"), ("--hf-max-prefill-tokens 0", ">= 1")),
    (("--hf-kv-bucket", "0"), ("--hf-kv-bucket 0", ">= 1")),
    (("--hf-fast-decode", "off", "--hf-kv-bucket", "64"), ("--hf-kv-bucket", "--hf-fast-decode off")),
    (("--hf-fast-decode", "off", "--hf-decode-attention", "matmul"), ("--hf-decode-attention", "--hf-fast-decode off")),
])
def test_impossible_combinations_are_refused_on_the_driver(ps, checkpoint, flags, words):
    problems = [p for p in config_problems(_config(ps, checkpoint, *flags), ps) if "--hf-" in p]
    assert len(problems) == 1 and all(w in problems[0] for w in words), problems


def test_possible_combinations_pass_the_check(ps, checkpoint):
    args = _config(ps, checkpoint, "--device", "cpu", "--hf-decode-attention", "matmul", "--hf-compile-decode", "on",
                   "--hf-cuda-graphs", "off", "--hf-max-prefill-tokens", "64")
    assert [p for p in config_problems(args, ps) if "--hf-" in p] == []


def test_the_rollout_managers_engine_runs_with_the_flags(ps, checkpoint):
    args = _config(ps, checkpoint, "--hf-decode-attention", "matmul", "--hf-compile-decode", "on",
                   "--hf-max-prefill-tokens", "64", "--hf-kv-bucket", "32")
    manager = RolloutManager({**vars(args), "device": "cpu", "rollout_device": "cpu"})
    try:
        engine = manager.engine
        info = engine.decode_info()
        assert (info["decode_attention"], info["fused_ops"], engine.max_prefill_tokens) == ("matmul", "compiled", 64)
        assert engine._scheduler.fast.kv_block == 32
    finally:
        manager.engine.close()
    manager = RolloutManager({**vars(_config(ps, checkpoint, "--hf-fast-decode", "off")), "device": "cpu",
                              "rollout_device": "cpu"})
    try:
        assert manager.engine.decode_info() == {"decode_path": "hf (fast_decode=False)"}
    finally:
        manager.engine.close()


def test_options_given_by_name_win_over_the_flags(ps, checkpoint):
    args = _config(ps, checkpoint, "--hf-decode-attention", "matmul")
    engine = HFRolloutEngine(str(checkpoint), device="cpu", args=_view(args), decode_attention="sdpa")
    try:
        assert engine.decode_info()["decode_attention"] == "sdpa"
    finally:
        engine.close()


def test_more_than_one_gpu_per_hf_engine_is_refused(ps, checkpoint):
    """One hf engine runs on its bundle's first GPU: with 2 GPUs per engine, half the rollout GPUs idle."""
    args = _config(ps, checkpoint, "--rollout-num-gpus-per-engine", "2")
    problems = [p for p in config_problems(args, ps) if p.startswith("--rollout-num-gpus-per-engine")]
    assert problems == ["--rollout-num-gpus-per-engine 2: the hf engine runs on one GPU (no tensor parallelism); "
                        "pass --rollout-num-gpus-per-engine 1 for one engine per rollout GPU"]

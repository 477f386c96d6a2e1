"""What plugrl requires of SGLang (plugins/backends/sglang/compat.py) and the driver-side checks of
``--sglang-*`` flags: supported versions, group layout, colocation environment, FP8 scale format,
quantization of unquantized checkpoints, and the multi-node flags."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from plugrl.plugins.backends import sglang_options
from plugrl.plugins.backends.sglang import compat

from .test_sglang_source import sglang_root


class FakeServer:
    """An HTTP server answering ``routes[path] = (status, json body)`` for GET and POST."""

    def __init__(self, routes: dict):
        self.routes, self.seen = routes, []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                path = self.path.split("?")[0]
                fake.seen.append(path)
                status, body = fake.routes.get(path, (404, {"detail": "Not Found"}))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.addr = f"127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.http.shutdown()


@pytest.mark.parametrize("version", ["0.5.9", "0.5.15.post1", "0.5.23", "plugrl-hf"])
def test_supported_versions_pass(version):
    compat.check_version(version, "engine x")


@pytest.mark.parametrize("version", ["0.5.8", "0.4.10", "0.6.0", "0.6.0rc1", "0.6.0.dev20260101", "0.5.9rc1", "1.0",
                                     "garbage"])
def test_unsupported_versions_are_refused_naming_the_range_and_the_override(version, monkeypatch):
    monkeypatch.delenv(compat.ALLOW_UNSUPPORTED_ENV, raising=False)
    with pytest.raises(compat.UnsupportedSGLangError) as info:
        compat.check_version(version, "engine http://h:1")
    text = str(info.value)
    assert "engine http://h:1" in text and ">=0.5.9,<0.6" in text and "PLUGRL_SGLANG_ALLOW_UNSUPPORTED=1" in text
    monkeypatch.setenv(compat.ALLOW_UNSUPPORTED_ENV, "1")
    compat.check_version(version, "engine http://h:1")  # a warning only


def test_a_missing_sglang_package_is_named(monkeypatch):
    monkeypatch.setenv(compat.ALLOW_UNSUPPORTED_ENV, "1")  # no override makes a missing package run
    with pytest.raises(compat.UnsupportedSGLangError, match=r"the installed sglang package: the sglang package is "
                                                             r"not installed; install sglang >=0\.5\.9,<0\.6"):
        compat.check_version(None, "the installed sglang package")


def test_an_old_engine_is_refused_at_start(tmp_path, monkeypatch):
    """``/get_server_info`` of an external engine says 0.5.8 (no /v1/loads): the backend refuses it
    before starting the router."""
    from plugrl.plugins.backends.sglang.engine import SGLangRolloutBackend

    monkeypatch.delenv(compat.ALLOW_UNSUPPORTED_ENV, raising=False)
    engine = FakeServer({"/health_generate": (200, {}), "/get_server_info": (200, {"version": "0.5.8", "tp_size": 1})})
    try:
        started = time.monotonic()
        with pytest.raises(compat.UnsupportedSGLangError, match=r"runs SGLang '0\.5\.8'.*>=0\.5\.9,<0\.6"):
            SGLangRolloutBackend(str(tmp_path), external_engine_addrs=[engine.addr], weight_transport="distributed",
                                 startup_timeout=20)
        assert time.monotonic() - started < 15
        assert "/workers" not in engine.seen  # no router was asked to route to it
    finally:
        engine.close()


def test_group_layout_counts_every_tp_rank():
    assert compat.group_layout([1, 1, 1]) == (4, [1, 2, 3])
    assert compat.group_layout([2, 1]) == (4, [1, 3])
    assert compat.group_layout([4, 4]) == (9, [1, 5])
    with pytest.raises(ValueError, match="tp_size 0"):
        compat.group_layout([2, 0])


def test_colocation_environment():
    base = {"PATH": "/bin", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
            "SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK": "true"}
    env = compat.colocation_env(base, {"SGLANG_DISABLE_TP_MEMORY_INBALANCE_CHECK": "false"})
    assert "PYTORCH_CUDA_ALLOC_CONF" not in env and env["PATH"] == "/bin"
    assert env["SGLANG_MEMORY_SAVER_CUDA_GRAPH"] == "true"
    assert env["SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK"] == "true"  # the launcher's own choice is kept
    assert env["SGLANG_DISABLE_TP_MEMORY_INBALANCE_CHECK"] == "false"  # engine_env wins


def test_colocation_variables_are_sglangs():
    """Every variable plugrl sets is read by the installed SGLang (environ.py)."""
    root = sglang_root()
    if root is None:
        pytest.skip("SGLang's source is not installed")
    environ = (root / "srt" / "environ.py").read_text()
    for name in [*compat.COLOCATION_ENV, "SGLANG_ENABLE_JIT_DEEPGEMM"]:
        if name in compat.OLDER_COLOCATION_ENV:  # the older spelling of a variable: gone in newer releases
            continue
        assert f"{name} = Env" in environ, name
    constants = (root / "srt" / "constants.py").read_text()
    for tag in compat.MEMORY_TAGS:
        assert f'= "{tag}"' in constants, tag
    assert "disable_prefill_cuda_graph" in compat.installed_server_fields()


def test_cuda_graph_bs_goes_by_the_installed_servers_name():
    assert compat.cuda_graph_bs_field(frozenset({"cuda_graph_bs", "tp_size"})) == "cuda_graph_bs"  # 0.5.9
    # 0.5.15.post1 on: split per phase; from 0.5.20 "--cuda-graph-bs" is an ambiguous prefix that kills the server
    assert compat.cuda_graph_bs_field(frozenset({"cuda_graph_bs_decode", "cuda_graph_bs_prefill"})) == \
        "cuda_graph_bs_decode"
    assert compat.cuda_graph_bs_field(frozenset()) == "cuda_graph_bs"  # no sglang here: the flag as given


def test_ue8m0_engines_are_the_sm100_ones_with_jit_deepgemm():
    caps = [(9, 0), (10, 0), (12, 0), None, (10, 3)]
    assert compat.ue8m0_engines(caps, {}) == [1, 4]  # Hopper, sm_120 and unknown GPUs keep float32 scales
    assert compat.ue8m0_engines(caps, {"SGLANG_ENABLE_JIT_DEEPGEMM": "0"}) == []
    assert compat.ue8m0_engines(caps, {"SGLANG_ENABLE_JIT_DEEPGEMM": "true"}) == [1, 4]


def _checkpoint(tmp_path, quant: dict | None) -> str:
    config = {"model_type": "qwen3", "torch_dtype": "bfloat16"}
    if quant:
        config["quantization_config"] = quant
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_quantizing_an_unquantized_checkpoint_is_refused(tmp_path):
    args = SimpleNamespace(hf_checkpoint=_checkpoint(tmp_path, None), sglang_passthrough={"quantization": "fp8"})
    (problem,) = sglang_options.backend_problems(args)
    assert "--sglang-quantization fp8" in problem and "no quantization_config" in problem and "Drop the flag" in problem
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    args.hf_checkpoint = _checkpoint(tmp_path, fp8)
    assert sglang_options.backend_problems(args) == []  # an FP8 checkpoint served as FP8: plugrl pushes FP8
    args.sglang_passthrough = {"quantization": "w8a8_int8"}
    (problem,) = sglang_options.backend_problems(args)
    assert "a fp8 quantization_config" in problem
    args.sglang_passthrough = {}
    assert sglang_options.backend_problems(args) == []


def test_multi_node_and_port_flags_are_refused_with_true_reasons():
    reserved = sglang_options.RESERVED_SERVER_FLAGS
    for flag in ("dist-init-addr", "nnodes", "node-rank"):
        assert "--rollout-external-engine-addrs" in reserved[flag] and "one node" in reserved[flag]
    assert "free port per engine" in reserved["nccl-port"]
    from plugrl.plugins.backends.sglang import launch

    values = launch.server_args(model_path="m", host="h", port=1, tp_size=1, base_gpu_id=0, seed=0,
                                memory_saver=True, device=None, nccl_port=7, defaults={"disable_prefill_cuda_graph": True},
                                overrides={"disable_prefill_cuda_graph": False})
    assert values["nccl_port"] == 7 and values["disable_prefill_cuda_graph"] is False  # the user's override wins


def test_fp8_pushes_to_blackwell_engines_are_refused(monkeypatch):
    """Engine GPUs (physical ids from the placement) of compute capability 10.x with JIT DeepGEMM on
    would misread float32 scales: the backend refuses at start, naming the variable that avoids it."""
    from plugrl.plugins.backends.sglang import engine as sglang_engine

    monkeypatch.delenv("SGLANG_ENABLE_JIT_DEEPGEMM", raising=False)
    monkeypatch.setattr(sglang_engine, "_compute_caps", lambda: {0: (9, 0), 1: (9, 0), 2: (10, 0), 3: (10, 0)})
    backend = SimpleNamespace(_options={"engine_gpu_ids": [[0, 1], [2, 3]]}, device=None, _external_urls=lambda: [])
    with pytest.raises(RuntimeError, match=r"engines \[1\] run on sm_100.*SGLANG_ENABLE_JIT_DEEPGEMM=0"):
        sglang_engine.SGLangRolloutBackend._check_fp8_scales(backend)
    backend._options["engine_env"] = {"SGLANG_ENABLE_JIT_DEEPGEMM": "0"}
    sglang_engine.SGLangRolloutBackend._check_fp8_scales(backend)  # DeepGEMM off: float32 scales are read as such
    backend._options = {"engine_gpu_ids": [[0, 1]]}
    sglang_engine.SGLangRolloutBackend._check_fp8_scales(backend)  # Hopper

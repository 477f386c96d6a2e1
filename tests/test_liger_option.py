"""``--liger-kernels auto|on|off`` (the torch backend's flag, plugins/backends/torch/liger.py): the
driver refuses ``on`` where it cannot apply (no liger-kernel, ``--device cpu``) naming the flag; in the
actor ``auto`` applies the kernels only on CUDA with Liger installed and the architecture known to it,
and ``on`` is an error where ``auto`` would skip. (Liger's Triton kernels need CUDA: that they give
transformers' numbers is tests/test_torch_backend_gpu.py.)"""

import pytest

from plugrl.core.config import config_problems, parse_config
from plugrl.core.flags import ConfigError
from plugrl.plugins.backends.torch import liger
from plugrl.plugins.backends.torch.trainer import TorchTrainBackend
from plugrl.plugins.estimators.grpo import GRPOEstimator

from .test_config import base, files, ps  # noqa: F401  (fixtures)
from .test_torch_trainer import checkpoint, make_args  # noqa: F401  (fixture)


@pytest.fixture
def liger_absent(monkeypatch):
    monkeypatch.setattr(liger, "installed", lambda: False)


@pytest.fixture
def liger_present(monkeypatch):
    monkeypatch.setattr(liger, "installed", lambda: True)
    monkeypatch.setattr(liger, "supported_model_types", lambda: frozenset({"qwen3", "llama"}))


def _problems(ps, base, *flags):  # noqa: F811
    return [p for p in config_problems(parse_config(base + list(flags), ps), ps) if "liger" in p]


def test_default_and_off_are_no_problem_anywhere(ps, base, liger_absent):  # noqa: F811
    assert _problems(ps, base) == []
    assert _problems(ps, base, "--liger-kernels", "off", "--device", "cpu") == []
    assert _problems(ps, base, "--liger-kernels", "auto", "--device", "cpu") == []


def test_on_without_the_package_is_refused_on_the_driver(ps, base, liger_absent):  # noqa: F811
    (problem,) = _problems(ps, base, "--liger-kernels", "on")
    assert "--liger-kernels on" in problem and "pip install liger-kernel" in problem


def test_on_with_device_cpu_is_refused_on_the_driver(ps, base, liger_present):  # noqa: F811
    (problem,) = _problems(ps, base, "--liger-kernels", "on", "--device", "cpu")
    assert "--device cpu" in problem and "--liger-kernels auto or off" in problem


def test_the_flag_is_the_torch_backends(ps, base):  # noqa: F811
    with pytest.raises(ConfigError, match="--liger-kernels belongs to the torch backend"):
        parse_config(base + ["--train-backend", "megatron", "--liger-kernels", "off"], ps)


@pytest.mark.parametrize(
    "mode, device, model_type, expected",
    [
        ("auto", "cpu", "qwen3", (False, "auto: the device is cpu, Liger needs CUDA")),
        ("auto", "cuda", "qwen3", (True, "auto (cuda)")),
        ("auto", "cuda", "gpt2", (False, "auto: Liger has no kernels for model type 'gpt2'")),
        ("off", "cuda", "qwen3", (False, "--liger-kernels off")),
        ("on", "cuda", "llama", (True, "on (cuda)")),
        (None, "cuda", "qwen3", (True, "auto (cuda)")),
    ],
)
def test_choice_in_the_actor(liger_present, mode, device, model_type, expected):
    assert liger.choose(mode, device, model_type) == expected


def test_auto_without_the_package_on_cuda_skips(liger_absent):
    assert liger.choose("auto", "cuda", "qwen3") == (False, "auto: liger-kernel is not installed")


@pytest.mark.parametrize("device, model_type", [("cpu", "qwen3"), ("cuda", "gpt2")])
def test_on_where_auto_would_skip_is_an_error(liger_present, device, model_type):
    with pytest.raises(ValueError, match="--liger-kernels on: .*use --liger-kernels auto or off"):
        liger.choose("on", device, model_type)


def test_the_backend_on_cpu_keeps_its_own_kernels_and_refuses_on(checkpoint, liger_present):  # noqa: F811
    assert TorchTrainBackend(make_args(checkpoint), estimator=GRPOEstimator(None)).liger_kernels == []
    with pytest.raises(ValueError, match="--liger-kernels on: the device is cpu"):
        TorchTrainBackend(make_args(checkpoint, liger_kernels="on"), estimator=GRPOEstimator(None))

"""``--log-prob-grad-cache auto|off|GiB`` (the torch backend's flag, plugins/backends/torch/options.py):
the driver refuses a value that is not one naming the flag; the budget the backend hands the fused
log-probs per train call: a given size as bytes, 'off' none, 'auto' none on CPU or with an entropy
gradient (whatever the size given), and on CUDA at most 4 GiB and half the free memory (tests/test_fused_log_probs.py checks what
the budget buys; the CUDA 'auto' runs in the GPU tests of the torch backend)."""

import pytest
import torch

from plugrl.core.config import config_problems, parse_config
from plugrl.plugins.backends.torch import options

from .test_config import base, files, ps  # noqa: F401  (fixtures)


def _problems(ps, base, *flags):  # noqa: F811
    return [p for p in config_problems(parse_config(base + list(flags), ps), ps) if "grad-cache" in p]


@pytest.mark.parametrize("value", ["auto", "off", "0", "2.5", "AUTO"])
def test_good_values_are_no_problem(ps, base, value):  # noqa: F811
    assert _problems(ps, base, "--log-prob-grad-cache", value) == []


@pytest.mark.parametrize("value", ["lots", "-1", "nan", "inf", "2GiB"])
def test_a_bad_value_is_refused_on_the_driver_naming_the_flag(ps, base, value):  # noqa: F811
    problems = _problems(ps, base, "--log-prob-grad-cache", value)
    assert len(problems) == 1 and "--log-prob-grad-cache" in problems[0] and "GiB" in problems[0]


def test_the_budget_per_train_call():
    cpu = torch.device("cpu")
    assert options.grad_cache_bytes("2.5", cpu, 0.0) == int(2.5 * 2**30)
    assert options.grad_cache_bytes("1", cpu, 0.01) == 0  # an entropy gradient would leave a kept basis unused
    assert options.grad_cache_bytes("off", cpu, 0.0) == 0
    assert options.grad_cache_bytes(None, cpu, 0.0) == options.grad_cache_bytes("auto", cpu, 0.0) == 0


def test_auto_on_cuda_takes_half_the_free_memory_up_to_the_cap(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (6 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 2 * 2**30)
    assert options.grad_cache_bytes("auto", cuda, 0.0) == int(3.5 * 2**30)  # (6 free + 1 spare) / 2
    assert options.grad_cache_bytes("auto", cuda, 0.01) == 0  # the entropy gradient recomputes every column
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (60 * 2**30, 80 * 2**30))
    assert options.grad_cache_bytes("auto", cuda, 0.0) == int(options.AUTO_GRAD_CACHE_GIB * 2**30)

"""Train precision and packed attention chosen on the driver (core/precision.py): bf16 on CUDA, fp32 on
CPU, flags win, refused combinations never reach a train actor; fp32 on CUDA never meets the flash
kernel (it takes 16-bit inputs only)."""

from types import SimpleNamespace

import pytest
import torch

from plugrl.core import precision
from plugrl.core.config import ConfigError, check_config, parse_config
from plugrl.core.plugins import make_plugin_manager
from plugrl.core.precision import precision_problems, resolve_precision


def ns(**values):
    return SimpleNamespace(**{"bf16": None, "fp32": False, "train_backend": "torch", "device": "auto", **values})


@pytest.mark.parametrize("flags,device,dtype,chosen_by", [
    ({}, "cuda", "bf16", "auto (cuda)"),
    ({}, "cpu", "fp32", "auto (cpu)"),
    ({"fp32": True}, "cuda", "fp32", "--fp32"),
    ({"bf16": True}, "cpu", "bf16", "--bf16"),
    ({"bf16": False}, "cuda", "fp32", "--no-bf16"),
])
def test_dtype_by_device_and_flags(flags, device, dtype, chosen_by):
    chosen = resolve_precision(ns(**flags), device)
    assert (chosen.dtype, chosen.chosen_by) == (dtype, chosen_by)


@pytest.mark.parametrize("device,dtype,varlen,expected", [
    ("cuda", "bf16", True, "varlen"),
    ("cuda", "fp32", True, "sdpa"),  # the flash kernel raises on fp32 inputs
    ("cuda", "bf16", False, "sdpa"),  # torch without torch.nn.attention.varlen
    ("cpu", "bf16", True, "sdpa"),
])
def test_attention_follows_device_and_dtype(monkeypatch, device, dtype, varlen, expected):
    monkeypatch.setattr(precision, "varlen_available", lambda: varlen)
    assert precision.packed_attention_for(device, dtype) == expected


def test_backends_pick_sdpa_for_fp32_tensors_on_cuda(monkeypatch):
    from plugrl.plugins.backends import packed_attention

    monkeypatch.setattr(precision, "varlen_available", lambda: True)
    assert packed_attention.default_implementation("cuda", torch.float32) == "sdpa"
    assert packed_attention.default_implementation("cuda", torch.bfloat16) == "varlen"
    assert packed_attention.default_implementation("cpu", torch.bfloat16) == "sdpa"


def test_description_names_the_override():
    line = resolve_precision(ns(), "cuda").describe()
    assert "bf16" in line and "--fp32" in line
    assert "overrides" not in resolve_precision(ns(fp32=True), "cuda").describe()


def test_refused_combinations_name_the_flags():
    assert any("--bf16 and --fp32" in p for p in precision_problems(ns(bf16=True, fp32=True)))
    assert any("--fp32 with --train-backend megatron" in p for p in precision_problems(ns(fp32=True, train_backend="megatron")))
    assert any("--no-bf16" in p for p in precision_problems(ns(bf16=False, train_backend="megatron")))
    assert not precision_problems(ns(fp32=True, train_backend="megatron", device="cpu"))  # megatron on CPU is fp32
    assert not precision_problems(ns(fp32=True))


def test_driver_refuses_both_flags_before_anything_starts(tmp_path):
    ps = make_plugin_manager(entry_points=False)
    args = parse_config(["--bf16", "--fp32", "--rollout-batch-size", "2"], ps)
    with pytest.raises(ConfigError, match="--bf16 and --fp32"):
        check_config(args, ps)
    assert parse_config([], ps).bf16 is None  # neither flag: decided per device

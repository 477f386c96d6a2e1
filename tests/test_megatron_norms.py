"""FP32RMSNorm (the megatron layer spec's norm) computes exactly what HF's Qwen3RMSNorm computes, in
bf16 and fp32, forward and backward (the rollout engine's numerics; a gap shows as a train/rollout
log-prob mismatch)."""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core not installed (plugrl[megatron])")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp32_rms_norm_equals_hf_qwen3(dtype):
    from plugrl.plugins.backends.megatron.norms import FP32RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    config = SimpleNamespace(normalization="RMSNorm", params_dtype=dtype, use_cpu_initialization=True,
                             sequence_parallel=True)
    ours, hf = FP32RMSNorm(config, 256, eps=1e-6), Qwen3RMSNorm(256, eps=1e-6).to(dtype)
    gen = torch.Generator().manual_seed(0)
    weight = (1 + 0.1 * torch.randn(256, generator=gen)).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(weight)
        hf.weight.copy_(weight)
    assert ours.weight.sequence_parallel  # megatron sums this grad over TP under sequence parallelism
    x = (3 * torch.randn(8, 5, 256, generator=gen)).to(dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = ours(x1), hf(x2)
    assert out.dtype == expected.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    upstream = torch.randn(out.shape, generator=gen).to(dtype)
    out.backward(upstream)
    expected.backward(upstream)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.weight.grad, hf.weight.grad, rtol=1e-5, atol=1e-5)


def test_other_normalizations_are_refused():
    from plugrl.plugins.backends.megatron.norms import FP32RMSNorm

    config = SimpleNamespace(normalization="LayerNorm", params_dtype=torch.float32, use_cpu_initialization=True,
                             sequence_parallel=False)
    with pytest.raises(ValueError, match="RMSNorm"):
        FP32RMSNorm(config, 16)

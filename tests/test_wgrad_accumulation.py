"""The megatron backend's weight-gradient GEMMs that accumulate into the fp32 gradient buffer
(``plugins/backends/megatron/wgrad_accumulation.py``): the sum against an fp64 reference, in place,
and installed into megatron-core's linear layers only where apex is absent and torch can do it.
The fp32 kernel (bf16 inputs, fp32 output) exists on CUDA only; the train step with the fusion on
against the same step with it off is in tests/test_megatron_gpu.py."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from plugrl.plugins.backends.megatron import wgrad_accumulation  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def operands(device: str, tokens: int = 300, out: int = 96, inp: int = 80, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    total_input = torch.randn(tokens, inp, generator=gen).to(device, torch.bfloat16)
    grad_output = torch.randn(tokens, out, generator=gen).to(device, torch.bfloat16)
    main_grad = torch.randn(out, inp, generator=gen).to(device)
    return total_input, grad_output, main_grad


def reference(total_input, grad_output, main_grad) -> torch.Tensor:
    """main_grad + grad_output^T @ total_input in fp64 from the same (bf16-valued) operands."""
    return main_grad.double() + grad_output.double().t() @ total_input.double()


@pytest.mark.gpu
@cuda
def test_fp32_accumulation_in_place_equals_the_fp64_sum():
    total_input, grad_output, main_grad = operands("cuda")
    expected = main_grad.double()
    storage = main_grad.data_ptr()
    for _ in range(3):  # three micro-batches into one buffer
        wgrad_accumulation.wgrad_gemm_accum_fp32(total_input, grad_output, main_grad)
        expected = reference(total_input, grad_output, expected)
    assert main_grad.dtype == torch.float32 and main_grad.data_ptr() == storage
    # fp32 accumulation: far tighter than one bf16 rounding of the gradient (~4e-3)
    torch.testing.assert_close(main_grad.double(), expected, rtol=1e-5, atol=1e-4)


def test_half_precision_buffer_accumulates_in_its_own_dtype():
    total_input, grad_output, main_grad = operands("cpu")
    main_grad = main_grad.to(torch.bfloat16)
    expected = reference(total_input, grad_output, main_grad)
    wgrad_accumulation.wgrad_gemm_accum_fp16(total_input, grad_output, main_grad)
    assert main_grad.dtype == torch.bfloat16
    torch.testing.assert_close(main_grad.double(), expected, rtol=2e-2, atol=0.5)


def test_installed_only_where_apex_is_absent_and_torch_can(monkeypatch):
    from megatron.core.tensor_parallel import layers

    monkeypatch.setattr(layers, "_grad_accum_fusion_available", False)
    monkeypatch.delattr(layers, "fused_weight_gradient_mlp_cuda", raising=False)
    monkeypatch.setattr(wgrad_accumulation, "supported", lambda: False)
    assert wgrad_accumulation.install() is False
    assert not hasattr(layers, "fused_weight_gradient_mlp_cuda") and layers._grad_accum_fusion_available is False

    monkeypatch.setattr(wgrad_accumulation, "supported", lambda: True)
    assert wgrad_accumulation.install() is True
    assert layers.fused_weight_gradient_mlp_cuda is wgrad_accumulation and layers._grad_accum_fusion_available

    apex = object()  # an extension already importable stays in place
    monkeypatch.setattr(layers, "fused_weight_gradient_mlp_cuda", apex)
    assert wgrad_accumulation.install() is True and layers.fused_weight_gradient_mlp_cuda is apex


def test_supported_needs_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert wgrad_accumulation.supported() is False

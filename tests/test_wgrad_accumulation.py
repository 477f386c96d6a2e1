"""The megatron backend's weight-gradient GEMMs that accumulate into megatron's gradient buffer
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


def test_fp32_inputs_accumulate_in_place():
    total_input, grad_output, main_grad = operands("cpu")
    total_input, grad_output = total_input.float(), grad_output.float()
    expected = reference(total_input, grad_output, main_grad)
    wgrad_accumulation.wgrad_gemm_accum_fp32(total_input, grad_output, main_grad)
    torch.testing.assert_close(main_grad.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")
def test_megatron_step_with_the_fusion_equals_the_step_without(tmp_path, monkeypatch):
    """megatron-core's own wiring, on CPU (fp32 model and buffer): with the fusion on, every linear
    weight's gradient goes through these kernels once per micro-batch and megatron's DDP hook adds no
    .grad for them; the step's gradients equal the unfused step's, the tied embedding's included (the
    output layer accumulates into it and its lookup gradient must still be added). The fusion is a
    CUDA default; here it is switched on by hand, and megatron's dummy weight-grad is put on the CPU."""
    from megatron.core import parallel_state
    from plugrl.plugins.backends.megatron import backend as megatron_backend
    from plugrl.plugins.backends.tiny_default import build_tiny_checkpoint

    from .megatron_ranks import make_args, megatron, train_data

    checkpoint = str(build_tiny_checkpoint(tmp_path / "tiny"))
    monkeypatch.setattr(wgrad_accumulation, "supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    calls = []
    real = wgrad_accumulation.wgrad_gemm_accum_fp32
    monkeypatch.setattr(wgrad_accumulation, "wgrad_gemm_accum_fp32",
                        lambda *operands: (calls.append(operands[2].shape), real(*operands)))
    from megatron.core.tensor_parallel import layers

    monkeypatch.setattr(layers, "_grad_accum_fusion_available", False)  # restored after the test
    monkeypatch.setattr(layers, "fused_weight_gradient_mlp_cuda", None, raising=False)
    seqs = [[5 + (i * 7 + j) % 50 for j in range(30 + 3 * i)] for i in range(6)]
    data = train_data(seqs, [12] * 6, [1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    gradients = []
    try:
        for fused in (True, False):
            monkeypatch.setattr(megatron_backend.MegatronTrainBackend, "_choose_wgrad_accumulation_fusion",
                                lambda self, fused=fused: fused and wgrad_accumulation.install())
            backend = megatron(make_args(checkpoint, device="cpu", max_tokens_per_gpu=64, clip_grad=1e9))
            assert backend.wgrad_accumulation_fusion is fused
            backend.train(0, data)
            gradients.append({name: p.main_grad.clone() for name, p in backend.model.named_parameters()})
            if fused:
                layers_count = backend.cfg.num_layers
                assert backend.progress[1] >= 3
                assert len(calls) == (4 * layers_count + 1) * backend.progress[1]  # qkv, proj, fc1, fc2; output
    finally:
        parallel_state.destroy_model_parallel()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    with_fusion, without = gradients
    assert with_fusion.keys() == without.keys() and "embedding.word_embeddings.weight" in with_fusion
    for name in with_fusion:
        torch.testing.assert_close(with_fusion[name], without[name], rtol=1e-5, atol=1e-7, msg=name)

"""The varlen flash path of ``packed_attention.attention_within_segments`` with grouped K/V (as Qwen3
has: 4 query heads per KV head) against an fp32 reference: HF's ``repeat_kv`` then causal SDPA per
packed sample. Forward and the gradients of Q, K and V, so the unexpanded K/V and the kernel's summing
of each group's K/V gradients are both checked. Runs on CUDA only (the flash kernel)."""

import itertools

import pytest
import torch

from plugrl.plugins.backends.packed_attention import attention_within_segments

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _reference(q, k, v, cu_seqlens, scale):
    """fp32, K/V repeated per query head (HF's ``repeat_kv`` layout: query head j reads KV head j // groups)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = torch.empty_like(q)
    for start, end in itertools.pairwise(cu_seqlens.tolist()):
        s = slice(start, end)
        o = torch.nn.functional.scaled_dot_product_attention(
            q[s].transpose(0, 1), k[s].transpose(0, 1), v[s].transpose(0, 1), is_causal=True, scale=scale)
        out[s] = o.transpose(0, 1)
    return out


@pytest.mark.parametrize(("heads", "kv_heads"), [(32, 8), (32, 2), (8, 8)])  # Qwen3-4B's 4 groups, 16, none
def test_varlen_with_grouped_kv_equals_repeated_reference(heads, kv_heads):
    gen = torch.Generator(device="cuda").manual_seed(0)
    lengths = [37, 128, 5, 300]
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], device="cuda")
    t, dim = sum(lengths), 128
    scale = dim ** -0.5

    def rand(h):
        return torch.randn(t, h, dim, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()

    q, k, v = rand(heads), rand(kv_heads), rand(kv_heads)
    grad_out = torch.randn(t, heads, dim, device="cuda", generator=gen, dtype=torch.bfloat16)

    out = attention_within_segments(q, k, v, cu_seqlens, max(lengths), scale=scale, implementation="varlen")
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    out.backward(grad_out)

    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = _reference(*ref_in, cu_seqlens, scale)
    ref.backward(grad_out.float())

    # bf16 inputs and outputs, fp32 accumulation in the kernel: errors of a few bf16 ulps of O(1) values
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    for name, got, want in zip("qkv", (q.grad, k.grad, v.grad), (x.grad for x in ref_in)):
        assert got.shape == want.shape, name
        # K/V gradients sum over a group of query heads: allow for the larger magnitudes
        torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=5e-2, msg=lambda m: f"d{name}: {m}")


def test_the_hf_attention_function_copies_nothing_in_its_backward():
    """HF hands the attention function ``[1, heads, t, d]`` transposed views of the projections'
    ``[1, t, heads, d]`` outputs; the function takes them to ``[t, heads, d]`` as views, and its backward
    must hand the gradients back the same way: no copy kernels (a ``select`` there wrote each gradient
    into a zero-filled tensor with a strided copy, and RoPE's and the V projection's backward then
    copied it back: 6 copies a layer at the 4B shape)."""
    from torch.profiler import ProfilerActivity, profile

    from plugrl.plugins.backends.hf.packed_attention import packed_attention_forward

    gen = torch.Generator(device="cuda").manual_seed(1)
    lengths, heads, kv_heads, dim = [100, 28], 32, 8, 128
    t = sum(lengths)
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], device="cuda", dtype=torch.int32)

    def projected(h):  # as Qwen3's attention makes them: proj(x).view(1, t, h, d).transpose(1, 2)
        flat = torch.randn(1, t, h * dim, device="cuda", generator=gen, dtype=torch.bfloat16, requires_grad=True)
        return flat, flat.view(1, t, h, dim).transpose(1, 2)

    def backward_copies(out) -> list[str]:
        grad_out = torch.randn(out.shape, device="cuda", generator=gen, dtype=torch.bfloat16)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out.backward(grad_out)
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if "copy_kernel" in e.name or "Memcpy DtoD" in e.name]

    (q_in, q), (k_in, k), (v_in, v) = projected(heads), projected(kv_heads), projected(kv_heads)
    out, _ = packed_attention_forward(None, q, k, v, None, cu_seq_lens_q=cu_seqlens, max_length_q=max(lengths))
    assert out.shape == (1, t, heads, dim)
    ours = backward_copies(out)
    # the flash kernel alone on [t, heads, d] tensors: whatever copies it makes itself are not the wrapper's
    alone = [torch.randn(t, h, dim, device="cuda", generator=gen, dtype=torch.bfloat16, requires_grad=True)
             for h in (heads, kv_heads, kv_heads)]
    kernel_own = backward_copies(attention_within_segments(*alone, cu_seqlens, max(lengths), scale=dim ** -0.5,
                                                           implementation="varlen"))
    assert len(ours) == len(kernel_own), (ours, kernel_own)
    assert all(x.grad is not None and x.grad.is_contiguous() for x in (q_in, k_in, v_in))

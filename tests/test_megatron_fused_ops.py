"""The fused elementwise parts of the megatron layer spec (``fused_ops``): plain versions against
megatron-core's own RoPE, and the torch.compile'd versions (what CUDA runs)
against the plain ones, forward and backward. Compiled here on CPU (inductor's C++ backend): the
same graphs inductor lowers to Triton on GPUs; the GPU tests run the Triton kernels."""

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core not installed (plugrl[megatron])")


def _angles(t: int, rot: int, gen) -> torch.Tensor:
    positions = torch.randint(0, 64, (t,), generator=gen).float()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    freqs = positions[:, None] * inv_freq[None]
    return torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [t, 1, rot]


@pytest.mark.parametrize("rot", [16, 8])  # full head dim, and --rotary-percent 0.5
def test_rotate_equals_megatron_rope(rot):
    from megatron.core.models.common.embeddings.rope_utils import (
        _apply_rotary_pos_emb_bshd,
    )
    from plugrl.plugins.backends.megatron.fused_ops import rotate

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, 16, generator=gen)
    angles = _angles(12, rot, gen)
    expected = _apply_rotary_pos_emb_bshd(x[:, None], angles[:, None], rotary_interleaved=False)[:, 0]
    torch.testing.assert_close(rotate(x, angles.cos(), angles.sin()), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["rms_norm_fp32", "rotate"])
def test_compiled_equals_plain_forward_and_backward(name):
    from plugrl.plugins.backends.megatron import fused_ops

    fn = getattr(fused_ops, name)
    compiled = fused_ops.dispatcher(fn)
    gen = torch.Generator().manual_seed(2)

    def inputs(t):
        if name == "rms_norm_fp32":
            x = (3 * torch.randn(t, 64, generator=gen)).to(torch.bfloat16)
            return [x, (1 + 0.1 * torch.randn(64, generator=gen)).to(torch.bfloat16).requires_grad_()], (1e-6,)
        angles = _angles(t, 16, gen)
        x = torch.randn(t, 2, 16, generator=gen).to(torch.bfloat16)
        return [x, angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)], ()

    for t in (24, 40, 17):  # the pack length changes between calls (recompiled once with a symbolic length)
        tensors, extra = inputs(t)
        plain_in = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in tensors]
        fused_in = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in tensors]
        plain, fused = fn(*plain_in, *extra), compiled(*fused_in, *extra)
        assert fused.shape == plain.shape and fused.dtype == plain.dtype
        # bf16 results: the compiled kernel rounds once, eager after every op (a few bf16 ulps apart)
        torch.testing.assert_close(fused.float(), plain.float(), rtol=2e-2, atol=2e-2)
        upstream = torch.randn(plain.shape, generator=gen).to(plain.dtype)
        plain.backward(upstream)
        fused.backward(upstream)
        for a, b in zip(fused_in, plain_in):
            torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=3e-2, atol=3e-2)


def test_fused_compiles_only_on_cuda():
    from plugrl.plugins.backends.megatron.fused_ops import fused, rotate

    assert fused(rotate, torch.zeros(1), True) is rotate  # CPU tensors run the plain version
    assert fused(rotate, torch.zeros(1), False) is rotate


def test_a_failing_compiler_turns_fusion_off(monkeypatch):
    """check_compiler (run by the backend before building a model on CUDA) compiles a probe; when
    torch.compile fails, every later fused() call returns the plain function."""
    from plugrl.plugins.backends.megatron import fused_ops

    class FakeCuda:  # fused() asks only .is_cuda
        is_cuda = True

    monkeypatch.setattr(fused_ops, "_compiler_problem", None)
    monkeypatch.setattr(fused_ops, "_compiler_checked", set())
    assert fused_ops.check_compiler("cpu") is None  # inductor's CPU backend compiles the probe here
    FakeCuda.shape = (7, 4, 16)
    compiled = fused_ops.fused(fused_ops.rotate, FakeCuda(), True)
    assert compiled is not fused_ops.rotate
    FakeCuda.shape = (9, 2, 16)  # every call of one function goes through the same dispatcher
    assert fused_ops.fused(fused_ops.rotate, FakeCuda(), True) is compiled

    def broken_compile(fn, **_kwargs):
        def run(*args):
            raise RuntimeError("InductorError: no C compiler found\nmore detail")
        return run

    monkeypatch.setattr(fused_ops.torch, "compile", broken_compile)
    assert fused_ops.check_compiler("cpu") is None  # probed once per process and device type
    fused_ops._compiler_checked.clear()
    assert fused_ops.check_compiler("cpu") == "RuntimeError: InductorError: no C compiler found"
    assert fused_ops.fused(fused_ops.rotate, FakeCuda(), True) is fused_ops.rotate


def test_call_variants_never_reach_the_recompile_limit(monkeypatch):
    """The norm sees many argument signatures (rank, heads, grad mode, contiguity) and a pack length
    that changes every step. One compiled function for all of them recompiled past dynamo's limit
    within a step (GPU run of the 4B recipe; every later call ran unfused). With a limit of 2 here,
    the same sequence of calls must raise through a single torch.compile and pass through
    ``dispatcher`` (each signature its own code object: static length, then symbolic)."""
    import torch._dynamo
    from plugrl.plugins.backends.megatron import fused_ops

    monkeypatch.setattr(fused_ops, "_BACKEND", "eager")
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    torch._dynamo.reset()
    weight = torch.ones(16)

    def calls(norm):
        for t in (5, 7, 11, 13):  # the pack length of successive steps
            x = torch.randn(t, 16)
            norm(x, weight, 1e-6)  # [T, hidden]
            norm(torch.randn(t, 3, 16), weight, 1e-6)  # [T, heads, dim]
            norm(torch.randn(t, 1, 16).transpose(0, 1), weight, 1e-6)  # [1, T, hidden] view (non-contiguous)
            with torch.no_grad():
                norm(x, weight, 1e-6)

    calls(fused_ops.dispatcher(fused_ops.rms_norm_fp32))  # passes
    torch._dynamo.reset()
    shared = torch.compile(fused_ops.rms_norm_fp32, backend="eager")
    with pytest.raises(Exception, match="recompile_limit|cache_size_limit|recompil"):
        calls(shared)

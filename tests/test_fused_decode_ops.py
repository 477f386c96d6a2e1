"""The ``hf`` engine's fused decode ops (``plugins/backends/hf/fused_decode_ops.py``): the fast path's
forward with its norms, RoPE, residual adds and SiLU fused gives the logits of the same forward
calling the HF modules, eagerly (exactly) and compiled (inductor's C++ backend here, Triton on
CUDA), from a bounded number of graphs over many batch and prompt shapes; models whose modules the
ops do not reproduce keep the module calls; a failed compile falls back to eager once, loudly."""

from __future__ import annotations

import asyncio
import logging

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM  # noqa: E402

from plugrl.plugins.backends.compile_guard import CompileGroup  # noqa: E402
from plugrl.plugins.backends.hf.decode_forward import LlamaLikeForward  # noqa: E402
from plugrl.plugins.backends.hf.engine import HFRolloutEngine  # noqa: E402
from plugrl.plugins.backends.hf.fused_decode_ops import fused_ops_reason  # noqa: E402
from plugrl.plugins.backends.hf.kv_cache import SlotKVCache  # noqa: E402
from plugrl.plugins.backends.torch.tiny_default import build_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("fused") / "tiny", initializer_range=0.3)


def forward_outputs(model, mode: str, device: str = "cpu") -> list[torch.Tensor]:
    """Logits of two packed prefills (2 and 3 prompts) and decode steps at batches 1..16 over
    a fresh cache, with the module calls (``modules``) or the fused ops (``eager`` / ``compiled``)."""
    forward = LlamaLikeForward(model, "sdpa", compiled_ops=mode == "compiled")
    if mode == "modules":
        forward.ops = None
    else:
        assert forward.ops is not None, forward.fused_reason
    cache = SlotKVCache(len(forward.layers), forward.kv_heads, forward.head_dim, forward.dtype, torch.device(device))
    cache.ensure(16, 256)
    arange = torch.arange(512, device=device)
    gen = torch.Generator().manual_seed(0)
    outputs = []
    with torch.inference_mode():
        for lengths in ((12, 8), (5, 9, 3)):
            total = sum(lengths)
            ids = torch.randint(10, 300, (total,), generator=gen)
            positions = torch.cat([torch.arange(n) for n in lengths])
            slots = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
            cu = torch.tensor([0] + [sum(lengths[: i + 1]) for i in range(len(lengths))])
            ids, positions, slots, cu = (t.to(device) for t in (ids, positions, slots, cu))
            outputs.append(forward.prefill(ids, positions, slots, cu, max(lengths), cu[1:] - 1, cache))
        for batch in (2, 4, 8, 16, 3, 1):
            tokens = torch.randint(10, 300, (batch,), generator=gen)
            positions = torch.randint(12, 40, (batch,), generator=gen)
            outputs.append(forward.decode(tokens.to(device), positions.to(device), cache, 256 if batch != 3 else 64,
                                          arange))
    return outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ops_eager_equal_the_module_calls_exactly(ckpt, dtype):
    """Same arithmetic in the same order as HF's RMSNorm, rotate-half RoPE, residual and MLP."""
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype).eval()
    for got, want in zip(forward_outputs(model, "eager"), forward_outputs(model, "modules"), strict=True):
        assert torch.equal(got, want)


def test_compiled_fused_ops_match_the_module_calls_from_few_graphs(ckpt):
    """Compiled: bf16 outputs equal the module calls exactly (the fused kernels round to bf16 where eager
    does), fp32 within 1e-5 (summation order); 2 prompt sets and 5 decode batches compile each of the 4
    functions into at most 3 graphs at these sizes (dynamo specialises size-1 dims: prefill's [1, T, ...],
    decode's [B, 1, ...] and decode at batch 1), below its recompile limit of 8. (A first call whose size
    equals a head count can add a graph by dynamo's duck sizing; 5 were seen at the 0.6B shape.)"""
    from torch._dynamo.utils import counters

    from plugrl.plugins.backends.hf import fused_decode_ops

    counters.clear()
    for dtype in (torch.bfloat16, torch.float32):
        model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype).eval()
        compiled, modules = forward_outputs(model, "compiled"), forward_outputs(model, "modules")
        assert not fused_decode_ops.GROUP.failed, fused_decode_ops.GROUP.failed
        for got, want in zip(compiled, modules, strict=True):
            if dtype == torch.bfloat16:
                assert torch.equal(got, want)
            else:
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # per dtype at most 3 graphs for each of the 4 functions (two dtypes: 24)
    assert 8 <= counters["stats"]["unique_graphs"] <= 24, dict(counters["stats"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_fused_ops_on_cuda_match_the_module_calls(ckpt):
    """Triton's fused kernels in fp32 (no TF32): within 1e-4 of the module calls (reduction order only)."""
    from plugrl.plugins.backends.hf import fused_decode_ops

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).cuda().eval()
    compiled, modules = forward_outputs(model, "compiled", "cuda"), forward_outputs(model, "modules", "cuda")
    assert not fused_decode_ops.GROUP.failed, fused_decode_ops.GROUP.failed
    for got, want in zip(compiled, modules, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_models_the_ops_do_not_reproduce_keep_the_module_calls(ckpt):
    model = AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    layer = model.model.layers[1]
    layer.post_attention_layernorm = torch.nn.LayerNorm(model.config.hidden_size)
    assert fused_ops_reason(model) == "norm LayerNorm"
    forward = LlamaLikeForward(model, "sdpa", compiled_ops=True)
    assert forward.ops is None and not forward.compiled_ops


def test_a_failed_compile_falls_back_to_eager_once_and_says_so(caplog):
    group = CompileGroup("test: compiling the probe", "option probe=False skips the attempt")

    def needs_a_graph_break(x):
        if x.sum().item() > 0:  # data-dependent control flow: fullgraph=True refuses to compile it
            return x + 1
        return x - 1

    fn = group.compile(needs_a_graph_break, fullgraph=True)
    with caplog.at_level(logging.WARNING):
        assert fn(torch.ones(3)).tolist() == [2.0, 2.0, 2.0]
        assert fn(-torch.ones(3)).tolist() == [-2.0, -2.0, -2.0]
    assert len(group.failed) == 1
    warnings = [r.getMessage() for r in caplog.records if "compiling the probe" in r.getMessage()]
    assert len(warnings) == 1 and "option probe=False skips the attempt" in warnings[0]

    def out_of_memory(x):
        raise torch.OutOfMemoryError("no memory")

    with pytest.raises(torch.OutOfMemoryError):
        CompileGroup("oom", "-").compile(out_of_memory)(torch.ones(1))


def test_the_callers_errors_are_raised_and_do_not_stop_compiling():
    """A call that fails eagerly too (shapes that do not multiply) raises eager's error; the group has not
    failed, and the next good call still runs the compiled function."""
    group = CompileGroup("test: compiling matmul", "-")
    compiled_calls = []

    def counting_backend(graph_module, example_inputs):
        compiled_calls.append(len(example_inputs))
        return graph_module.forward

    fn = group.compile(torch.matmul, backend=counting_backend, dynamic=False)
    with pytest.raises(RuntimeError, match="cannot be multiplied|size mismatch|shapes"):
        fn(torch.ones(2, 3), torch.ones(2, 3))
    assert group.failed == []
    before = len(compiled_calls)
    assert fn(torch.ones(2, 3), torch.ones(3, 4)).tolist() == [[3.0] * 4] * 2
    assert group.failed == [] and len(compiled_calls) > before  # it compiled (and ran) the good call


def test_a_backend_that_raises_is_a_compile_failure():
    group = CompileGroup("test: compiling add", "-")

    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("inductor could not lower this graph")

    fn = group.compile(lambda x: x + 1, backend=broken_backend)
    assert fn(torch.zeros(2)).tolist() == [1.0, 1.0]
    assert len(group.failed) == 1 and "could not lower" in group.failed[0]


def test_engine_option_compile_decode(ckpt):
    """compile_decode=True on CPU: the engine's greedy tokens equal the uncompiled engine's; auto is off
    on CPU; a wrong value is refused naming the option."""
    def greedy(engine):
        async def main():
            return await asyncio.gather(*[engine.generate([10 + i, 20 + 2 * i, 30], {"max_new_tokens": 12, "temperature": 0,
                                                                                  "ignore_eos": True})
                                          for i in range(5)])
        try:
            return [out["tokens"] for out in asyncio.run(main())], engine.decode_info()
        finally:
            engine.close()

    compiled, info = greedy(HFRolloutEngine(str(ckpt), device="cpu", seed=0, compile_decode=True))
    assert info["fused_ops"] == "compiled" and info["compile_error"] is None
    plain, info = greedy(HFRolloutEngine(str(ckpt), device="cpu", seed=0))
    assert info["fused_ops"] == "eager"
    assert compiled == plain
    with pytest.raises(ValueError, match="compile_decode"):
        HFRolloutEngine(str(ckpt), device="cpu", compile_decode="yes")

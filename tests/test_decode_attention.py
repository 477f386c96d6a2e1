"""The fast decode path's attention implementations and the slot KV cache's two layouts, against a
per-row fp64 reference (softmax over each row's own positions, K/V heads repeated for GQA).

CPU: ``sdpa`` and ``matmul`` over both cache layouts in fp32; the cache keeps what was written when it
grows, in both layouts. GPU (``-m gpu``): all three, ``flash`` included, in bf16."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from plugrl.plugins.backends.hf.decode_attention import (  # noqa: E402
    IMPLEMENTATIONS,
    LAYOUT,
    StepInputs,
    attend,
    unavailable_reason,
)
from plugrl.plugins.backends.hf.kv_cache import SlotKVCache  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 8, 2, 16


def filled_cache(layout, slots, length, device, dtype, seed=0):
    """A one-layer cache whose every (slot, position) holds random K/V, written through ``write``;
    returns the cache and the same K/V as fp64 ``[slots, length, kv_heads, D]`` tensors."""
    gen = torch.Generator().manual_seed(seed)
    cache = SlotKVCache(1, KV_HEADS, HEAD_DIM, dtype, torch.device(device), layout=layout)
    cache.ensure(slots, length)
    k = torch.randn(slots, length, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    v = torch.randn(slots, length, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    s, p = torch.meshgrid(torch.arange(slots), torch.arange(length), indexing="ij")
    cache.write(0, s.reshape(-1).to(device), p.reshape(-1).to(device), k.reshape(-1, KV_HEADS, HEAD_DIM).to(device),
                v.reshape(-1, KV_HEADS, HEAD_DIM).to(device))
    return cache, k.double(), v.double()


def reference(q, k, v, positions, scale):
    """Row r attends over positions 0..positions[r] of slot r; fp64."""
    groups = HEADS // KV_HEADS
    out = []
    for r, pos in enumerate(positions.tolist()):
        keys = k[r, : pos + 1].repeat_interleave(groups, dim=1)  # [n, heads, D]
        values = v[r, : pos + 1].repeat_interleave(groups, dim=1)
        weights = torch.einsum("hd,nhd->hn", q[r].double(), keys).mul(scale).softmax(dim=-1)
        out.append(torch.einsum("hn,nhd->hd", weights, values))
    return torch.stack(out)


def run_case(name, layout, device, dtype, *, slots=6, length=40, kv_len=32, rows=5):
    cache, k, v = filled_cache(layout, slots, length, device, dtype)
    gen = torch.Generator().manual_seed(1)
    positions = torch.tensor([0, 31, 7, 19, 1][:rows])  # row lengths 1..32, all within kv_len
    q = torch.randn(rows, HEADS, HEAD_DIM, generator=gen).to(dtype)
    arange = torch.arange(max(slots + 1, length), device=device)
    scale = HEAD_DIM ** -0.5
    step = StepInputs(name, positions.to(device), kv_len, arange, cache.length)
    got = attend(name, q.to(device), cache, 0, step, scale)
    assert got.shape == (rows, HEADS, HEAD_DIM) and got.dtype == dtype
    return got.double().cpu(), reference(q, k, v, positions, scale)


@pytest.mark.parametrize("layout", SlotKVCache.LAYOUTS)
@pytest.mark.parametrize("name", ["sdpa", "matmul"])
def test_attention_equals_the_per_row_reference_on_cpu(name, layout):
    got, expected = run_case(name, layout, "cpu", torch.float32)
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("layout", SlotKVCache.LAYOUTS)
def test_cache_keeps_what_was_written_when_it_grows(layout):
    cache, k, v = filled_cache(layout, 3, 10, "cpu", torch.float32)
    cache.ensure(5, 24)  # more slots and a longer context at once
    assert (cache.slots, cache.length) == (5, 24)
    keys, values = cache.rows(0, 5, 24)  # [slots, kv_heads, length, D]
    assert torch.equal(keys[:3, :, :10].transpose(1, 2).double(), k)
    assert torch.equal(values[:3, :, :10].transpose(1, 2).double(), v)
    assert not keys[3:].any() and not keys[:, :, 10:].any()  # new room is zeros (masked positions meet 0, not NaN)
    expected_shape = (5, 24, KV_HEADS, HEAD_DIM) if layout == "token" else (5, KV_HEADS, 24, HEAD_DIM)
    assert cache.keys[0].shape == expected_shape


def test_flash_inputs_select_each_rows_own_keys():
    """What the flash kernel is given, checked without it: row r's keys are the flattened token-major
    cache's entries ``cu_seq_k[r] .. cu_seq_k[r] + seqused_k[r]``; attending over exactly those (fp64,
    here) is the per-row reference."""
    cache, k, v = filled_cache("token", 6, 40, "cpu", torch.float32)
    positions = torch.tensor([0, 31, 7, 19, 1])
    step = StepInputs("flash", positions, 32, torch.arange(41), cache.length)
    assert step.cu_seq_q.tolist() == list(range(6)) and step.cu_seq_q.dtype == torch.int32
    assert step.seqused_k.dtype == step.cu_seq_k.dtype == torch.int32
    flat_k, flat_v = cache.keys[0].view(-1, KV_HEADS, HEAD_DIM), cache.values[0].view(-1, KV_HEADS, HEAD_DIM)
    q = torch.randn(5, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    groups = HEADS // KV_HEADS
    for r in range(5):
        start, used = int(step.cu_seq_k[r]), int(step.seqused_k[r])
        keys = flat_k[start: start + used].double().repeat_interleave(groups, dim=1)
        values = flat_v[start: start + used].double().repeat_interleave(groups, dim=1)
        weights = torch.einsum("hd,nhd->hn", q[r].double(), keys).mul(HEAD_DIM ** -0.5).softmax(dim=-1)
        got = torch.einsum("hn,nhd->hd", weights, values)
        assert torch.allclose(got, reference(q[r: r + 1], k[r: r + 1], v[r: r + 1], positions[r: r + 1],
                                             HEAD_DIM ** -0.5)[0], atol=1e-6)


def test_flash_is_refused_where_it_cannot_run():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert "needs CUDA" in unavailable_reason("flash", cpu, torch.bfloat16, 128)
    assert "bf16 or fp16" in unavailable_reason("flash", cuda, torch.float32, 128)
    assert "multiple of 8" in unavailable_reason("flash", cuda, torch.bfloat16, 12)
    assert "unknown decode attention" in unavailable_reason("paged", cpu, torch.float32, 128)
    assert all(unavailable_reason(n, cpu, torch.float32, 128) is None for n in ("sdpa", "matmul"))
    assert set(LAYOUT) == set(IMPLEMENTATIONS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_attention_equals_the_per_row_reference_on_cuda_bf16(name):
    """bf16 inputs, fp32 softmax inside each kernel (matmul: bf16 scores, like HF's eager attention):
    outputs are convex combinations of values of magnitude ~1-3, so 2e-2 is a few bf16 ulps at most;
    a wrong mask or row offset misses by ~0.5."""
    reason = unavailable_reason(name, torch.device("cuda"), torch.bfloat16, HEAD_DIM)
    assert reason is None, reason  # the GPU machine's torch must offer every implementation
    got, expected = run_case(name, LAYOUT[name], "cuda", torch.bfloat16)
    assert (got - expected).abs().max().item() < 2e-2

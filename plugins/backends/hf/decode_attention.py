"""Attention of one decode step over the slot KV cache (engine decode thread; inside CUDA graphs).

Every row ``r`` of the batch has one new query token and attends over cache positions
``0..positions[r]`` of its own slot (its new K/V already written there). Three implementations of
that one function, chosen by the engine option ``decode_attention``; each needs a cache layout
(``kv_cache.py``) and all are free of host synchronisation, so a step can be captured:

* ``sdpa`` (default): ``scaled_dot_product_attention`` with a boolean ``[B, 1, 1, kv_len]`` mask.
  GQA without repeating K/V: the query heads that share one KV head become that head's "query
  positions" (``[B, kv_heads, groups, D]``), so each cached K/V is read once. On CUDA it runs the
  memory-efficient kernel, whose query tiles (64 rows) hold only ``groups`` rows here.
* ``matmul``: two batched GEMMs (``[B x kv_heads]`` batches of ``groups x kv_len``) around an fp32
  softmax with an additive mask built once per step: reads each K/V once, no query tiles; scores are
  rounded to the cache dtype before the softmax, as HF's eager attention does.
* ``flash``: varlen flash attention (``aten._flash_attention_forward``, the kernel behind
  ``torch.nn.attention.varlen``) over the token-major cache with per-row lengths ``seqused_k``: no
  mask, no positions past a row's length read. CUDA and 16-bit only. The op is private to torch;
  its schema (with ``seqused_k``) has been stable since torch 2.5, and ``unavailable_reason`` checks it.

``benchmarks/hf_engine_throughput.py --decode-attention sdpa,matmul,flash`` times them in one run.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

IMPLEMENTATIONS = ("sdpa", "matmul", "flash")
LAYOUT = {"sdpa": "head", "matmul": "head", "flash": "token"}  # the cache layout each one reads without copies


@cache
def _flash_op_has_seqused_k() -> bool:
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    return op is not None and "seqused_k" in str(op.default._schema)


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """``None`` when ``name`` can run for this engine, else why not (the engine refuses the option)."""
    if name not in IMPLEMENTATIONS:
        return f"unknown decode attention {name!r}; one of {', '.join(IMPLEMENTATIONS)}"
    if name != "flash":
        return None
    if device.type != "cuda":
        return f"decode_attention='flash' needs CUDA (this engine runs on {device.type}); use 'sdpa' or 'matmul'"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"decode_attention='flash' needs bf16 or fp16 weights (this engine runs {dtype}); use 'sdpa' or 'matmul'"
    if head_dim % 8 or head_dim > 256:
        return f"decode_attention='flash' needs a head dim that is a multiple of 8 and <= 256, got {head_dim}"
    if not torch.backends.cuda.is_flash_attention_available():
        return f"this torch build ({torch.__version__}) has no flash attention kernels; use 'sdpa' or 'matmul'"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "decode_attention='flash' needs a GPU of compute capability 8.0 or newer; use 'sdpa' or 'matmul'"
    if not _flash_op_has_seqused_k():
        return f"torch {torch.__version__} has no aten._flash_attention_forward with seqused_k; use 'sdpa'"
    return None


class StepInputs:
    """What one decode step's attention needs besides Q/K/V, built once per step (not per layer)."""

    def __init__(self, name: str, positions: torch.Tensor, kv_len: int, arange: torch.Tensor, cache_length: int):
        b = positions.shape[0]
        self.kv_len = kv_len
        if name == "flash":
            # Row r's keys start at r * cache_length in the flattened [slots * length] token axis.
            self.cu_seq_q = arange[: b + 1].to(torch.int32)
            self.cu_seq_k = (arange[: b + 1] * cache_length).to(torch.int32)
            self.seqused_k = (positions + 1).to(torch.int32)
        else:  # [B, 1, 1, kv_len]: row r sees cache positions 0..positions[r]
            self.mask = (arange[:kv_len][None] <= positions[:, None])[:, None, None]
            if name == "matmul":  # 0 where seen, -inf elsewhere, added to the fp32 scores
                self.bias = torch.zeros(self.mask.shape, dtype=torch.float32, device=positions.device).masked_fill_(
                    ~self.mask, float("-inf"))


def attend(name: str, q: torch.Tensor, cache, layer: int, step: StepInputs, scale: float) -> torch.Tensor:
    """``q [B, heads, D]`` (RoPE applied) -> ``[B, heads, D]`` over rows ``0..B-1`` of ``cache``'s ``layer``."""
    b, heads, d = q.shape
    kv_heads = cache.kv_heads
    if name == "flash":
        keys, values = cache.keys[layer], cache.values[layer]
        out = torch.ops.aten._flash_attention_forward(
            q, keys.view(-1, kv_heads, d), values.view(-1, kv_heads, d), step.cu_seq_q, step.cu_seq_k,
            1, step.kv_len, 0.0, False, False, scale=scale, seqused_k=step.seqused_k)[0]
        return out
    k, v = cache.rows(layer, b, step.kv_len)  # [B, kv_heads, kv_len, D]
    q = q.view(b, kv_heads, heads // kv_heads, d)
    if name == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask, scale=scale)
    elif name == "matmul":
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale + step.bias  # [B, kv_heads, groups, kv_len]
        weights = scores.softmax(dim=-1).to(v.dtype)
        out = torch.matmul(weights, v)
    else:
        raise ValueError(f"unknown decode attention {name!r}; one of {', '.join(IMPLEMENTATIONS)}")
    return out.reshape(b, heads, d)

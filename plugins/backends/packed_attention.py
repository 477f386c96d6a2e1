"""Causal attention within the samples of a packed row (THD: ``[tokens, heads, dim]`` + cu_seqlens).

Shared by both train backends: the megatron core attention (``megatron/attention.py``) and the torch
backend's HF attention function (``hf/packed_attention.py``). Implementations:

* ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (flash attention over cu_seqlens), CUDA only;
* ``sdpa``: ``scaled_dot_product_attention`` once per packed segment (any device, the CPU path).

No token attends across segments. Imports nothing beyond torch.
"""

from __future__ import annotations

import inspect
import itertools
from functools import cache

import torch

from plugrl.core.precision import packed_attention_for, varlen_available  # noqa: F401 - re-exported

IMPLEMENTATIONS = ("varlen", "sdpa")


_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def default_implementation(device_type: str, dtype: torch.dtype) -> str:
    """``varlen`` for 16-bit inputs on CUDA (the flash kernel refuses fp32), else ``sdpa``."""
    return packed_attention_for(device_type, _DTYPE_NAMES.get(dtype, str(dtype)))


@cache
def varlen_has_gqa() -> bool:
    from torch.nn.attention.varlen import varlen_attn

    # torch 2.11's varlen_attn lacks enable_gqa; newer versions take it.
    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def _flash_varlen_gqa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_seqlen: int, scale: float) -> torch.Tensor:
    """Causal varlen flash attention with K/V of fewer heads than Q, for torches whose ``varlen_attn``
    has no ``enable_gqa``: the aten flash op under it takes grouped K/V as they are (its backward sums
    each group's K/V gradients), so K and V are not repeated per query head, which would cost a copy of
    4x their size forward and a reduction backward in every layer."""
    out = torch.ops.aten._flash_attention_forward(query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                                  0.0, True, False, scale=scale)
    return out[0]


def attention_within_segments(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                              max_seqlen: int, *, scale: float, implementation: str,
                              dropout: float = 0.0) -> torch.Tensor:
    """``query [t, hq, d]``, ``key/value [t, hkv, d]`` (``hq`` a multiple of ``hkv``) -> ``[t, hq, d]``.
    Grouped K/V go to the kernels as they are (no per-query-head copies)."""
    groups = query.shape[1] // key.shape[1]
    if implementation == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        if dropout:
            raise ValueError("attention dropout must be 0 with the varlen (flash) attention")
        cu = cu_seqlens.to(torch.int32)
        if groups > 1 and not varlen_has_gqa():
            return _flash_varlen_gqa(query, key, value, cu, max_seqlen, scale)
        kwargs = {"enable_gqa": True} if groups > 1 else {}
        return varlen_attn(query, key, value, cu, cu, max_seqlen, max_seqlen, scale=scale, window_size=(-1, 0),
                           **kwargs)
    if implementation != "sdpa":
        raise ValueError(f"unknown packed attention implementation {implementation!r}; one of {IMPLEMENTATIONS}")
    out = torch.empty_like(query)
    for start, end in itertools.pairwise(cu_seqlens.tolist()):
        if end <= start:
            continue
        # [t, h, d] -> [1, h, t, d] for SDPA
        q = query[start:end].transpose(0, 1)[None]
        k = key[start:end].transpose(0, 1)[None]
        v = value[start:end].transpose(0, 1)[None]
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout,
                                                             enable_gqa=groups > 1)
        out[start:end] = o.squeeze(0).transpose(0, 1)  # squeeze: a view backward (o[0]'s would copy)
    return out

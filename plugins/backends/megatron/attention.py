"""Core attention for megatron-core's local layer spec that understands packed (THD) micro-batches.

megatron-core's own local ``DotProductAttention`` materialises the s x s scores and refuses packed
sequences; Transformer Engine (which packs) is not installed on our GPU machines. This module takes
its place in the spec (same constructor and forward signature), applies the pack's RoPE, and runs
``packed_attention.attention_within_segments``: varlen flash attention on CUDA, SDPA per sample
elsewhere.

Built inside the train actor when the model is constructed; the choice is ``--attention-backend``
(``flash`` -> varlen, ``unfused``/``local`` -> sdpa, ``auto``/unset -> varlen on CUDA, else sdpa).
No token attends across segments: segments are the samples packed by the backend (and one padding
segment at the end when the pack is padded to a multiple of TP).
"""

from __future__ import annotations

import math

import torch
from megatron.core.transformer.module import MegatronModule
from plugrl.plugins.backends.packed_attention import (
    IMPLEMENTATIONS,
    attention_within_segments,
    default_implementation,
    varlen_available,
)


def choose_implementation(attention_backend: str | None, device_type: str, dtype: torch.dtype) -> str:
    """``--attention-backend`` value -> implementation name (validated on the driver too)."""
    if attention_backend in (None, "auto"):
        return default_implementation(device_type, dtype)
    if attention_backend == "flash":
        if device_type != "cuda" or not varlen_available():
            raise ValueError("--attention-backend flash needs CUDA and torch.nn.attention.varlen (torch >= 2.10)")
        return "varlen"
    if attention_backend in ("unfused", "local"):
        return "sdpa"
    raise ValueError(f"--attention-backend {attention_backend!r}: plugrl's megatron backend runs flash (varlen), "
                     "unfused/local (SDPA per sample) or auto; 'fused' needs Transformer Engine")


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, *, scale: float, implementation: str, dropout: float = 0.0,
                     rope: tuple[torch.Tensor, torch.Tensor] | None = None, fuse_rope: bool = False) -> torch.Tensor:
    """Causal attention within segments (``packed_attention.attention_within_segments``). ``query [t,
    hq, d]``, ``key/value [t, hkv, d]`` -> ``[t, hq, d]``. With ``rope = (cos, sin)`` (``[t, 1, d]``), q and
    k are rotated first (``fused_ops.rotate``; compiled into one kernel each with ``fuse_rope`` on CUDA).
    Grouped K/V reach the attention kernel unexpanded."""
    from .fused_ops import fused, rotate

    if dropout and implementation == "varlen":
        raise ValueError("--attention-dropout must be 0 with the varlen (flash) attention")
    if rope is not None:
        query = fused(rotate, query, fuse_rope)(query, *rope)
        key = fused(rotate, key, fuse_rope)(key, *rope)
    return attention_within_segments(query, key, value, cu_seqlens, max_seqlen, scale=scale,
                                     implementation=implementation, dropout=dropout)


_NO_TABLES = ("this model's RoPE comes from the pack (rotary.install): run it through the backend's logits(), "
              "which passes SegmentedPackParams with the per-token cos/sin tables")


class PackedCoreAttention(MegatronModule):
    """Drop-in for megatron-core's ``DotProductAttention`` in the local spec (self-attention, causal).

    Called by ``SelfAttention.forward`` in every layer: with ``packed_seq_params`` (THD) it receives
    ``[t, heads, dim]`` tensors and returns ``[t, heads * dim]``; without, ``[s, b, heads, dim]`` ->
    ``[s, b, heads * dim]`` (one causal sequence per batch row)."""

    implementation: str = "sdpa"  # set per spec (``local_spec_with_packed_attention``)
    fuse_rope: bool = False  # compile RoPE on CUDA; set per spec
    rope_from_pack: bool = False  # set by rotary.install: RoPE is this module's, from the pack's tables

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, **_unused):
        super().__init__(config=config)
        if getattr(config, "context_parallel_size", 1) != 1:
            raise ValueError("--context-parallel-size > 1 is not supported by plugrl's PyTorch core attention")
        self.layer_number = layer_number
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **_unused):
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by plugrl's PyTorch core attention")
        dropout = self.dropout if self.training else 0.0
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            # plugrl's packs carry the boundaries in ``segments`` (see rotary.py); megatron's own in cu_seqlens_q
            segments = getattr(packed_seq_params, "segments", None)
            if segments is None:
                segments, longest = packed_seq_params.cu_seqlens_q, packed_seq_params.max_seqlen_q
            else:
                longest = packed_seq_params.max_segment
            rope = getattr(packed_seq_params, "rope", None)
            if self.rope_from_pack and rope is None:
                raise ValueError(_NO_TABLES)
            out = packed_attention(query, key, value, segments, int(longest), scale=self.scale,
                                   implementation=self.implementation, dropout=dropout, rope=rope,
                                   fuse_rope=self.fuse_rope)
            return out.reshape(out.shape[0], -1)
        if self.rope_from_pack:
            raise ValueError(_NO_TABLES)
        # [s, b, h, d] -> [b, h, s, d] (megatron applied RoPE: no per-token rotary installed)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.scale, dropout_p=dropout, enable_gqa=q.shape[1] != k.shape[1])
        return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)


def local_spec_with_packed_attention(qk_layernorm: bool, normalization: str, implementation: str, num_layers: int,
                                     *, fuse_rope: bool = False, fuse_rmsnorm: bool = False):
    """megatron-core's local GPT spec with ``PackedCoreAttention`` as core attention and fp32-compute
    RMSNorms (``norms.FP32RMSNorm``) everywhere, as block submodules (the final norm included).
    ``fuse_rope``/``fuse_rmsnorm``: compile those parts on CUDA (``fused_ops``)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from .norms import FP32RMSNorm

    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown packed attention implementation {implementation!r}; one of {IMPLEMENTATIONS}")
    spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization=normalization)
    attention_cls = type(f"PackedCoreAttention_{implementation}", (PackedCoreAttention,),
                         {"implementation": implementation, "fuse_rope": fuse_rope})
    norm_cls = type("FusedFP32RMSNorm", (FP32RMSNorm,), {"fused": True}) if fuse_rmsnorm else FP32RMSNorm
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = attention_cls
    if qk_layernorm:
        attention.q_layernorm = attention.k_layernorm = norm_cls
    spec.submodules.input_layernorm = norm_cls
    spec.submodules.pre_mlp_layernorm = norm_cls
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=norm_cls)

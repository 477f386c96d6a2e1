"""The torch backend's attention for packed rows: an HF ``AttentionInterface`` function over cu_seqlens.

Registered under ``plugrl_packed`` when the torch backend loads its model (in each train actor).
Without it, a packed row needs a dense ``[T, T]`` block-diagonal mask, and HF's SDPA with a dense mask
ran cuDNN kernels that took 0.69 s of a 1.67 s Qwen3-4B step on an H100 (9,216 tokens,
``benchmarks/train_throughput.py --profile``). HF transformers creates no mask for an attention
function it does not know, and passes the forward's extra keyword arguments down to it, so the
backend calls the model with ``cu_seq_lens_q`` / ``max_length_q`` (HF's own names for packed
flash attention) and this function runs ``packed_attention.attention_within_segments``: varlen flash
attention on CUDA, SDPA per sample elsewhere.
"""

from __future__ import annotations

import torch

from ..packed_attention import attention_within_segments, default_implementation

NAME = "plugrl_packed"


def packed_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """HF's attention-function contract: ``query/key/value [b, heads, t, d]`` -> ``([b, t, heads, d], None)``.
    With ``cu_seq_lens_q`` (one packed row): causal within each segment. Without: each row is one
    causal sequence (a plain ``model(input_ids)`` call); a padding ``attention_mask`` is refused."""
    unsupported = {k: kwargs[k] for k in ("sliding_window", "softcap", "s_aux") if kwargs.get(k) is not None}
    if unsupported:
        raise ValueError(f"attn_implementation={NAME!r} runs full causal attention; this model's attention also "
                         f"needs {sorted(unsupported)} (plugrl's torch backend loads such models without it)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        if attention_mask is not None:
            raise ValueError(f"attn_implementation={NAME!r} takes packed rows (cu_seq_lens_q) or unpadded rows, "
                             "not an attention_mask")
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scale, dropout_p=dropout, enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2), None
    if query.shape[0] != 1:
        raise ValueError(f"attn_implementation={NAME!r}: cu_seq_lens_q describes one packed row, got a batch of "
                         f"{query.shape[0]}")
    # [1, h, t, d] -> [t, h, d]: contiguous for the varlen kernel (views of the projections' [1, t, h, d]
    # layout, no copy). squeeze, not x[0]: a select's backward writes the gradient into a zero-filled
    # [1, h, t, d] tensor, a strided copy and a fill per tensor per layer that then also make the RoPE
    # and V-projection backward copy it back (216 copy kernels of a 4B step's backward, ~12 ms on an H100)
    q, k, v = (x.squeeze(0).transpose(0, 1).contiguous() for x in (query, key, value))
    out = attention_within_segments(q, k, v, cu_seqlens, int(kwargs["max_length_q"]), scale=scale,
                                    implementation=default_implementation(q.device.type, q.dtype), dropout=dropout)
    return out[None], None


def supports(config) -> str | None:
    """``None`` when this attention computes what the model's own would, else what it lacks (a model
    with sliding-window layers, logit soft-capping or attention sinks keeps its own attention)."""
    text = getattr(config, "get_text_config", lambda: config)()
    layer_types = getattr(text, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        return f"layer types {sorted(set(layer_types))}"
    if getattr(text, "use_sliding_window", False) and getattr(text, "sliding_window", None):
        return "sliding-window attention"
    if getattr(text, "attn_logit_softcapping", None):
        return "attention logit soft-capping"
    return None


def register() -> str:
    """Make ``attn_implementation=NAME`` loadable (idempotent); returns NAME."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention_forward)
    return NAME

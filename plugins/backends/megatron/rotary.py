"""Per-token rotary embeddings for packed micro-batches (positions restart at every sample).

megatron-core's THD rotary path walks the samples one by one (small kernels and a host sync per
sample, per layer, for q and for k), then applies RoPE as a chain of unfused kernels. Instead the
train backend computes one ``cos``/``sin`` row per packed token once per forward pass
(``PerTokenRotary.tables``) and hands them to the core attention inside the pack's params
(``SegmentedPackParams.rope``); ``attention.PackedCoreAttention`` rotates q and k there, fused on
CUDA (``fused_ops.rotate``). The GPTModel's own rotary module is kept inside (it owns ``inv_freq``)
but returns ``None`` to megatron, so megatron's attention applies no RoPE of its own. The tables
travel with the params through megatron's activation checkpointing, so a recomputed layer rotates
with exactly the tables of its forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class SegmentedPackParams(PackedSeqParams):
    """THD params whose sample boundaries and RoPE tables are for the core attention only (no
    ``cu_seqlens_q``: that would select megatron's per-sample rotary path)."""

    segments: torch.Tensor | None = None  # cu_seqlens (int32, on the model's device)
    max_segment: int = 0
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin), [T, 1, rotary dim], model dtype


class PerTokenRotary(torch.nn.Module):
    """Replaces ``GPTModel.rotary_pos_emb`` (installed by ``install`` when the backend builds a model)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def get_rotary_seq_len(self, *args, **kwargs) -> int:
        return self.inner.get_rotary_seq_len(*args, **kwargs)

    def forward(self, *args, **kwargs) -> None:
        return None  # RoPE is the core attention's (see the module docstring)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions [T]`` -> ``(cos, sin)`` of shape ``[T, 1, dim]`` in ``dtype`` (computed in fp32,
        then cast, as megatron and HF transformers do before multiplying)."""
        angles = self.inner(int(positions.max()) + 1)  # [L, 1, 1, dim], fp32
        angles = angles[positions].reshape(positions.numel(), 1, angles.shape[-1])
        return angles.cos().to(dtype), angles.sin().to(dtype)


def install(model) -> PerTokenRotary:
    """Give ``model`` per-token RoPE: megatron's rotary module returns nothing from now on, and every
    core attention rotates q and k from the pack's tables (and refuses a forward without them)."""
    from .attention import PackedCoreAttention

    rotary = PerTokenRotary(model.rotary_pos_emb)
    model.rotary_pos_emb = rotary
    for module in model.modules():
        if isinstance(module, PackedCoreAttention):
            module.rope_from_pack = True
    return rotary

"""Per-token rotary embeddings for packed micro-batches (positions restart at every sample).

Built around the GPTModel's own ``RotaryEmbedding`` when the train backend constructs a model, and
fed the pack's position ids before every forward. megatron-core's THD rotary path walks the samples
one by one (two small kernels and a host sync per sample, per layer, for q and for k); handing each
token its own frequencies lets the attention apply RoPE to the whole pack in one elementwise op.
The packed params then carry no ``cu_seqlens_q`` (that would select the per-sample path): the
segment boundaries travel in ``segments`` for the core attention (``attention.PackedCoreAttention``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class SegmentedPackParams(PackedSeqParams):
    """THD params whose sample boundaries are for the core attention only."""

    segments: torch.Tensor | None = None  # cu_seqlens (int32, on the model's device)
    max_segment: int = 0


class PerTokenRotary(torch.nn.Module):
    """Replaces ``GPTModel.rotary_pos_emb``: ``[T, 1, dim]`` frequencies, one row per packed token."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.positions: torch.Tensor | None = None  # set by the backend before each forward

    def get_rotary_seq_len(self, *args, **kwargs) -> int:
        return self.inner.get_rotary_seq_len(*args, **kwargs)

    def forward(self, max_seq_len: int, *args, **kwargs) -> torch.Tensor:
        if self.positions is None:
            raise RuntimeError("PerTokenRotary: the backend must set .positions before the forward pass")
        table = self.inner(int(self.positions.max()) + 1)  # [L, 1, 1, dim], fp32
        return table[self.positions].reshape(self.positions.numel(), 1, table.shape[-1])


def install(model) -> PerTokenRotary:
    rotary = PerTokenRotary(model.rotary_pos_emb)
    model.rotary_pos_emb = rotary
    return rotary

"""The slot KV cache of the embedded ``hf`` engine's fast decode path (decode thread, CPU or one GPU).

One K and one V tensor per layer, preallocated: a request owns one slot (row) from its prefill to its
last token, and every forward writes its new K/V in place at the row's own positions. Rows joining or
leaving never copy the cache; only growing it does (more slots or a longer context than any row needed
so far), which the caller does rarely (geometrically).

Two layouts, chosen by the decode attention that reads the cache (``decode_attention.py``):

* ``head`` ``[slots, kv_heads, length, head_dim]``: each (slot, head) is one contiguous run of
  positions, so ``[slots x heads]`` flattens into one GEMM batch (SDPA, matmul);
* ``token`` ``[slots, length, kv_heads, head_dim]``: the slots flatten into one packed token axis
  with row ``s`` starting at ``s * length`` (varlen flash attention reads it as is).
"""

from __future__ import annotations

import torch


class SlotKVCache:
    """Storage only; who owns which slot is ``slot_batch.SlotDecoder``'s business."""

    LAYOUTS = ("head", "token")

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 layout: str = "head"):
        if layout not in self.LAYOUTS:
            raise ValueError(f"KV cache layout must be one of {self.LAYOUTS}, got {layout!r}")
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.layout = layout
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.slots = 0
        self.length = 0

    @property
    def allocated(self) -> bool:
        return bool(self.keys)

    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def ensure(self, slots: int, length: int) -> bool:
        """Make room for ``slots`` rows of ``length`` positions; True when the tensors were reallocated
        (their addresses changed: captured CUDA graphs that read them are stale)."""
        if slots <= self.slots and length <= self.length:
            return False
        slots, length = max(slots, self.slots), max(length, self.length)
        # Zeros, not empty: masked-out positions still meet V in ``softmax @ V`` (0 * NaN = NaN).
        token = self.layout == "token"
        shape = (slots, length, self.kv_heads, self.head_dim) if token else (slots, self.kv_heads, length, self.head_dim)
        old = (slice(self.slots), slice(self.length)) if token else (slice(self.slots), slice(None), slice(self.length))
        keys, values = [], []
        for i in range(self.num_layers):
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if self.keys:  # keep what live rows already wrote
                k[old] = self.keys[i]
                v[old] = self.values[i]
                self.keys[i] = self.values[i] = None  # free as we go: peak = old + one layer
            keys.append(k)
            values.append(v)
        self.keys, self.values = keys, values
        self.slots, self.length = slots, length
        return True

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store ``k/v [n, kv_heads, head_dim]`` of ``n`` tokens at ``(slots[j], positions[j])``."""
        if self.layout == "token":
            self.keys[layer][slots, positions] = k
            self.values[layer][slots, positions] = v
        else:  # two index tensors around a slice: the indexed result is still [n, kv_heads, head_dim]
            self.keys[layer][slots, :, positions] = k
            self.values[layer][slots, :, positions] = v

    def rows(self, layer: int, rows: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``[rows, kv_heads, kv_len, head_dim]`` of slots ``0..rows-1`` (no copy in either layout)."""
        if self.layout == "token":
            return (self.keys[layer][:rows, :kv_len].transpose(1, 2),
                    self.values[layer][:rows, :kv_len].transpose(1, 2))
        return self.keys[layer][:rows, :, :kv_len], self.values[layer][:rows, :, :kv_len]

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy whole rows ``src`` -> ``dst`` (slot index tensors; used to compact a shrinking batch)."""
        for k, v in zip(self.keys, self.values):
            k.index_copy_(0, dst, k.index_select(0, src))
            v.index_copy_(0, dst, v.index_select(0, src))

    def release(self) -> None:
        self.keys, self.values = [], []
        self.slots = self.length = 0

"""The fast decode path of the embedded ``hf`` engine: slot-owning rows over a preallocated KV cache.

Used by the decode thread (``scheduler.py``) for Llama-family models (``decode_forward.unsupported_reason``
says which); other models keep ``batch.DecodeBatch``. ``SlotBatch`` answers the same calls as
``DecodeBatch`` (``decode``, ``advance``, ``keep``, ``merge``, ``requests``, ``sampling``), so the
scheduler's continuous batching is unchanged; what differs is the cost of a row joining or leaving:

* a joining request takes the lowest free slot of the ``SlotKVCache``; its prefill writes K/V there;
* a leaving request frees its slot for the next waiting request; nothing is copied or re-padded;
* a decode step runs over slots ``[0, B)`` with ``B`` the highest used slot + 1 (on CUDA rounded up to
  a bucket and replayed as a CUDA graph); free slots in that range compute throw-away rows. When rows
  finish at different times and the bucket could halve, the few rows above it move down into free
  slots (a copy of those rows only), so a draining batch does not keep paying for its peak size.

Per-slot device state: the next input token and its position (= the row's cached length). Free slots
hold token 0 at position 0 (always a valid write and a non-empty attention row).
"""

from __future__ import annotations

import logging

import torch

from .batch import Request
from .cuda_graphs import DecodeGraphs
from .decode_forward import LlamaLikeForward
from .decode_attention import LAYOUT as DECODE_LAYOUT
from .kv_cache import SlotKVCache

logger = logging.getLogger(__name__)


def batch_bucket(n: int) -> int:
    """Rows a decode step runs for ``n`` used slots: powers of two to 8, then multiples of 8/16/32
    (at most ~1/8 wasted rows, and few enough shapes to capture a graph for each)."""
    if n <= 8:
        return 1 << max(0, (n - 1).bit_length())
    step = 8 if n <= 32 else 16 if n <= 128 else 32
    return -(-n // step) * step


KV_BUCKET = 256  # the engine option kv_bucket's default


def kv_bucket(n: int, smallest: int = KV_BUCKET) -> int:
    """Cache positions a decode step attends over when the longest row needs ``n``: multiples of
    ``smallest`` (the engine option ``kv_bucket``), coarser for long contexts (<= 25% more than needed
    past ``4 * smallest``; four graphs per doubling of the length). Every step reads the K/V of all
    those positions: with 256, a 256 + 256-token decode attends over 512 from its second step on; a
    smaller step tracks the need closer at the cost of more graph captures."""
    step = max(smallest, 1 << max(0, n.bit_length() - 3))
    return -(-n // step) * step


class SlotDecoder:
    """Owns the fast path's state for one engine: forward, cache, slots, per-slot buffers, graphs."""

    def __init__(self, model, device: torch.device, *, max_batch_size: int, cuda_graphs: bool,
                 decode_attention: str = "sdpa", compile_ops: bool = False, kv_block: int = KV_BUCKET):
        self.forward = LlamaLikeForward(model, decode_attention, compiled_ops=compile_ops)
        f = self.forward
        self.device = device
        self.cache = SlotKVCache(len(f.layers), f.kv_heads, f.head_dim, f.dtype, device,
                                 layout=DECODE_LAYOUT[decode_attention])
        self.max_slots = batch_bucket(max_batch_size)
        self.graphs = DecodeGraphs(device) if cuda_graphs and device.type == "cuda" else None
        # Bucketed shapes (rows and KV length rounded up, free slots computed along): what graphs need.
        # Eager runs use exact shapes; CPU tests turn this on to check the padded rows cost nothing.
        self.bucketed = self.graphs is not None
        self.kv_block = kv_block  # the smallest KV-length bucket (kv_bucket)
        self.moves = 0  # rows moved down by compaction, since start
        self.graph_error: str | None = None  # why graphs were turned off, if a capture failed
        self._owner: dict[int, Request] = {}
        # Allocated in the decode thread (under its inference mode): next token / position per slot.
        self._tokens: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._ones: torch.Tensor | None = None
        self._arange: torch.Tensor | None = None  # reallocated with the cache (graphs hold views)

    @property
    def name(self) -> str:
        return "slots+cuda_graphs" if self.graphs is not None else "slots"

    def info(self) -> dict:
        from .fused_decode_ops import GROUP

        return {"decode_path": self.name, "decode_attention": self.forward.attention, "graph_error": self.graph_error,
                "fused_ops": self.forward.fused_reason or ("compiled" if self.forward.compiled_ops else "eager"),
                "compile_error": GROUP.failed[0].splitlines()[0] if GROUP.failed else None,
                "kv_slots": self.cache.slots,
                "kv_length": self.cache.length,
                "slot_moves": self.moves, "cuda_graphs": len(self.graphs) if self.graphs else 0,
                "cuda_graph_captures": self.graphs.captures if self.graphs else 0}

    # ------------------------------------------------------------------ memory
    def release(self) -> None:
        """``release_memory``: drop the cache and every graph (no rows may be live). The next prefill
        allocates again; graphs are recaptured, reading the (possibly moved) weights afresh."""
        # The engine refuses to release with requests in flight: no live rows are lost. Called from
        # the engine's thread (outside the decode thread's inference mode): drop, do not modify.
        self._owner.clear()
        self.cache.release()
        self._tokens = self._positions = self._ones = self._arange = None
        if self.graphs is not None:
            self.graphs.clear()

    def reset(self) -> None:
        """After a failed forward: every live row has been failed by the caller; free all slots."""
        self._owner.clear()
        if self._tokens is not None:
            with torch.inference_mode():  # the buffers are inference tensors (made in the decode thread)
                self._tokens.zero_()
                self._positions.zero_()

    def _buffers(self) -> None:
        if self._tokens is None:
            self._tokens = torch.zeros(self.max_slots, dtype=torch.long, device=self.device)
            self._positions = torch.zeros(self.max_slots, dtype=torch.long, device=self.device)
            self._ones = torch.ones(self.max_slots, dtype=torch.long, device=self.device)

    def _ensure(self, slots: int, length: int) -> None:
        cache = self.cache
        if slots <= cache.slots and length <= cache.length:
            return
        # Grow geometrically (each growth copies the cache and drops the graphs), but never past what
        # the live rows can ever need.
        longest = kv_bucket(max(len(r.prompt) + r.max_new_tokens for r in self._owner.values()), self.kv_block)
        if length > cache.length:
            length = max(length, min(longest, 2 * max(cache.length, length)))
        if slots > cache.slots:
            slots = max(slots, min(self.max_slots, 2 * cache.slots))
        cache.ensure(slots, length)
        # + 1: the flash attention's cumulative offsets take B + 1 entries
        self._arange = torch.arange(max(self.max_slots + 1, cache.length), device=self.device)
        if self.graphs is not None:
            self.graphs.clear()

    # ------------------------------------------------------------------ slots
    def _take(self, requests: list[Request]) -> list[int]:
        free = [s for s in range(self.max_slots) if s not in self._owner]
        if len(free) < len(requests):
            raise RuntimeError(f"no free KV slots: {len(requests)} requested, {len(free)} free")
        # Ascending, like ``requests``: the batch's slot order is the prefill logits' row order.
        slots = free[: len(requests)]
        self._owner.update(zip(slots, requests))
        return slots

    def free(self, slots: list[int]) -> None:
        for s in slots:
            self._owner.pop(s, None)
        if slots and self._tokens is not None:
            idx = torch.tensor(slots, dtype=torch.long, device=self.device)
            self._tokens.index_fill_(0, idx, 0)
            self._positions.index_fill_(0, idx, 0)

    # ------------------------------------------------------------------ forwards
    def prefill(self, requests: list[Request]) -> tuple["SlotBatch", torch.Tensor]:
        """Take a slot per request, run the prompts packed, write their K/V; -> (batch, logits ``[n, V]``)."""
        self._buffers()
        slots = self._take(requests)
        try:
            lengths = [len(r.prompt) for r in requests]
            self._ensure(batch_bucket(max(slots) + 1), kv_bucket(max(lengths), self.kv_block))
            ids, positions, slot_of_token, cu = [], [], [], [0]
            for r, s, n in zip(requests, slots, lengths):
                ids += r.prompt
                positions += range(n)
                slot_of_token += [s] * n
                cu.append(cu[-1] + n)
            as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
            cu_t = as_tensor(cu)
            logits = self.forward.prefill(as_tensor(ids), as_tensor(positions), as_tensor(slot_of_token), cu_t,
                                          max(lengths), cu_t[1:] - 1, self.cache)
            self._positions.index_copy_(0, as_tensor(slots), as_tensor(lengths))
        except BaseException:
            self.free(slots)
            raise
        return SlotBatch(self, requests, slots), logits

    def decode(self, batch: "SlotBatch") -> torch.Tensor:
        """Feed every row's next token at its position; -> logits ``[len(batch), V]`` in row order."""
        self._compact(batch)
        hi = batch.slots[-1] + 1
        need = max(len(r.prompt) + len(r.tokens) for r in batch.requests)  # newest position + 1
        bucket = batch_bucket(hi)
        self._ensure(bucket, kv_bucket(need, self.kv_block))
        if self.bucketed:
            b, kv_len = bucket, kv_bucket(need, self.kv_block)
        else:  # eager: exactly the rows and positions in use
            b, kv_len = hi, need
        cache, tokens, positions, arange = self.cache, self._tokens[:b], self._positions[:b], self._arange

        def step() -> torch.Tensor:
            return self.forward.decode(tokens, positions, cache, kv_len, arange)

        if self.graphs is not None:
            try:
                logits = self.graphs.run((b, kv_len), step)
            except Exception as exc:  # noqa: BLE001 - keep generating, loudly, rather than fail every request
                logger.warning("hf engine: CUDA graph capture failed (%r); decoding eagerly from now on", exc)
                self.graph_error = repr(exc)
                self.graphs.clear()
                self.graphs = None
                logits = step()
        else:
            logits = step()
        index = batch.slot_index()
        self._positions.index_add_(0, index, self._ones[: len(batch)])
        if hi == len(batch):  # rows are slots 0..n-1 in order
            return logits[: len(batch)]
        return logits.index_select(0, index)

    def _compact(self, batch: "SlotBatch") -> None:
        """Move the rows above ``len(batch)`` into free slots below it when that shrinks the bucket."""
        n = len(batch)
        if batch_bucket(batch.slots[-1] + 1) <= batch_bucket(n):
            return
        movers = [i for i, s in enumerate(batch.slots) if s >= n]
        holes = [s for s in range(n) if s not in self._owner][: len(movers)]
        src = torch.tensor([batch.slots[i] for i in movers], dtype=torch.long, device=self.device)
        dst = torch.tensor(holes, dtype=torch.long, device=self.device)
        self.cache.move(src, dst)
        for buf in (self._tokens, self._positions):
            buf.index_copy_(0, dst, buf.index_select(0, src))
            buf.index_fill_(0, src, 0)
        for i, hole in zip(movers, holes):
            self._owner.pop(batch.slots[i])
            self._owner[hole] = batch.requests[i]
            batch.slots[i] = hole
        self.moves += len(holes)
        batch.reorder()


class SlotBatch:
    """The live rows (sorted by slot) and their sampling state; see the module docstring."""

    def __init__(self, decoder: SlotDecoder, requests: list[Request], slots: list[int]):
        self.decoder = decoder
        self.requests, self.slots = list(requests), list(slots)
        self.sampling = None  # hf_sampling.RowSampling of these rows, built by the decode loop
        self._index: torch.Tensor | None = None
        self.reorder()

    def __len__(self) -> int:
        return len(self.requests)

    def reorder(self) -> None:
        """Sort rows by slot (so a full batch reads its logits without a gather); the row order
        changed, so the per-row sampling tensors are rebuilt."""
        order = sorted(range(len(self.slots)), key=self.slots.__getitem__)
        self.requests = [self.requests[i] for i in order]
        self.slots = [self.slots[i] for i in order]
        self.sampling = None
        self._index = None

    def slot_index(self) -> torch.Tensor:
        if self._index is None:
            self._index = torch.tensor(self.slots, dtype=torch.long, device=self.decoder.device)
        return self._index

    def decode(self, model=None) -> torch.Tensor:
        return self.decoder.decode(self)

    def advance(self, tokens: torch.Tensor) -> None:
        """The sampled tokens become the rows' next inputs (at the positions the step advanced)."""
        self.decoder._tokens.index_copy_(0, self.slot_index(), tokens)

    def keep(self, indices: list[int]) -> None:
        """Rows not in ``indices`` leave; their slots are free for the next waiting request."""
        if len(indices) == len(self):
            return
        kept = set(indices)
        self.decoder.free([s for i, s in enumerate(self.slots) if i not in kept])
        self.requests = [self.requests[i] for i in indices]
        self.slots = [self.slots[i] for i in indices]
        self.reorder()

    def merge(self, other: "SlotBatch") -> None:
        self.requests = self.requests + other.requests
        self.slots = self.slots + other.slots
        self.reorder()

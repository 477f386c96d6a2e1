"""What the engine side receives for a streamed weight push: a small picklable object that the
driver hands to ``RolloutManager.update_weights`` in place of the buckets.

It *is* an iterable of buckets (``{hf_name: tensor}`` dicts, as the trainer's object-store export
is), so any engine that loads buckets loads it; iterating it in the engine's process pulls the
bytes: ``HandleStream`` opens each bucket by handle from train rank 0 (CUDA IPC on one GPU,
``core/weight_handles.py``), ``BroadcastStream`` receives each bucket over the weight group
(``core/weight_broadcast.py``). A bucket's tensors are views of its flat buffer, valid until the
next bucket is taken: an engine that streams (``plugins/backends/hf/weights.py``) checks
``entries()`` against its model first, then copies bucket by bucket, so at most two buckets are in
flight; one that collects everything first still gets correct weights.
"""

from __future__ import annotations

from .weight_packing import manifest_entries, unpack


class WeightStream:
    is_weight_stream = True  # how a receiver recognises a stream without importing this module

    def __init__(self, buckets: list, push_id: int):
        self.buckets = list(buckets)  # [BucketSpec]
        self.push_id = int(push_id)

    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        return manifest_entries(self.buckets)

    def refuse(self, reason: str) -> None:
        """The receiver will not load this push (its model does not match ``entries()``)."""

    def __len__(self) -> int:
        return len(self.buckets)


def _synchronize(flat) -> None:
    """The receiver's copies out of ``flat`` are done before the sender may reuse the memory."""
    if flat.is_cuda:
        import torch

        torch.cuda.current_stream(flat.device).synchronize()


class HandleStream(WeightStream):
    """Buckets pulled by handle from ``source`` (train rank 0's actor: ``weights_bucket``)."""

    def __init__(self, source, buckets: list, push_id: int):
        super().__init__(buckets, push_id)
        self.source = source

    def __iter__(self):
        import ray

        if not self.buckets:
            return
        pending = self.source.weights_bucket.remote(self.push_id, 0)
        for index, bucket in enumerate(self.buckets):
            handle = ray.get(pending)
            # ask for the next one now: the trainer packs it while this one is copied
            pending = self.source.weights_bucket.remote(self.push_id, index + 1) if index + 1 < len(self) else None
            from .weight_handles import open_shared

            flat = open_shared(handle)
            try:
                yield dict(unpack(bucket, flat))
            finally:
                _synchronize(flat)
                del flat


class BroadcastStream(WeightStream):
    """Buckets received over the weight broadcast group ``group_name`` (rank 0 sends)."""

    def __init__(self, group_name: str, buckets: list, push_id: int):
        super().__init__(buckets, push_id)
        self.group_name = group_name

    def refuse(self, reason: str) -> None:
        from .weight_broadcast import get

        get(self.group_name).vote(True)  # the sender and the other receivers stop before any bucket

    def __iter__(self):
        import torch

        from .weight_broadcast import get

        group = get(self.group_name)
        if group.vote(False):
            raise RuntimeError(f"weight push {self.push_id}: another engine refused it (see its error); "
                               "nothing was loaded here")
        received = 0
        try:
            for bucket in self.buckets:
                flat = torch.empty(max(1, bucket.nbytes), dtype=torch.uint8, device=group.device)
                group.broadcast(flat)
                received += 1
                yield dict(unpack(bucket, flat))
        finally:
            # A consumer that stopped early (an error while loading) still takes the rest of the
            # broadcast, so the sender and the other engines finish instead of waiting forever.
            for bucket in self.buckets[received:]:
                group.broadcast(torch.empty(max(1, bucket.nbytes), dtype=torch.uint8, device=group.device))

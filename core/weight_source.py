"""The trainer's side of a streamed weight push (train rank 0's actor, ``TrainWorker.weights_*``).

``begin`` takes the backend's HF-named tensors *on its own device* (views: a megatron backend maps
its fused tensors to HF names with strided views, no copy) and plans the buckets; only the manifest
leaves the process. Buckets are packed on demand into flat buffers (``core/weight_packing.py``) and
either shared by handle (``bucket(i)``, pulled by each receiver: ``core/weight_stream.py``) or
broadcast to the group (``broadcast``). At most ``WINDOW`` packed buffers are alive at once, so the
push costs two buckets of memory beyond the weights themselves, never a second copy of the model.
``end`` frees everything.
"""

from __future__ import annotations

from .weight_packing import dtype_name, manifest_entries, pack, plan_buckets
from .weight_sync import WINDOW_BUCKETS

# Packed buffers kept alive: the one a receiver is copying from and the one packed ahead for it.
WINDOW = WINDOW_BUCKETS


class WeightSource:
    def __init__(self, named, bucket_bytes: int | None, *, dtype=None):
        """``named``: ``[(hf_name, tensor)]`` or ``[(hf_name, tensor, hf_shape)]`` in push order (the
        shape when the tensor is a view of another shape with the same row-major order); ``dtype``:
        floating tensors travel as this dtype (None: as they are)."""
        self.sources = {}
        entries = []
        for item in named:
            name, tensor = item[0], item[1]
            shape = tuple(item[2]) if len(item) > 2 else tuple(tensor.shape)
            out = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
            self.sources[name] = tensor.detach()
            entries.append((name, dtype_name(out), shape))
        self.buckets = plan_buckets(entries, bucket_bytes)
        self.device = next(iter(self.sources.values())).device if self.sources else None
        self._packed: dict[int, object] = {}
        self.packs = 0  # buffers packed (a bucket pulled again after eviction is packed again)

    def manifest(self) -> list:
        """``[BucketSpec]``: what the receivers check and view the buffers with."""
        return list(self.buckets)

    def entries(self) -> list:
        return manifest_entries(self.buckets)

    def packed(self, index: int):
        if not 0 <= index < len(self.buckets):
            raise IndexError(f"bucket {index} of a push with {len(self.buckets)} buckets")
        flat = self._packed.get(index)
        if flat is None:
            while len(self._packed) >= WINDOW:  # the receiver is done with the oldest one
                del self._packed[min(self._packed)]
            flat = pack(self.buckets[index], self.sources, device=self.device)
            self._packed[index] = flat
            self.packs += 1
        return flat

    def bucket(self, index: int) -> dict:
        """A handle of bucket ``index`` (packed now if not live)."""
        from .weight_handles import share

        return share(self.packed(index))

    def broadcast(self, group) -> bool:
        """Send every bucket over ``group`` after the members' vote; False when a receiver refused
        (nothing was sent; the receiver raises the reason)."""
        if group.vote(False):
            return False
        for index in range(len(self.buckets)):
            flat = self.packed(index)
            if flat.device != group.device:  # gloo sends host memory
                flat = flat.to(group.device)
            group.broadcast(flat)
        return True

    def end(self) -> None:
        self._packed.clear()
        self.sources.clear()
        if self.device is not None and self.device.type == "cuda":
            import torch

            torch.cuda.ipc_collect()  # blocks the receivers released go back to the allocator
            torch.cuda.empty_cache()

"""The trainer's weight export as it crosses Ray: a list of ``{hf_name: cpu tensor}`` buckets that
pickles its tensors as raw numpy bytes.

Why: Ray writes numpy arrays into its object store out of band and hands readers views of that
shared memory, but a pickled torch tensor is copied once more into every reader's private memory.
With a 4B model (8.8 GB of bf16 weights) that copy per reader, next to the trainer's offloaded state,
is what pushed one 128 GiB host out of memory. Exported this way the weights exist once on the host
(in the object store) between the export and the engine's copy onto its GPU: the export side's
tensors are host views of the trainer's offload buffers (no copy), and the readers' tensors are
read-only views of the object store (no copy). In one process it is just the list.
"""

from __future__ import annotations

import warnings


def _tensor_from_bytes(raw, dtype_name: str, shape: tuple[int, ...]):
    import torch

    with warnings.catch_warnings():  # the object store's memory is read-only: readers only copy from it
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.from_numpy(raw)
    return flat.view(getattr(torch, dtype_name)).view(shape)


def _rebuild(specs: list[list[tuple[str, str, tuple[int, ...]]]], arrays: list) -> WeightBuckets:
    it = iter(arrays)
    return WeightBuckets([{name: _tensor_from_bytes(next(it), dtype, shape) for name, dtype, shape in bucket}
                          for bucket in specs])


class WeightBuckets(list):
    """``list[dict[str, torch.Tensor]]`` (CPU tensors) whose pickled form is numpy byte arrays."""

    def __reduce__(self):
        import torch

        specs, arrays = [], []
        for bucket in self:
            spec = []
            for name, tensor in bucket.items():
                tensor = tensor.detach()
                if tensor.device.type != "cpu":
                    tensor = tensor.cpu()
                tensor = tensor.contiguous()
                spec.append((name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)))
                arrays.append(tensor.reshape(-1).view(torch.uint8).numpy())
            specs.append(spec)
        return _rebuild, (specs, arrays)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for bucket in self for t in bucket.values())


"""Host values to a device without waiting for the GPU: what the train backends' micro-batch loop uses
for token ids, positions, sample boundaries and per-sample counts.

``torch.tensor(values, device="cuda")`` and ``cpu_tensor.to("cuda")`` block the host until the GPU has
finished everything queued before them (a stream sync around the copy). Inside a train step that
stalls the host at every micro-batch until the previous backward is done, so the GPU then waits for
the host to prepare and launch the next micro-batch. Here the values are staged in pinned host
memory and copied asynchronously on the current stream, which orders the copy before the kernels
that read it; the caching host allocator keeps the pinned block until the copy has run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: torch.Tensor | Sequence, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``values`` (a CPU tensor, or numbers / nested lists) on ``device`` in ``dtype``; on CUDA without a
    host sync, elsewhere a plain ``.to``."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if dtype is not None and host.dtype != dtype:
        host = host.to(dtype)
    device = torch.device(device)
    if device.type != "cuda" or host.device.type != "cpu":
        return host.to(device)
    # a fresh pinned buffer, also when ``values`` is pinned already: the caller may then change its own
    # tensor while the copy is still queued
    staged = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
    staged.copy_(host)
    return staged.to(device, non_blocking=True)

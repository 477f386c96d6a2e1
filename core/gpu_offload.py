"""Colocated runs: free the GPU memory behind a set of tensors while the other side (rollout
engine or trainer) uses the GPU, and restore it in place afterwards.

Used by the train backends' ``offload()``/``onload()`` and the embedded engine's
``release_memory``/``resume_memory``. Storages are resized to zero bytes rather than tensors
moved, so every view into them (megatron's DDP grad buffers, optimizer state keyed by parameter)
stays valid. The host copies live in buffers that are allocated once and reused by every later
offload: pinned on CUDA, so the copies run at full PCIe speed without a fresh page-locked
allocation per step (the first offload pays for the allocation).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class StorageOffload:
    """``offload(pairs)`` takes ``(tensor, keep)`` pairs: ``keep`` tensors are copied to host
    buffers first, the others (gradients zeroed before every step anyway) are zero-filled on
    ``onload()``. Tensors sharing a storage are handled once. Not thread-safe: the owner calls it
    between steps."""

    def __init__(self, *, pin_memory: bool | None = None):
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._host: dict[int, torch.Tensor] = {}  # StorageImpl address -> reusable host buffer
        self._saved: list[tuple[torch.Tensor, int, torch.Tensor | None]] = []  # (base view, bytes, host copy)

    @property
    def offloaded(self) -> bool:
        return bool(self._saved)

    def host_buffer_bytes(self) -> int:
        return sum(buffer.numel() for buffer in self._host.values())

    def offload(self, pairs: Iterable[tuple[torch.Tensor, bool]]) -> dict[int, torch.Tensor]:
        """Copy, then free. Returns {storage key: host copy} of the kept storages (the key is the
        StorageImpl address, which survives the resize); ``host_view`` reads them."""
        if self._saved:
            raise RuntimeError("StorageOffload.offload() called twice without onload()")
        seen: set[int] = set()
        live: dict[int, torch.Tensor] = {}
        for tensor, keep in pairs:
            storage = tensor.untyped_storage()
            key = storage._cdata  # the StorageImpl: stable across resizes, unlike data_ptr()
            if key in seen or storage.nbytes() == 0:
                continue
            seen.add(key)
            if not storage.resizable():
                self._saved = []  # nothing is freed yet: the caller's tensors are untouched
                raise ValueError(f"cannot offload a {tuple(tensor.shape)} {tensor.dtype} tensor on {tensor.device}: its "
                                 "storage is not resizable (memory-mapped or borrowed memory); clone it first")
            base = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
            host = None
            if keep:
                host = self._host.get(key)
                if host is None or host.numel() != storage.nbytes():
                    host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=self.pin_memory)
                host.copy_(base, non_blocking=self.pin_memory)
                live[key] = host
            self._saved.append((base, storage.nbytes(), host))
        self._host = live  # buffers of storages that are gone are dropped here
        if self.pin_memory:
            torch.cuda.synchronize()  # the copies must land before the storages are freed
        for base, _nbytes, _host in self._saved:
            base.untyped_storage().resize_(0)
        return dict(live)

    def host_view(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``'s values on the host: while offloaded, a view into its storage's host copy (no
        extra memory) when ``offload`` kept it; otherwise a fresh copy (the tensor is live)."""
        host = self._host.get(tensor.untyped_storage()._cdata) if self._saved else None
        if host is None:
            return tensor.detach().to("cpu", copy=True)
        return torch.empty(0, dtype=tensor.dtype).set_(host.untyped_storage(), tensor.storage_offset(), tensor.size(),
                                                       tensor.stride())

    def onload(self) -> None:
        """Re-allocate every freed storage at its old size and copy the kept bytes back."""
        for base, nbytes, host in self._saved:
            base.untyped_storage().resize_(nbytes)
            if host is not None:
                base.copy_(host, non_blocking=self.pin_memory)
            else:
                base.zero_()
        if self.pin_memory and self._saved:
            torch.cuda.synchronize()  # the host buffers are reused by the next offload
        self._saved = []

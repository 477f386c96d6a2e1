"""Sharing a flat bucket buffer with another process on the same machine by handle, not by bytes.

* CUDA: torch's CUDA IPC reduction (``reduce_tensor``: an IPC memory handle, a shared reference
  counter, an event). The receiver opens it on *its* index of the same physical GPU, found by device
  UUID: Ray gives every actor its own ``CUDA_VISIBLE_DEVICES``, so index 0 in the trainer and index
  0 in the engine need not be the same GPU, and equal UUIDs are the only proof they are.
* CPU: the buffer's storage moves to ``/dev/shm`` (torch's ``file_system`` sharing) and the file
  name travels; used by the CPU tests and the CPU benchmark rows of the same streaming protocol.

The sender keeps the buffer alive until the receiver has copied out of it (``core/weight_source.py``
frees it after the receiver asked for the next bucket or the push ended). Runs in the train actor
(``share``) and in the engine's process (``open_shared``).
"""

from __future__ import annotations

from typing import Any

# rebuild_cuda_tensor's positional arguments: (tensor_cls, size, stride, offset, storage_cls, dtype,
# storage_device, handle, ...). The device index is the sender's; it is replaced on the receiver.
_CUDA_DEVICE_ARG = 6


def device_uuid(index: int | None = None) -> str | None:
    """The UUID of CUDA device ``index`` of this process (current device by default); None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device() if index is None else int(index)
    return str(torch.cuda.get_device_properties(index).uuid)


def local_index(uuid: str) -> int:
    """This process's index of the GPU with ``uuid`` (ValueError when it cannot see that GPU)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index in range(count):
        if str(torch.cuda.get_device_properties(index).uuid) == uuid:
            return index
    raise ValueError(f"GPU {uuid} is not visible in this process (CUDA_VISIBLE_DEVICES="
                     f"{__import__('os').environ.get('CUDA_VISIBLE_DEVICES')!r}, {count} device(s)): "
                     "a CUDA IPC weight push needs the engine on the trainer's GPU")


def share(flat) -> dict[str, Any]:
    """A picklable handle of ``flat`` (a 1-D uint8 tensor, CUDA or CPU)."""
    import torch

    if flat.is_cuda:
        from torch.multiprocessing.reductions import reduce_tensor

        # The copy kernels that filled the buffer ran on this process's stream: finish them, the
        # receiver reads through its own context.
        torch.cuda.current_stream(flat.device).synchronize()
        _, args = reduce_tensor(flat)
        return {"kind": "cuda_ipc", "uuid": device_uuid(flat.device.index), "args": args}
    storage = flat.untyped_storage()
    manager, name, size = storage._share_filename_cpu_()  # moves the storage into /dev/shm (once)
    return {"kind": "cpu_shm", "manager": manager, "name": name, "size": size,
            "offset": flat.storage_offset(), "numel": flat.numel()}


def open_shared(handle: dict[str, Any]):
    """The shared buffer as a 1-D uint8 tensor in this process (maps the sender's memory: no copy)."""
    import torch

    kind = handle.get("kind")
    if kind == "cuda_ipc":
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        args = list(handle["args"])
        args[_CUDA_DEVICE_ARG] = local_index(handle["uuid"])
        return rebuild_cuda_tensor(*args)
    if kind == "cpu_shm":
        storage = torch.UntypedStorage._new_shared_filename_cpu(handle["manager"], handle["name"], handle["size"])
        flat = torch.empty(0, dtype=torch.uint8)
        flat.set_(storage, handle["offset"], (handle["numel"],))
        return flat
    raise ValueError(f"unknown weight handle kind {kind!r}")

"""Payload codecs shared by the SGLang-API server (``server.py``, engine process) and the weight
pushers (``weights.py``, rollout manager process). torch is imported lazily.

``update_weights_from_tensor`` with ``load_format="flattened_bucket"`` is SGLang's own format, as
slime's colocated ``UpdateWeightFromTensor`` sends it: each bucket is split by dtype; each part is one
flat tensor plus ``FlattenedTensorMetadata`` (name, shape, dtype, start_idx, end_idx, numel), and
``{"flattened_tensor": flat, "metadata": [...]}`` goes through SGLang's ``MultiprocessingSerializer``
(a ``multiprocessing.reduction.ForkingPickler`` dump with torch's reductions, base64 text).
``serialized_named_tensors`` holds one such entry per TP rank of the engine. Nothing is copied into
the payload: a CUDA tensor pickles as a CUDA IPC handle, a CPU tensor in shared memory as the name of
a ``/dev/shm`` file (torch's ``file_system`` sharing strategy; the default ``file_descriptor``
strategy passes fds over the sender's multiprocessing socket, which an HTTP receiver cannot reach).
So the receiver must run on the sender's host, and the sender must keep the memory alive until the
receiver answered (``SharedBucket.release`` after the reply).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import os
import pickle
import threading
from dataclasses import dataclass

FLATTENED_BUCKET = "flattened_bucket"  # SGLang's load_format for this layout
METADATA_FIELDS = ("name", "shape", "dtype", "start_idx", "end_idx", "numel")  # SGLang's FlattenedTensorMetadata
BUCKET_KEYS = ("flattened_tensor", "metadata")  # SGLang's _update_weights_from_flattened_bucket reads these

_DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool")
_SHARING_LOCK = threading.Lock()


@dataclass
class FlattenedTensorMetadata:
    """Receiver-side stand-in for SGLang's class of the same name (same fields), used when SGLang is
    not installed in the engine process."""

    name: str
    shape: tuple
    dtype: object
    start_idx: int
    end_idx: int
    numel: int


@functools.lru_cache(maxsize=1)  # a failing sglang import is slow: try it once per process
def _sender_metadata_class():
    """SGLang's own metadata class when importable (the payload is then exactly slime's), else
    ``types.SimpleNamespace``: SGLang reads the metadata by attribute and its ``SafeUnpickler``
    allows ``types.*`` but not plugrl's module, so a plugrl-pickled class would be refused there."""
    try:
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata as cls
    except Exception:  # noqa: BLE001  not installed, or installed without its dependencies (then its
        # __init__ fails with ImportError, RuntimeError or a KeyError of a half-imported package)
        import types

        cls = types.SimpleNamespace
    return cls


@contextlib.contextmanager
def _file_system_sharing():
    """Pickle CPU storages as ``/dev/shm`` names for the duration (the strategy is process-global:
    restore it, and keep other threads of this module out meanwhile)."""
    import torch.multiprocessing as mp

    with _SHARING_LOCK:
        previous = mp.get_sharing_strategy()
        mp.set_sharing_strategy("file_system")
        try:
            yield
        finally:
            mp.set_sharing_strategy(previous)


def serialize(obj) -> str:
    """SGLang's ``MultiprocessingSerializer.serialize(obj, output_str=True)``. Each call pickles new
    handles (torch counts one reference per pickle, released when the receiver rebuilds it), so
    every receiver (engine, TP rank) gets its own call."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's reductions with ForkingPickler)

    buffer = io.BytesIO()
    with _file_system_sharing():
        ForkingPickler(buffer).dump(obj)
    return base64.b64encode(buffer.getvalue()).decode("utf-8")


class _PayloadUnpickler(pickle.Unpickler):
    """Rebuilds only what a flattened bucket holds (torch tensors/storages and their rebuild
    functions, the metadata objects); anything else in a payload is refused, as SGLang's
    ``SafeUnpickler`` does."""

    _EXTRA = frozenset({("types", "SimpleNamespace"), ("collections", "OrderedDict"),
                        ("torch.storage", "TypedStorage"), ("torch.storage", "UntypedStorage")})

    def find_class(self, module: str, name: str):
        import torch

        if module == "sglang.srt.weight_sync.tensor_bucket" and name == "FlattenedTensorMetadata":
            try:
                return super().find_class(module, name)
            except Exception:  # noqa: BLE001  SGLang is not (usably) installed here: same fields, read by attribute
                return FlattenedTensorMetadata
        allowed = (
            (module, name) in self._EXTRA
            or (module == "torch" and (name in ("Size", "Tensor", "device") or name.endswith("Storage")
                                       or isinstance(getattr(torch, name, None), torch.dtype)))
            or (module == "torch.multiprocessing.reductions" and name.startswith("rebuild_"))
            or (module == "torch._utils" and name.startswith("_rebuild_"))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"refused to unpickle {module}.{name}: not part of a flattened_bucket payload")
        return super().find_class(module, name)


def deserialize(entry: str):
    """SGLang's ``MultiprocessingSerializer.deserialize`` for one base64 entry (restricted classes)."""
    import torch.multiprocessing  # noqa: F401  (the rebuild functions live there)

    return _PayloadUnpickler(io.BytesIO(base64.b64decode(entry, validate=True))).load()


def decode_flattened_bucket(entry: str) -> list:
    """One ``serialized_named_tensors`` entry -> [(name, tensor)], views into the shared flat tensor
    (SGLang's ``FlattenedTensorBucket.reconstruct_tensors``). Drop them after loading: they map the
    sender's memory."""
    import torch

    obj = deserialize(entry)
    if not isinstance(obj, dict) or set(BUCKET_KEYS) - set(obj):
        raise ValueError(f"a flattened_bucket entry must be a dict with keys {list(BUCKET_KEYS)}")
    flat, metadata = obj["flattened_tensor"], obj["metadata"]
    if not isinstance(flat, torch.Tensor) or flat.dim() != 1:
        raise ValueError("flattened_tensor must be a 1-D tensor")
    pairs = []
    for meta in metadata:
        missing = [f for f in METADATA_FIELDS if not hasattr(meta, f)]
        if missing:
            raise ValueError(f"metadata entry lacks {missing}")
        start, end, shape = int(meta.start_idx), int(meta.end_idx), torch.Size(meta.shape)
        if not 0 <= start <= end <= flat.numel() or end - start != int(meta.numel) or shape.numel() != end - start:
            raise ValueError(f"metadata of {meta.name!r} does not fit the flat tensor "
                             f"([{start}:{end}] of {flat.numel()}, shape {tuple(shape)})")
        tensor = flat[start:end].reshape(shape)
        if tensor.dtype != meta.dtype:  # as SGLang: a single-dtype flat tensor, converted per entry
            tensor = tensor.to(meta.dtype)
        pairs.append((str(meta.name), tensor))
    return pairs


class SharedBucket:
    """One bucket of (name, tensor) pairs copied into memory another process on this host can map:
    one flat tensor per dtype (in order of first appearance), on the tensors' device. CUDA: device
    memory, pickled as an IPC handle. CPU: a ``/dev/shm`` file (``file_system`` strategy). Call
    ``release`` once every receiver answered."""

    def __init__(self, pairs):
        import torch

        groups: dict = {}
        for name, tensor in pairs:
            groups.setdefault((tensor.dtype, tensor.device), []).append((name, tensor))
        if not groups:
            raise ValueError("cannot share an empty bucket")
        meta_cls = _sender_metadata_class()
        self.parts: list[dict] = []
        with torch.no_grad():
            for (dtype, device), named in groups.items():
                total = sum(t.numel() for _, t in named)
                flat = _allocate(total, dtype, device)
                metadata, offset = [], 0
                for name, tensor in named:
                    n = tensor.numel()
                    flat[offset:offset + n].copy_(tensor.detach().reshape(-1))
                    metadata.append(meta_cls(name=name, shape=tensor.shape, dtype=dtype, start_idx=offset,
                                             end_idx=offset + n, numel=n))
                    offset += n
                self.parts.append({"flattened_tensor": flat, "metadata": metadata})
        if any(p["flattened_tensor"].is_cuda for p in self.parts):
            torch.cuda.synchronize()  # the copies must be done before another process reads the memory

    @property
    def nbytes(self) -> int:
        return sum(p["flattened_tensor"].numel() * p["flattened_tensor"].element_size() for p in self.parts)

    def entries(self, part: dict, tp_size: int) -> list[str]:
        """``serialized_named_tensors`` for one engine: one fresh serialization per TP rank."""
        return [serialize(part) for _ in range(int(tp_size))]

    def release(self) -> None:
        """Drop this process's references; the memory goes once the receivers dropped theirs (CUDA:
        ``ipc_collect`` frees blocks whose receivers are done)."""
        import torch

        on_cuda = any(p["flattened_tensor"].is_cuda for p in self.parts)
        self.parts = []
        if on_cuda:
            torch.cuda.ipc_collect()


def _allocate(numel: int, dtype, device):
    import torch

    if device.type == "cuda":
        return torch.empty(numel, dtype=dtype, device=device)
    if device.type != "cpu":
        raise ValueError(f"tensor weight transport shares CPU or CUDA memory, not {device.type}")
    # Allocated straight in /dev/shm (share_memory_() on a fresh tensor would copy it there).
    nbytes = max(1, numel * torch.empty((), dtype=dtype).element_size())  # a 0-byte file cannot be mapped
    # tmpfs files are sparse: an oversized one is created fine and the copy into it dies of SIGBUS.
    # Containers often mount a small /dev/shm (Docker: 64 MB), so say so before that happens.
    stat = os.statvfs("/dev/shm")
    if nbytes > stat.f_bavail * stat.f_frsize:
        raise RuntimeError(
            f"/dev/shm has {stat.f_bavail * stat.f_frsize >> 20} MiB free, a {nbytes >> 20} MiB weight bucket does "
            f"not fit: lower --update-weight-buffer-size or enlarge /dev/shm (docker run --shm-size)")
    storage = torch.UntypedStorage._new_using_filename_cpu(nbytes)
    return torch.empty(0, dtype=dtype).set_(storage, 0, (numel,), (1,))


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling slime sends in ``dtypes``)."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str):
    import torch

    name = name.removeprefix("torch.")
    if name not in _DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {name!r}; known: {list(_DTYPE_NAMES)}")
    return getattr(torch, name)


def bucket_by_size(pairs, max_bytes: int) -> list[list]:
    """Split (name, tensor) pairs into consecutive buckets of at most ``max_bytes`` (a tensor larger
    than the limit gets a bucket of its own), like slime's ``--update-weight-buffer-size``."""
    buckets, current, size = [], [], 0
    for name, t in pairs:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append((name, t))
        size += nbytes
    if current:
        buckets.append(current)
    return buckets

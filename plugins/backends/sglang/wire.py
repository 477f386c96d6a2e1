"""Payload codecs shared by the SGLang-API server (``server.py``, engine process) and the backend
(``engine.py``, rollout manager process). Pure functions; torch is imported lazily.

``update_weights_from_tensor`` on CPU: real SGLang's ``serialized_named_tensors`` entries are
``MultiprocessingSerializer`` bytes carrying CUDA IPC handles (one entry per TP rank), base64 in
JSON. There is no CUDA IPC on CPU, so plugrl's server accepts ``load_format == "plugrl_torch"``:
each entry is ``base64(torch.save([(name, tensor), ...]))`` (tensors by value, contiguous, CPU).
The server loads every entry (one per TP rank in SGLang; our server has one rank, so one entry).
"""

from __future__ import annotations

import base64
import io

LOAD_FORMAT = "plugrl_torch"

_DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool")


def encode_named_tensors(pairs) -> str:
    import torch

    buffer = io.BytesIO()
    torch.save([(name, t.detach().to("cpu").contiguous()) for name, t in pairs], buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_named_tensors(entry: str) -> list:
    import torch

    raw = base64.b64decode(entry)
    pairs = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    if not isinstance(pairs, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
        raise ValueError("serialized_named_tensors entry must hold a list of (name, tensor) pairs")
    return [(str(n), t) for n, t in pairs]


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

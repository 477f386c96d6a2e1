"""Flat weight buckets: the layout both ends of a streamed weight push agree on.

The trainer (``core/weight_source.py``) packs HF-named tensors into one flat ``uint8`` buffer per
bucket on its own device; the engine side (``core/weight_stream.py``) gets the buffer (a CUDA IPC
handle, a ``/dev/shm`` name, or a broadcast) and views it back as the named tensors. Only the
manifest below travels as data: names, dtypes, shapes and byte offsets. torch is imported lazily.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Every tensor starts at a multiple of this many bytes: any dtype view is aligned, and CUDA copies
# of aligned slices take the vectorised path.
ALIGN = 256


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int  # byte offset in the bucket's flat buffer

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)


@dataclass(frozen=True)
class BucketSpec:
    nbytes: int  # size of the flat buffer
    tensors: tuple[TensorSpec, ...] = field(default_factory=tuple)


def dtype_size(name: str) -> int:
    import torch

    return torch.empty((), dtype=torch_dtype(name)).element_size()


def torch_dtype(name: str):
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r}")
    return dtype


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_buckets(entries, bucket_bytes: int | None) -> list[BucketSpec]:
    """Group ``(name, dtype_name, shape)`` entries, in order, into buckets of at most ``bucket_bytes``
    (aligned offsets included); a tensor larger than that travels alone. ``None``/0: one bucket."""
    if bucket_bytes is not None and bucket_bytes < 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[BucketSpec] = []
    current: list[TensorSpec] = []
    size = 0
    seen: set[str] = set()
    for name, dtype, shape in entries:
        if name in seen:
            raise ValueError(f"weight {name!r} is listed twice")
        seen.add(name)
        spec = TensorSpec(name, dtype, tuple(int(d) for d in shape), 0)
        start = _aligned(size)
        if bucket_bytes and current and start + spec.nbytes > bucket_bytes:
            buckets.append(BucketSpec(size, tuple(current)))
            current, start = [], 0
        current.append(TensorSpec(spec.name, spec.dtype, spec.shape, start))
        size = start + spec.nbytes
    if current:
        buckets.append(BucketSpec(size, tuple(current)))
    return buckets


def pack(bucket: BucketSpec, sources, *, device=None, out=None):
    """The flat ``uint8`` buffer of ``bucket`` filled from ``sources[name]`` (tensors whose row-major
    order is the HF tensor's; any strides, any dtype: converted to the spec's). ``out``: a buffer to
    reuse (at least ``bucket.nbytes``)."""
    import torch

    flat = out if out is not None else torch.empty(max(1, bucket.nbytes), dtype=torch.uint8, device=device)
    with torch.no_grad():
        for spec in bucket.tensors:
            src = sources[spec.name]
            if src.numel() != spec.numel:
                raise ValueError(f"{spec.name!r}: source has {src.numel()} elements, the manifest says "
                                 f"{spec.numel} (shape {spec.shape})")
            dst = flat[spec.offset:spec.offset + spec.nbytes].view(torch_dtype(spec.dtype))
            # Viewed in the source's own shape, so a strided source (a slice of a fused megatron
            # tensor) is copied straight into place without a contiguous temporary.
            dst.view(src.shape).copy_(src)
    return flat


def unpack(bucket: BucketSpec, flat) -> list:
    """``[(name, tensor)]``: views into ``flat`` (no copy); drop them before the buffer goes."""
    if flat.numel() < bucket.nbytes:
        raise ValueError(f"bucket buffer has {flat.numel()} bytes, the manifest needs {bucket.nbytes}")
    return [(spec.name, flat[spec.offset:spec.offset + spec.nbytes].view(torch_dtype(spec.dtype)).view(spec.shape))
            for spec in bucket.tensors]


def manifest_entries(buckets: list[BucketSpec]) -> list[tuple[str, str, tuple[int, ...]]]:
    """Every ``(name, dtype, shape)`` of a push, in order (what the receiver checks before loading)."""
    return [(t.name, t.dtype, t.shape) for b in buckets for t in b.tensors]

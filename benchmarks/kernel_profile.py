"""CUDA kernel profiles for the benchmarks' ``--profile`` (train_throughput.py, hf_engine_throughput.py):
one call run under torch.profiler, its kernels summed by name and by group, and how much of the wall
time the GPU had work (kernel time / wall; streams that overlap can push it past 100%)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

KERNEL_GROUPS = (  # first match wins; names as the CUDA profiler reports them on H100 (cuBLAS, flash, NCCL, torch)
    ("nccl", r"nccl"),
    ("attention", r"flash|fmha|attention|varlen"),  # before gemm: flash kernels' names carry "cutlass::"
    ("compiled", r"^triton_"),  # torch.compile'd (inductor) fusions: RMSNorm, RoPE, SwiGLU, log-probs
    ("gemm", r"gemm|cutlass|nvjet|xmma|sm90_|cublas"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("copy/cast", r"copy|Memcpy|Memset|fill|CatArray|index|gather|scatter"),
    ("reduction", r"reduce|norm|softmax"),
    ("elementwise", r"elementwise|vectorized|unrolled"),
)


def kernel_groups(kernels: list[tuple[str, float, int]]) -> dict[str, float]:
    """Device milliseconds per kernel group (``KERNEL_GROUPS``; the rest is 'other'), largest first."""
    groups: dict[str, float] = {}
    for name, ms, _count in kernels:
        group = next((g for g, pattern in KERNEL_GROUPS if re.search(pattern, name, re.IGNORECASE)), "other")
        groups[group] = groups.get(group, 0.0) + ms
    return dict(sorted(groups.items(), key=lambda item: -item[1]))


def profile_cuda(run: Callable[[], object], *, top: int = 25) -> dict:
    """Run ``run()`` once under the CUDA profiler (it must synchronise before returning) ->
    ``{"wall_ms", "kernel_ms", "kernel_groups", "top_kernels": [(name, ms, calls)]}``."""
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
    wall_ms = (time.perf_counter() - start) * 1e3
    kernels = [(e.key, e.device_time_total / 1e3, e.count) for e in prof.key_averages() if e.device_time_total > 0]
    return {"wall_ms": wall_ms, "kernel_ms": sum(ms for _name, ms, _n in kernels),
            "kernel_groups": kernel_groups(kernels),
            "top_kernels": [(name[:90], ms, n) for name, ms, n in sorted(kernels, key=lambda k: -k[1])[:top]]}


def profile_lines(label: str, profiled: dict) -> list[str]:
    """The profile as printed lines: wall, kernel time and share, groups, then the top kernels."""
    lines = [f"{label}: profiled {profiled['wall_ms']:.0f} ms wall, {profiled['kernel_ms']:.0f} ms of kernels "
             f"({profiled['kernel_ms'] / profiled['wall_ms']:.0%} of the wall; streams overlap): "
             + ", ".join(f"{g} {ms:.0f}" for g, ms in profiled["kernel_groups"].items())]
    lines += [f"  {label:<16} {ms:9.1f} ms {count:6d}x  {name}" for name, ms, count in profiled["top_kernels"]]
    return lines

"""CUDA kernel profiles for the benchmarks' ``--profile`` (train_throughput.py, hf_engine_throughput.py):
one call run under torch.profiler, its kernels summed by name and by group, and how much of the wall
time the GPU had work (kernel time / wall; streams that overlap can push it past 100%). With
``origins``, each top kernel also names the torch ops and source lines that launched it (the profiler
links a kernel to the op that launched it when it records CPU ops too; ``with_stack`` gives the lines)."""

from __future__ import annotations

import functools
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


_INSTALLED_TORCH = re.compile(r"[/\\](site|dist)-packages[/\\]torch[/\\]")
# the profiler's Python stacks name files relative to the sys.path entry they were found under
# ("torch/nn/modules/linear.py(130): forward") and include entries that are no source line
# ("<built-in function linear>", "nn.Module: Linear_0")
_SOURCE_FRAME = re.compile(r"\.py\(\d+\)")


def kernel_groups(kernels: list[tuple[str, float, int]]) -> dict[str, float]:
    """Device milliseconds per kernel group (``KERNEL_GROUPS``; the rest is 'other'), largest first."""
    groups: dict[str, float] = {}
    for name, ms, _count in kernels:
        group = next((g for g, pattern in KERNEL_GROUPS if re.search(pattern, name, re.IGNORECASE)), "other")
        groups[group] = groups.get(group, 0.0) + ms
    return dict(sorted(groups.items(), key=lambda item: -item[1]))


def profile_cuda(run: Callable[[], object], *, top: int = 25, origins: bool = False) -> dict:
    """Run ``run()`` once under the CUDA profiler (it must synchronise before returning) ->
    ``{"wall_ms", "kernel_ms", "kernel_groups", "top_kernels": [(name, ms, calls)]}``, plus
    ``"origins": {kernel name: [(op @ source line, ms)]}`` for the top kernels with ``origins`` (CPU ops
    and stacks are recorded too, which slows the host: the wall time then means little)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if origins else [])
    start = time.perf_counter()
    with profile(activities=activities, **(stack_options() if origins else {})) as prof:
        run()
    wall_ms = (time.perf_counter() - start) * 1e3
    # kernels only: with CPU ops recorded, an op's device time repeats its kernels'
    kernels = [(e.key, e.device_time_total / 1e3, e.count) for e in prof.key_averages()
               if e.device_time_total > 0 and e.device_type == DeviceType.CUDA]
    ranked = sorted(kernels, key=lambda k: -k[1])[:top]
    result = {"wall_ms": wall_ms, "kernel_ms": sum(ms for _name, ms, _n in kernels),
              "kernel_groups": kernel_groups(kernels),
              "top_kernels": [(name[:90], ms, n) for name, ms, n in ranked]}
    events = prof.events()
    result["idle"] = device_idle(events)
    if origins:
        # by rank, as top_kernels: templated kernels can share the first 90 characters of their names
        found = kernel_origins(events, {name for name, _ms, _n in ranked})
        result["origins"] = [found.get(name, []) for name, _ms, _n in ranked]
    return result


def device_idle(events, top: int = 6, min_us: float = 20.0) -> dict:
    """Where the GPU had no work between the profiled call's first and last kernel (or copy):
    ``{"idle_ms", "gaps": [(ms, kernel after the gap, host op at its start, host op at its end)]}`` for
    the ``top`` longest gaps of at least ``min_us``, and ``"lead_ms"``, the host time before the first
    kernel. The host ops (innermost op @ source line, when CPU ops and stacks were recorded) say what
    the host was doing while the GPU waited: typically a sync at the gap's start and a launch at its end."""
    from torch.autograd import DeviceType

    device = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                    if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)
    if not device:
        return {"idle_ms": 0.0, "lead_ms": float("nan"), "gaps": []}
    host = [e for e in events if e.device_type == DeviceType.CPU and e.time_range.end > e.time_range.start]
    gaps, busy_until = [], device[0][1]
    for start, end, name in device[1:]:
        if start - busy_until >= min_us:
            gaps.append((busy_until, start, name))
        busy_until = max(busy_until, end)
    idle_us = sum(end - start for start, end, _ in gaps)
    lead_ms = (device[0][0] - min(e.time_range.start for e in host)) / 1e3 if host else float("nan")
    longest = sorted(gaps, key=lambda g: g[0] - g[1])[:top]
    return {"idle_ms": idle_us / 1e3, "lead_ms": lead_ms,
            "gaps": [((end - start) / 1e3, name[:60], host_op_at(host, start), host_op_at(host, end))
                     for start, end, name in longest]}


def host_op_at(host_events, t: float) -> str:
    """The innermost host op running at time ``t`` (µs) as ``op @ source line``; '-' when none or no
    CPU ops were recorded."""
    running = [e for e in host_events if e.time_range.start <= t <= e.time_range.end]
    if not running:
        return "-"
    inner = min(running, key=lambda e: e.time_range.end - e.time_range.start)
    with_stack = [e for e in running if e.stack]
    where = source_line(min(with_stack, key=lambda e: e.time_range.end - e.time_range.start).stack) if with_stack else "?"
    return f"{inner.name} @ {where}"


def stack_options() -> dict:
    """``torch.profiler.profile`` arguments that record each op's Python stack: ``with_stack`` alone
    records none on torch 2.11 to 2.13 (pytorch issue 100253); the verbose experimental config does."""
    from torch._C._profiler import _ExperimentalConfig

    return {"with_stack": True, "experimental_config": _ExperimentalConfig(verbose=True)}


@functools.cache
def _torch_root() -> str:
    import os

    import torch

    return os.path.dirname(torch.__file__) + os.sep


def in_torch_package(frame: str) -> bool:
    """Whether a profiler stack frame (``/path/file.py(line): function``) is torch's own code: under the
    imported torch's directory or an installed ``torch`` package (plugrl's ``backends/torch/`` is not)."""
    return (frame.startswith(_torch_root()) or frame.startswith(("torch/", "torch\\"))
            or _INSTALLED_TORCH.search(frame) is not None)


def source_line(stack: list[str] | None) -> str:
    """The innermost frame of ``stack`` outside torch itself (the model, plugrl or library code that
    called the op), else the innermost frame, else '?'."""
    frames = [f for f in stack or [] if _SOURCE_FRAME.search(f)]
    outside = [f for f in frames if not in_torch_package(f)]
    return (outside or frames or ["?"])[0]


def kernel_origins(events, names: set[str], per_kernel: int = 3) -> dict[str, list[tuple[str, float]]]:
    """For each kernel name in ``names``: the ``per_kernel`` (op @ source line) that launched most of its
    time, with their milliseconds. ``events``: the profiler's function events, whose CPU ops carry the
    kernels they launched (``.kernels``) and their Python stack (``.stack``)."""
    found: dict[str, dict[str, float]] = {}
    for event in events:
        for kernel in getattr(event, "kernels", None) or []:
            if kernel.name in names:
                where = f"{event.name} @ {source_line(event.stack)}"
                found.setdefault(kernel.name, {})
                found[kernel.name][where] = found[kernel.name].get(where, 0.0) + kernel.duration / 1e3
    return {name: sorted(by_origin.items(), key=lambda item: -item[1])[:per_kernel]
            for name, by_origin in found.items()}


def profile_lines(label: str, profiled: dict) -> list[str]:
    """The profile as printed lines: wall, kernel time and share, groups, then the top kernels."""
    lines = [f"{label}: profiled {profiled['wall_ms']:.0f} ms wall, {profiled['kernel_ms']:.0f} ms of kernels "
             f"({profiled['kernel_ms'] / profiled['wall_ms']:.0%} of the wall; streams overlap): "
             + ", ".join(f"{g} {ms:.0f}" for g, ms in profiled["kernel_groups"].items())]
    idle = profiled.get("idle")
    if idle:
        lines.append(f"  {label:<16} GPU idle {idle['idle_ms']:.1f} ms between its first and last kernel"
                     f" ({len(idle['gaps'])} longest gaps below); host before the first kernel {idle['lead_ms']:.1f} ms")
        lines += [f"  {'':<16} gap {ms:7.2f} ms before {name}; host: {at_start} -> {at_end}"
                  for ms, name, at_start, at_end in idle["gaps"]]
    origins = profiled.get("origins") or [[] for _ in profiled["top_kernels"]]
    for (name, ms, count), launched_by in zip(profiled["top_kernels"], origins):
        lines.append(f"  {label:<16} {ms:9.1f} ms {count:6d}x  {name}")
        lines += [f"  {'':<16} {where_ms:9.1f} ms  <- {where}" for where, where_ms in launched_by]
    return lines

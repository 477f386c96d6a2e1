"""``benchmarks/kernel_profile.py``'s attribution of kernels to the ops and source lines that launched
them (``--profile-origins``), on profiler function events built here: torch's own ``FunctionEvent``
with kernels appended the way the profiler links a launching op to its CUDA kernels."""

import sys
from pathlib import Path

from torch.autograd.profiler_util import FunctionEvent

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from kernel_profile import device_idle, kernel_origins, profile_lines, source_line, stack_options  # noqa: E402


def _op(name, stack, kernels, event_id):
    event = FunctionEvent(id=event_id, name=name, thread=0, start_us=0, end_us=1, stack=stack)
    for kernel, duration_us in kernels:
        event.append_kernel(kernel, 0, duration_us)
    return event


def test_source_line_skips_torch_frames_but_not_plugrls_torch_backend():
    import os

    import torch

    root = os.path.dirname(torch.__file__)
    ours = "/w/plugrl/plugins/backends/torch/fused_log_probs.py(55): slice_logits"
    assert source_line([f"{root}/nn/functional.py(10): f", ours, "/m/modeling_qwen3.py(88): forward"]) == ours
    assert source_line(["/x/site-packages/torch/nn/functional.py(10): f", "/m/modeling_qwen3.py(88): forward"]) \
        == "/m/modeling_qwen3.py(88): forward"
    assert source_line(["/x/site-packages/torch/a.py(1): g"]) == "/x/site-packages/torch/a.py(1): g"
    assert source_line(None) == source_line([]) == "?"
    # the verbose profiler's stacks: paths relative to their sys.path entry, and entries that are no line
    assert source_line(["<built-in function linear>", "torch/nn/modules/linear.py(130): forward",
                        "nn.Module: Linear_0", "plugrl/plugins/backends/torch/trainer.py(203): _forward_response"]) \
        == "plugrl/plugins/backends/torch/trainer.py(203): _forward_response"
    assert source_line(["<built-in function linear>", "torch/nn/modules/linear.py(130): forward"]) \
        == "torch/nn/modules/linear.py(130): forward"


def test_kernels_are_attributed_to_their_launching_ops_by_time():
    attention = ["/p/plugins/backends/packed_attention.py(60): attention_within_segments"]
    rope = ["/x/site-packages/torch/autograd/function.py(5): apply", "/l/liger_kernel/ops/rope.py(40): rope_forward"]
    events = [
        _op("aten::copy_", attention, [("copy_kernel", 300.0), ("other", 5.0)], 1),
        _op("aten::copy_", attention, [("copy_kernel", 200.0)], 2),
        _op("aten::clone", rope, [("copy_kernel", 100.0)], 3),
        _op("aten::mm", rope, [("gemm", 1000.0)], 4),
        _op("aten::empty", rope, [], 5),
    ]
    found = kernel_origins(events, {"copy_kernel", "gemm"}, per_kernel=2)
    assert set(found) == {"copy_kernel", "gemm"}  # a kernel outside the names ("other") is left out
    assert found["copy_kernel"] == [(f"aten::copy_ @ {attention[0]}", 0.5), (f"aten::clone @ {rope[1]}", 0.1)]
    assert found["gemm"] == [(f"aten::mm @ {rope[1]}", 1.0)]
    assert kernel_origins(events, {"copy_kernel"}, per_kernel=1)["copy_kernel"] == [(f"aten::copy_ @ {attention[0]}", 0.5)]

    profiled = {"wall_ms": 10.0, "kernel_ms": 1.6, "kernel_groups": {"gemm": 1.0, "copy/cast": 0.6},
                "top_kernels": [("gemm", 1.0, 1), ("copy_kernel", 0.6, 3)],
                "origins": [found["gemm"], found["copy_kernel"]]}  # by rank, as profile_cuda gives them
    lines = profile_lines("torch", profiled)
    at = lines.index(next(line for line in lines if line.endswith("copy_kernel")))
    assert "<- aten::copy_ @" in lines[at + 1] and "0.5 ms" in lines[at + 1]
    assert "<- aten::clone @" in lines[at + 2]


def _timed(name, start_us, end_us, device, stack=None):
    from torch.autograd import DeviceType

    return FunctionEvent(id=0, name=name, thread=0, start_us=start_us, end_us=end_us, stack=stack,
                         device_type=DeviceType.CUDA if device else DeviceType.CPU)


def test_device_idle_sums_the_gaps_between_kernels_and_names_the_host_ops_around_them():
    sync_line = ["/p/core/rl_step.py(197): run_rl_steps"]
    launch_line = ["/p/plugins/backends/torch/trainer.py(323): finish_step"]
    events = [
        _timed("python step", 0, 1000, device=False, stack=["/b/train_throughput.py(9): step"]),
        _timed("aten::item", 380, 420, device=False, stack=sync_line),
        _timed("cudaStreamSynchronize", 385, 415, device=False),  # innermost at the gap's start, no stack
        _timed("aten::_fused_adamw_", 590, 640, device=False, stack=launch_line),
        _timed("gemm", 100, 300, device=True),
        _timed("copy", 250, 400, device=True),   # overlaps the gemm: no gap between them
        _timed("small", 410, 400 + 10 + 5, device=True),  # 10 us after: below min_us, not a gap
        _timed("adam", 600, 700, device=True),   # 185 us after "small" ends at 415
        _timed("norm", 730, 800, device=True),   # 30 us gap
    ]
    idle = device_idle(events, top=1)
    assert abs(idle["idle_ms"] - (0.185 + 0.030)) < 1e-9  # gaps of >= 20 us only
    assert abs(idle["lead_ms"] - 0.1) < 1e-9               # host ran 100 us before the first kernel
    assert len(idle["gaps"]) == 1
    ms, after, at_start, at_end = idle["gaps"][0]
    assert abs(ms - 0.185) < 1e-9 and after == "adam"
    # the gap starts at 415 (cudaStreamSynchronize runs then, under aten::item) and ends at 600 (the launch)
    assert at_start == f"cudaStreamSynchronize @ {sync_line[0]}"
    assert at_end == f"aten::_fused_adamw_ @ {launch_line[0]}"
    assert device_idle([])["gaps"] == [] and device_idle([])["idle_ms"] == 0.0

    lines = profile_lines("torch", {"wall_ms": 1.0, "kernel_ms": 0.5, "kernel_groups": {}, "top_kernels": [],
                                    "idle": idle})
    assert "GPU idle 0.2 ms" in lines[1] and "before adam" in lines[2] and "aten::_fused_adamw_" in lines[2]


def _linear_here(layer, x):
    return layer(x)  # the line the profiled op must be attributed to


def test_the_recorded_stacks_name_the_calling_line_outside_torch():
    """A real profile (CPU ops) with ``stack_options``: the op a linear layer runs is attributed to the line
    in this file that called the layer, past torch's own frames."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    layer = torch.nn.Linear(8, 8)
    with profile(activities=[ProfilerActivity.CPU], **stack_options()) as prof:
        _linear_here(layer, torch.randn(2, 8))
    lines = {source_line(e.stack) for e in prof.events() if e.name == "aten::addmm"}
    assert len(lines) == 1 and "test_kernel_profile.py(" in lines.pop()

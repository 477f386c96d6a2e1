"""``benchmarks/kernel_profile.py``'s attribution of kernels to the ops and source lines that launched
them (``--profile-origins``), on profiler function events built here: torch's own ``FunctionEvent``
with kernels appended the way the profiler links a launching op to its CUDA kernels."""

import sys
from pathlib import Path

from torch.autograd.profiler_util import FunctionEvent

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from kernel_profile import kernel_origins, profile_lines, source_line  # noqa: E402


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

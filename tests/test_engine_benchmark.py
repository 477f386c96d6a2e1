"""benchmarks/hf_engine_throughput.py on CPU (the tiny model): the table and, per batch size, where
the timed pass's time went (the engine's stats() split), whose phases fit in the pass's wall time, for
one engine per --decode-attention value;
and benchmarks/kernel_profile.py's grouping of CUDA kernel names."""

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_engine_benchmark_prints_each_passes_time_split():
    proc = subprocess.run([sys.executable, str(BENCH / "hf_engine_throughput.py"), "--model", "tiny", "--device", "cpu",
                           "--batch-sizes", "1,8", "--new-tokens", "12", "--decode-attention", "sdpa,matmul"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    splits = re.findall(r"^\s+(\d+) prefill ([\d.]+) ms \| per decode step: launch ([\d.]+) ms, wait ([\d.]+) ms, "
                        r"host ([\d.]+) ms \| outside the decode thread's phases (-?[\d.]+) s of ([\d.]+) s$",
                        proc.stdout, re.MULTILINE)
    assert [int(s[0]) for s in splits] == [1, 8, 1, 8], proc.stdout  # one engine per decode attention
    rows = re.findall(r"^\s+(sdpa|matmul)\s+(\d+)\s+([\d,]+)\s", proc.stdout, re.MULTILINE)
    assert [(name, int(batch)) for name, batch, _ in rows] == [("sdpa", 1), ("sdpa", 8), ("matmul", 1), ("matmul", 8)]
    for _batch, prefill, launch, _wait, _host, outside, wall in splits:
        assert float(prefill) > 0 and float(launch) > 0  # on CPU the launch is the whole forward
        assert float(outside) >= -0.01 and float(outside) <= float(wall)  # printed to 0.01 s


def test_kernel_names_fall_into_their_groups():
    sys.path.insert(0, str(BENCH))
    try:
        from kernel_profile import kernel_groups
    finally:
        sys.path.pop(0)
    kernels = [("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNN", 10.0, 3),
               ("void flash::flash_fwd_kernel<cutlass::bfloat16_t>", 4.0, 2),
               ("void at::native::vectorized_elementwise_kernel<4, at::native::AddFunctor<float>>", 2.5, 9),
               ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>", 1.5, 1),
               ("triton_red_fused_add_mean_mul_pow_rsqrt_0", 1.0, 4),
               ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 0.5, 1),
               ("some_custom_kernel", 0.25, 1)]
    assert kernel_groups(kernels) == {"gemm": 10.0, "attention": 4.0, "elementwise": 2.5, "reduction": 1.5,
                                      "compiled": 1.0, "nccl": 0.5, "other": 0.25}

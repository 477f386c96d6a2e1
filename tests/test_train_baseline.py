"""The baseline rows of benchmarks/train_throughput.py (benchmarks/hf_train_baseline.py) on CPU: the
mechanics only (CPU numbers mean nothing); the memory split of a megatron row is closed-form arithmetic."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_transformers_row_trains_the_same_checkpoint_and_is_the_ratio_base(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(BENCH / "train_throughput.py"), "--model", "tiny", "--device", "cpu",
                           "--tokens", "128", "--samples", "2", "--response", "16", "--steps", "1",
                           "--backends", "transformers,torch", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["backend"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"transformers", "torch"}
    assert rows["transformers"]["baseline"] and "baseline" not in rows["torch"]
    assert rows["transformers"]["params"] == rows["torch"]["params"]  # the same model
    assert rows["transformers"]["tokens"] == 128
    line = next(l for l in proc.stdout.splitlines() if l.startswith("transformers "))
    assert line.rstrip().endswith("1.00x")  # the only baseline is its own reference


def test_liger_row_is_refused_on_cpu_with_its_reason(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "train_throughput.py"), "--model", "tiny", "--device", "cpu",
                           "--tokens", "128", "--samples", "2", "--steps", "1", "--backends", "transformers+liger"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert "needs --device cuda" in proc.stderr


def test_megatron_memory_parts_add_up_to_the_peak():
    sys.path.insert(0, str(BENCH))
    try:
        from hf_train_baseline import megatron_memory_parts
    finally:
        sys.path.pop(0)
    n = 4 * 2**30  # 4 Gi parameters: bytes per parameter read directly as GiB
    parts = megatron_memory_parts(n, 100.0)
    assert parts == pytest.approx({"weights": 8.0, "grads": 16.0, "master+adam": 48.0, "activations+other": 28.0})
    sharded = megatron_memory_parts(n, 60.0, fp32_grads=False, distributed_optimizer_dp=4)
    assert sharded == pytest.approx({"weights": 8.0, "grads": 8.0, "master+adam": 12.0, "activations+other": 32.0})

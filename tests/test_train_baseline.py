"""The baseline rows of benchmarks/train_throughput.py (benchmarks/hf_train_baseline.py) on CPU: the
mechanics only (CPU numbers mean nothing) and the memory parts each row measures."""

import json
import subprocess
import sys
from pathlib import Path


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
    # memory measured at an optimizer step, fp32 on CPU: 4 bytes per parameter for weights and grads,
    # Adam's two moments (8 bytes) plus a step count per tensor; neither keeps a master copy
    n = rows["torch"]["params"]
    for row in rows.values():
        parts = row["state_bytes"]
        assert (parts["weights"], parts["grads"], parts["master_weights"]) == (4 * n, 4 * n, 0)
        assert 8 * n <= parts["optimizer_state"] <= 8 * n + 8 * 64
    assert "memory by part at an optimizer step" in proc.stdout
    assert rows["transformers"]["tokens"] == 128
    line = next(l for l in proc.stdout.splitlines() if l.startswith("transformers "))
    assert line.rstrip().endswith("1.00x")  # the only baseline is its own reference


def test_liger_row_is_refused_on_cpu_with_its_reason(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "train_throughput.py"), "--model", "tiny", "--device", "cpu",
                           "--tokens", "128", "--samples", "2", "--steps", "1", "--backends", "transformers+liger"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert "needs --device cuda" in proc.stderr

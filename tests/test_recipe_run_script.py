"""benchmarks/recipe_run.sh (the 8-GPU run of the Qwen3-4B recipe) on CPU with the tiny model: the
dry run checks every command it would start (config, placement, the converted checkpoint), and one
real CPU run goes through the same loop and ends with recipe_report's table."""

import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("megatron.core", reason="megatron-core not installed (plugrl[megatron])")

ROOT = Path(__file__).resolve().parents[1]


def _script(tmp_path, *args, **env):
    return subprocess.run(["bash", "benchmarks/recipe_run.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, check=False, env={**os.environ, "OUT": str(tmp_path), "MODEL": "tiny", **env})


def test_dry_run_of_every_command(tmp_path):
    # (the tiny model's context is 256 tokens: the 4B runs' 1024-token responses would not fit it)
    proc = _script(tmp_path, DRY_RUN="1", RESPONSE="64")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    out = proc.stdout
    assert [line for line in out.splitlines() if " rc " in line] == [
        "colocated-tp2 rc 0", "colocated-tp1 rc 0", "decoupled-tp2 rc 0"]
    assert out.count("# ready: every path and package this run needs is here") == 3
    assert "TP 2 × PP 1 × CP 1 → DP 4, sequence parallel" in out  # the recipe on 8 GPUs
    assert "TP 1 × PP 1 × CP 1 → DP 8" in out
    assert "2 train GPUs, 6 rollout GPUs (offset 2)" in out
    assert out.count("recipe values dropped (their plugin was replaced): --sglang-mem-fraction-static") == 3
    assert (tmp_path / ".tiny_torch_dist.done").exists()  # the guide's convert step ran
    # ENGINE=serve keeps the recipe's sglang backend (plugrl serve engines behind the real router)
    proc = _script(tmp_path, DRY_RUN="1", ENGINE="serve", RUNS="colocated-tp2", RESPONSE="64")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "rollout: sglang backend, 8 engines × 1 GPU" in proc.stdout and "recipe values dropped" not in proc.stdout


def test_a_cpu_run_ends_with_the_report(tmp_path):
    proc = _script(tmp_path, "2", RUNS="colocated-tp2", GPUS="2", RESPONSE="8",
                   EXTRA="--attention-backend auto --rollout-batch-size 4 --global-batch-size 32")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| colocated-tp2 |")]
    assert len(rows) == 1, proc.stdout
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1:5] == ["colocated", "2", "2", "1"]  # placement, train GPUs, TP, measured steps
    assert float(cells[5]) > 0 and int(cells[12].replace(",", "")) > 0  # step seconds, train tokens/s per GPU

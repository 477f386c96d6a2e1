"""``benchmarks/step_breakdown.py``: the per-phase arithmetic on hand-made metrics rows (sync and async
loop), and once on a real short run, the timers' nesting in the driver loop."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_breakdown.py"


@pytest.fixture(scope="module")
def sb():
    spec = importlib.util.spec_from_file_location("step_breakdown", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(rollout_id, time, **seconds):
    return {"rollout_id": rollout_id, "phase": "train", "time": time,
            **{f"perf/{name}_time": value for name, value in seconds.items()}}


# Sync loop. Rollout 0 is warm-up (skipped). Rollout 1: generate 1.0 inside rollout 1.05 inside
# wait 1.1; train 2.0, sync 0.1, eval 0.5, step 3.75 -> loop other 0.05, overhead 0.15 (0.05 to batch
# + 0.05 hand-off + 0.05 loop). Rollout 2: no eval, step 3.25 -> the same three 0.05s.
SYNC_ROWS = [
    {"rollout_id": -1, "phase": "eval", "time": 90.0, "eval/x/time": 9.0},
    _row(0, 100.0, generate=1.0, rollout=1.1, wait_rollout=1.2, train=9.0, weight_sync=0.1, step=10.4),
    _row(1, 103.8, generate=1.0, rollout=1.05, wait_rollout=1.1, train=2.0, weight_sync=0.1, eval=0.5, step=3.75),
    _row(2, 107.1, generate=0.8, rollout=0.85, wait_rollout=0.9, train=2.2, weight_sync=0.1, step=3.25),
]


def test_sync_breakdown_matches_hand_arithmetic(sb):
    rows = sb.step_rows(SYNC_ROWS, skip_first=1)
    assert [r["rollout_id"] for r in rows] == [1, 2]
    result = sb.breakdown(rows, async_train=False)
    phases = result["phases"]
    assert phases["generate"] == [1.0, 0.8]
    assert phases["eval"] == [0.5, 0.0] and phases["offload"] == [0.0, 0.0]
    for name in ("rollout to batch", "rollout hand-off", "loop other"):
        assert phases[name] == pytest.approx([0.05, 0.05]), name
    assert result["overhead"] == pytest.approx([0.15, 0.15])
    assert result["step"] == [3.75, 3.25]
    # Time outside the steps, between measured rows only: 107.1 - 103.8 - 3.25.
    assert result["between"] == pytest.approx([0.05])
    # The phases in the sum partition the step exactly.
    total = [sum(phases[n][i] for n in result["in_sum"]) for i in range(2)]
    assert total == pytest.approx(result["step"])
    assert result["reference"] == []


def test_async_breakdown_keeps_overlapped_generation_out_of_the_sum(sb):
    rows = [_row(3, 50.0, generate=1.5, rollout=1.6, wait_rollout=0.01, train=2.0, weight_sync=0.1, step=2.2),
            _row(4, 52.3, generate=1.4, rollout=1.5, wait_rollout=0.31, train=2.0, weight_sync=0.1, step=2.5)]
    result = sb.breakdown(sb.step_rows(rows), async_train=True)
    assert result["overhead"] == pytest.approx([0.09, 0.09])  # step - wait - train - sync
    assert result["phases"]["loop other"] == pytest.approx([0.09, 0.09])
    assert result["reference"] == ["generate (overlapped)"]
    assert "generate" not in result["in_sum"] and "wait_rollout" in result["in_sum"]
    assert result["between"] == pytest.approx([52.3 - 50.0 - 2.5])


def test_resumed_rows_keep_the_last_line_per_rollout(sb):
    rows = [_row(0, 1.0, step=5.0), _row(1, 2.0, step=6.0), _row(1, 9.0, step=7.0), _row(2, 10.0, step=1.0)]
    kept = sb.step_rows(rows)
    assert [(r["rollout_id"], r["perf/step_time"]) for r in kept] == [(0, 5.0), (1, 7.0), (2, 1.0)]
    with pytest.raises(ValueError, match="no train rows"):
        sb.breakdown(sb.step_rows([{"rollout_id": 0, "phase": "eval", "time": 1.0}]), async_train=False)


def test_table_and_run_dir_mode(sb, tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SYNC_ROWS))
    (tmp_path / "config.yaml").write_text("async_train: false\ntrain_backend: torch\n")
    assert sb.main(["--run-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "sync loop, train backend torch" in out and "2 rollouts measured" in out
    lines = {line.split("|")[1].strip(): line.split("|")[2:4] for line in out.splitlines() if line.startswith("| ")}
    assert "offload" not in lines  # never happened in this run
    median, share = (cell.strip() for cell in lines["**framework overhead**"])
    assert float(median) == pytest.approx(0.15) and share == f"{0.30 / 7.0:.1%}"
    assert lines["eval"][1].strip() == f"{0.5 / 7.0:.1%}"


@pytest.mark.slow
def test_real_run_timers_nest_inside_the_step(sb, tmp_path):
    """A short real run with an eval every rollout: every timer the loop logs lies inside the step
    and they do not overlap (so loop other >= 0), the rollout manager's generate lies inside the
    driver's wait, its eval inside the driver's eval."""
    env = {**os.environ, "PLUGRL_CACHE": str(tmp_path / "cache"), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--num-rollout", "3", "--output-dir", str(run), "--skip-first", "0",
         "--", "--sft-warmup-steps", "0", "--eval-interval", "1", "--rollout-batch-size", "4",
         "--n-samples-per-prompt", "2", "--global-batch-size", "8", "--micro-batch-size", "8"],
        env=env, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "**framework overhead**" in result.stdout and "| eval " in result.stdout
    from plugrl.core.metrics import read_metrics

    rows = sb.step_rows(read_metrics(run / "metrics.jsonl"))
    assert [r["rollout_id"] for r in rows] == [0, 1, 2]
    for row in rows:
        parts = sum(row[f"perf/{n}_time"] for n in ("wait_rollout", "train", "weight_sync", "eval"))
        assert 0 <= parts <= row["perf/step_time"], row
        assert row["perf/generate_time"] <= row["perf/rollout_time"] <= row["perf/wait_rollout_time"]
        assert 0 < row["eval/toy_math/time"] <= row["perf/eval_time"]
        # the engine's own counters for this rollout: at least every kept response token was decoded
        # by it, and its decode thread's seconds lie inside the rollout
        kept_tokens = row["rollout/response_len"] * row["rollout/num_samples"]
        assert row["perf/engine_generated_tokens"] >= kept_tokens - 0.5, row
        assert row["perf/engine_decode_steps"] >= 1
        engine_s = sum(row[f"perf/engine_{k}"] for k in ("prefill_s", "decode_launch_s", "decode_wait_s",
                                                          "decode_host_s"))
        assert 0 < engine_s <= row["perf/rollout_time"], row

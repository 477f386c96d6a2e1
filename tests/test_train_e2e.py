"""End to end: ``plugrl train`` on the embedded default (real Ray, real tokenizer, a real HF
checkpoint directory built locally), shortened; then resume from its checkpoint and report."""

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from plugrl.core.metrics import format_number

from .test_resume import kill_session

pytestmark = pytest.mark.slow

PLUGRL = [sys.executable, "-m", "plugrl.core.cli"]

# Limits only a hang reaches: a run prints a line at least every 30 s while it works (rollout lines,
# progress lines outside a terminal, model-build and warm-up lines), so 15 silent minutes mean it is
# stuck, however slow a shared machine makes each step. The total cap only bounds a run that keeps
# printing yet never ends.
STALL_S = 900
TOTAL_S = 4 * 3600


def run_plugrl(args, env, stall=STALL_S, total=TOTAL_S) -> subprocess.CompletedProcess:
    """``plugrl ARGS`` to completion; killed with every process of its session (Ray's too) after
    ``stall`` seconds without output or ``total`` seconds in all, then the assertion says which."""
    proc = subprocess.Popen(PLUGRL + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    out: dict[str, list[str]] = {"stdout": [], "stderr": []}
    last = [time.monotonic()]

    def pump(stream, lines):
        for line in stream:
            lines.append(line)
            last[0] = time.monotonic()

    readers = [threading.Thread(target=pump, args=(proc.stdout, out["stdout"]), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, out["stderr"]), daemon=True)]
    for reader in readers:
        reader.start()
    started, why = time.monotonic(), None
    while proc.poll() is None:
        now = time.monotonic()
        if now - last[0] > stall:
            why = f"no output for {stall} s (a hang)"
        elif now - started > total:
            why = f"still running after {total} s"
        if why:
            kill_session(proc.pid)
            break
        time.sleep(1)
    proc.wait()
    for reader in readers:
        reader.join(timeout=10)
    stdout, stderr = "".join(out["stdout"]), "".join(out["stderr"])
    assert why is None, f"plugrl {' '.join(args)}: {why}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def eval_accuracies(metrics_path: Path) -> list[float]:
    values = []
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line)
        if "eval/toy_math/pass@1" in row:
            values.append(row["eval/toy_math/pass@1"])
    return values


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "PLUGRL_CACHE": str(cache), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, env):
    run_dir = tmp_path_factory.mktemp("run")
    result = run_plugrl(["train", "--num-rollout", "100", "--eval-interval", "100", "--seed", "1234",
                         "--output-dir", str(run_dir), "--save", str(run_dir / "ckpt"), "--save-interval", "100"], env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, result


def test_default_run_learns(trained_run):
    run_dir, result = trained_run
    accuracies = eval_accuracies(run_dir / "metrics.jsonl")
    assert len(accuracies) == 2, accuracies
    first, last = accuracies
    # Chance-level start; run-to-run spread of the gain is well under 0.1 (see README), so +0.3 is
    # far above noise.
    assert last - first >= 0.3, (first, last)
    assert "first eval" in result.stdout and "last eval" in result.stdout
    # the accuracy before training is printed when it is measured, as the metrics file records it
    assert f"before training | toy_math acc {format_number(first)}\n" in result.stdout
    assert "Loading weights" not in result.stderr  # the actors' HF progress bars are off (Ray delivers them late)


def test_run_directory_has_config_metrics_and_checkpoint(trained_run):
    import yaml

    run_dir, _ = trained_run
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["rm_type"] == "deepscaler" and config["advantage_estimator"] == "grpo"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["phase"] == "train"]
    assert [r["rollout_id"] for r in train_rows] == list(range(100))
    assert all("train/loss" in r and "rollout/raw_reward" in r for r in train_rows)
    # prompt + response tokens: more than the responses alone (mean response length x samples)
    samples = config["rollout_batch_size"] * config["n_samples_per_prompt"]
    assert all(isinstance(r["train/tokens"], int) and r["train/tokens"] > r["rollout/response_len"] * samples
               for r in train_rows)
    latest = (run_dir / "ckpt" / "latest").read_text().strip()
    assert latest == "rollout_000099"
    checkpoint = run_dir / "ckpt" / latest
    assert (checkpoint / "train_state.pt").exists() and (checkpoint / "rollout_state.json").exists()


def test_report_from_the_run(trained_run, env):
    run_dir, _ = trained_run
    result = run_plugrl(["report", str(run_dir)], env)
    assert result.returncode == 0, result.stderr
    assert (run_dir / "report.png").stat().st_size > 1000
    assert "raw_reward" in (run_dir / "report.md").read_text()


def test_async_loop_generates_each_rollout_with_weights_one_step_old(tmp_path, env):
    """--async: rollout k + 1 is generated while k trains, with the weights pushed after step k - 1
    (the sync loop uses the weights after step k - 1 for rollout k, i.e. version k)."""
    args = ["train", "--async", "--num-rollout", "5", "--sft-warmup-steps", "20", "--rollout-batch-size", "4",
            "--n-samples-per-prompt", "4", "--global-batch-size", "16", "--eval-interval", "0"]
    rows = {}
    for mode in ("async", "sync"):
        out = tmp_path / mode
        command = [a for a in args if mode == "async" or a != "--async"] + ["--output-dir", str(out)]
        command += ["--log-interval", "2"] if mode == "sync" else []
        result = run_plugrl(command, env)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        printed = [int(m.group(1)) for m in re.finditer(r"^rollout (\d+) \| ", result.stdout, re.MULTILINE)]
        # --log-interval 2: every second rollout's console line, and the last (metrics.jsonl has all)
        assert printed == ([1, 3, 4] if mode == "sync" else [0, 1, 2, 3, 4]), printed
        rows[mode] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                      if json.loads(line)["phase"] == "train"]
    versions = {mode: [(r["rollout/weight_version_min"], r["rollout/weight_version_max"]) for r in rs]
                for mode, rs in rows.items()}
    assert versions["sync"] == [(k, k) for k in range(5)]
    assert versions["async"] == [(0, 0)] + [(k - 1, k - 1) for k in range(1, 5)]


def test_a_dying_engine_gives_a_clear_error_and_keeps_what_was_produced(tmp_path, env):
    """The rollout manager process (which owns the engine) dies in rollout 3: the run stops with a
    message naming it, and the metrics and checkpoints written before stay."""
    (tmp_path / "dying_reward.py").write_text(
        "import os\n"
        "def reward(sample):\n"
        "    if sample.group_index is not None and sample.group_index >= 12:\n"
        "        os._exit(3)  # the whole rollout-manager process goes away, as in an engine crash\n"
        "    return float(sample.index % 2)\n"
    )
    out = tmp_path / "run"
    result = run_plugrl(
        ["train", "--num-rollout", "6", "--sft-warmup-steps", "5", "--rollout-batch-size", "4",
         "--n-samples-per-prompt", "2", "--global-batch-size", "8", "--eval-interval", "0",
         "--custom-rm-path", "dying_reward:reward", "--output-dir", str(out), "--save", str(out / "ckpt"),
         "--save-interval", "1"],
        {**env, "PYTHONPATH": f"{tmp_path}{os.pathsep}{env.get('PYTHONPATH', '')}"})
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "rollout manager" in result.stderr and "process died" in result.stderr
    assert f"--load {out / 'ckpt'}" in result.stderr
    train_rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line)["phase"] == "train"]
    assert [r["rollout_id"] for r in train_rows] == [0, 1, 2]
    assert (out / "ckpt" / "latest").read_text().strip() == "rollout_000002"


def test_save_hf_exports_with_each_checkpoint_and_at_the_end(tmp_path, env):
    """--save-hf PATTERN (slime): a transformers checkpoint at PATTERN.format(rollout_id=...) with every
    checkpoint (--save-interval 2 of 3 rollouts: after rollouts 1 and 2, the last) and, without --save,
    once at the end. Each export holds the weights of the checkpoint written with it."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "run"
    result = run_plugrl(["train", "--num-rollout", "3", "--sft-warmup-steps", "5", "--rollout-batch-size", "4",
                         "--n-samples-per-prompt", "2", "--global-batch-size", "8", "--eval-interval", "0",
                         "--output-dir", str(out), "--save", str(out / "ckpt"), "--save-interval", "2",
                         "--save-hf", str(out / "hf_{rollout_id}")], env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert sorted(p.name for p in out.glob("hf_*")) == ["hf_1", "hf_2"]
    assert sorted(p.name for p in (out / "ckpt").glob("rollout_*")) == ["rollout_000001", "rollout_000002"]
    for rollout_id in (1, 2):  # each export holds the weights of the checkpoint written with it
        exported = load_file(out / f"hf_{rollout_id}" / "model.safetensors")
        saved = torch.load(out / "ckpt" / f"rollout_{rollout_id:06d}" / "train_state.pt", map_location="cpu",
                           weights_only=False)["model"]
        assert exported and set(exported) <= set(saved)
        assert all(exported[name].equal(saved[name].to(exported[name].dtype)) for name in exported), rollout_id
    assert f"--save-hf: wrote {out / 'hf_2'}" in result.stdout

    alone = tmp_path / "alone"
    result = run_plugrl(["train", "--num-rollout", "2", "--sft-warmup-steps", "0", "--rollout-batch-size", "4",
                         "--n-samples-per-prompt", "2", "--global-batch-size", "8", "--eval-interval", "0",
                         "--output-dir", str(alone), "--save-hf", str(alone / "hf_{rollout_id}")], env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert [p.name for p in alone.glob("hf_*")] == ["hf_1"]

"""Kill and resume as a user meets it: SIGKILL the whole run (its process group and every Ray process
of its session) right after a checkpoint, and again in the middle of a checkpoint write, resuming each
time with ``--load``. The rollout ids continue, metrics.jsonl misses and repeats none, the
partial-rollout buffer comes back as saved, and the interrupted write never replaces the last good
checkpoint.

The buffer policy is an installed third-party plugin (module + dist-info on PYTHONPATH, found through
its entry point); its ``state_dict`` holds the checkpoint write open on request, which is how the test
kills inside a write without timing luck.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plugrl.core.checkpoint import LOCK_NAME

from .test_resume import finish, latest_id, session_pids

pytestmark = pytest.mark.slow

PLUGRL = [sys.executable, "-m", "plugrl.core.cli"]

PROBE_PLUGIN = '''
"""A FIFO partial-rollout buffer that logs what it restores and can hold a checkpoint write open."""
import glob, json, os, time

from plugrl import Sample, hookimpl


class ProbeFifo:
    def __init__(self, n_samples_per_prompt=None, **options):
        self.n = n_samples_per_prompt
        self.groups = []

    def add(self, groups):
        self.groups.extend(list(g) for g in groups)

    def take(self, n, rollout_id=None):
        taken, self.groups = self.groups[:n], self.groups[n:]
        return taken

    def __len__(self):
        return len(self.groups)

    def state_dict(self):
        _hold_if_asked()
        return {"groups": [[s.to_dict() for s in g] for g in self.groups]}

    def load_state_dict(self, state):
        self.groups = [[Sample.from_dict(d) for d in g] for g in state["groups"]]
        with open(os.environ["PROBE_LOG"], "a") as f:
            f.write(json.dumps({"restored": state}) + "\\n")


def _hold_if_asked():
    """Inside a checkpoint write of rollout >= PROBE_HOLD_FROM (its temp folder already holds the
    trainer's files), say so and wait to be killed."""
    hold_from = os.environ.get("PROBE_HOLD_FROM")
    if not hold_from:
        return
    for tmp in glob.glob(os.path.join(os.environ["PROBE_SAVE"], ".rollout_*")):
        rollout_id = int(os.path.basename(tmp).split(".")[1].split("_")[1])
        if rollout_id >= int(hold_from) and os.listdir(tmp):
            with open(os.environ["PROBE_HELD"], "w") as f:
                f.write(str(rollout_id))
            time.sleep(600)


@hookimpl
def plugrl_register_buffer_policies(register):
    register("probe_fifo", ProbeFifo, description="FIFO that logs restores (test probe)")
'''

NUM_ROLLOUT = 6


def install_probe(site: Path) -> None:
    """The plugin as pip leaves it: a module and a dist-info with the entry point."""
    site.mkdir(parents=True)
    (site / "plugrl_probe_fifo.py").write_text(PROBE_PLUGIN)
    info = site / "plugrl_probe_fifo-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugrl-probe-fifo\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[plugrl]\nprobe = plugrl_probe_fifo\n")


@pytest.fixture
def setup(tmp_path):
    site = tmp_path / "site"
    install_probe(site)
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PLUGRL_LOAD_PLUGINS")}
    env = {**base, "PYTHONPATH": os.pathsep.join(p for p in (str(site), base.get("PYTHONPATH")) if p),
           "PLUGRL_CACHE": str(tmp_path / "cache"), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "PROBE_LOG": str(tmp_path / "probe.jsonl"), "PROBE_SAVE": str(tmp_path / "ckpt"),
           "PROBE_HELD": str(tmp_path / "held")}
    args = ["train", "--sft-warmup-steps", "0", "--rollout-batch-size", "4", "--n-samples-per-prompt", "4",
            "--over-sampling-batch-size", "8", "--partial-rollout", "--global-batch-size", "16",
            "--eval-interval", "0", "--buffer-filter", "probe_fifo", "--rm-type", "deepscaler",
            "--num-rollout", str(NUM_ROLLOUT), "--save", str(tmp_path / "ckpt"), "--save-interval", "1",
            "--output-dir", str(tmp_path / "out")]
    return tmp_path, env, args


def start(args, env, log: Path) -> subprocess.Popen:
    out = open(log, "w")  # noqa: SIM115 - closed by finish() through proc.stdout_file
    proc = subprocess.Popen(PLUGRL + args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    proc.stdout_file = out
    return proc


def wait_for(condition, proc: subprocess.Popen, log: Path, what: str, limit: float = 900) -> None:
    """Poll ``condition``; the run ending first or ``limit`` seconds (only a hang) fail with its log."""
    deadline = time.monotonic() + limit
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}:\n{log.read_text(errors='replace')[-4000:]}"
        assert time.monotonic() < deadline, f"no {what} in {limit:.0f} s:\n{log.read_text(errors='replace')[-4000:]}"
        time.sleep(0.05)


def kill_run(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    finish(proc)  # SIGKILLs what is left of the session (Ray's GCS, raylet, workers)
    assert proc.returncode == -signal.SIGKILL
    assert not session_pids(proc.pid)


def metrics_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def restored_buffers(probe_log: Path) -> list[dict]:
    lines = probe_log.read_text().splitlines() if probe_log.exists() else []
    return [json.loads(line)["restored"] for line in lines]


def saved_buffer(ckpt: Path, rollout_id: int) -> dict:
    return json.loads((ckpt / f"rollout_{rollout_id:06d}" / "rollout_state.json").read_text())["buffer"]


def test_sigkill_after_a_checkpoint_and_inside_one_then_resume(setup):
    tmp, env, args = setup
    ckpt, out = tmp / "ckpt", tmp / "out"
    load = ["--load", str(ckpt)]

    # 1. Killed right after checkpoint 1 became the latest.
    proc = start(args, env, tmp / "first.log")
    try:
        wait_for(lambda: (latest_id(ckpt) or -1) >= 1, proc, tmp / "first.log", "checkpoint 1")
    finally:
        kill_run(proc)
    first_good = latest_id(ckpt)
    assert first_good is not None and first_good < NUM_ROLLOUT - 1
    assert not restored_buffers(tmp / "probe.jsonl")  # nothing to restore in a fresh run

    # 2. Resumed, then killed inside the write of the next checkpoint after the one it resumed from.
    proc = start(args + load, {**env, "PROBE_HOLD_FROM": str(first_good + 1)}, tmp / "second.log")
    try:
        wait_for(lambda: (tmp / "held").exists(), proc, tmp / "second.log", "a held checkpoint write")
    finally:
        kill_run(proc)
    held = int((tmp / "held").read_text())
    assert latest_id(ckpt) == held - 1, "the interrupted write moved `latest`"
    leftovers = [p for p in ckpt.iterdir() if p.name.startswith(f".rollout_{held:06d}.")]
    assert leftovers and not (ckpt / f"rollout_{held:06d}").exists()
    assert (restored := restored_buffers(tmp / "probe.jsonl")) == [saved_buffer(ckpt, first_good)], restored

    # 3. Resumed to the end from the last good checkpoint; the half-written one is tidied away.
    last_good = held - 1
    result = subprocess.run(PLUGRL + args + load, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "left by an interrupted checkpoint write" in result.stdout
    # (the run lock stays: an flock file whose lock went away with its process, not a half-written checkpoint)
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".") and p.name != LOCK_NAME], \
        sorted(p.name for p in ckpt.iterdir())
    assert restored_buffers(tmp / "probe.jsonl")[1:] == [saved_buffer(ckpt, last_good)]
    assert any(saved_buffer(ckpt, i)["groups"] for i in range(NUM_ROLLOUT)), "the buffer was never used"

    rows = metrics_rows(out)
    train = [r["rollout_id"] for r in rows if r["phase"] == "train"]
    assert train == list(range(NUM_ROLLOUT)), train  # none missing, none twice, in order
    (meta,) = [r for r in rows if r["phase"] == "meta"]  # the resumes selected the same plugins
    assert meta["plugins"]["buffer_policy"] == {"name": "probe_fifo", "origin": "plugrl-probe-fifo 1.0 (entry point 'probe')"}
    assert (meta["reward"], meta["advantage_estimator"], meta["filter"]) == ("deepscaler", "grpo", None)
    assert latest_id(ckpt) == NUM_ROLLOUT - 1

"""End to end (real Ray, tiny default model): a reward that hangs on its first calls does not zero the
rest of the run, a reward that always raises stops the run with a non-zero exit naming it, and Ctrl-C
stops it with a message naming the last checkpoint instead of a traceback."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

SHORT = ["train", "--sft-warmup-steps", "0", "--rollout-batch-size", "4", "--n-samples-per-prompt", "2",
         "--global-batch-size", "8", "--eval-interval", "0"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "PLUGRL_CACHE": str(cache), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def run(tmp_path, env, module: str, *extra):
    (tmp_path / "flaky_reward.py").write_text(module)
    return subprocess.run([sys.executable, "-m", "plugrl.core.cli", *SHORT, "--custom-rm-path", "flaky_reward:reward",
                           "--output-dir", str(tmp_path / "out"), *extra], capture_output=True, text=True,
                          timeout=900, env={**env, "PYTHONPATH": f"{tmp_path}{os.pathsep}{env.get('PYTHONPATH', '')}"})


def train_rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["phase"] == "train"]


def test_a_reward_hanging_on_its_first_calls_only_costs_those_calls(tmp_path, env):
    result = run(tmp_path, env,
                 "import itertools, threading, time\n"
                 "calls = itertools.count()\n"
                 "def reward(sample):\n"
                 "    if next(calls) < 2:\n"
                 "        time.sleep(3600)\n"
                 "    return 1.0\n",
                 "--num-rollout", "3", "--reward-timeout", "2")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = train_rows(tmp_path / "out")
    assert [(r["rollout/reward_errors"], r["rollout/reward_timeouts"]) for r in rows] == [(2, 2), (0, 0), (0, 0)]
    assert [r["rollout/raw_reward"] for r in rows] == [0.75, 1.0, 1.0]  # 6 of 8, then every sample scored
    assert "reward_errors 2 (2 timed out)" in result.stdout
    assert "timed out after 2 s (--reward-timeout 2)" in result.stderr


def test_a_reward_that_always_raises_stops_the_run_non_zero(tmp_path, env):
    result = run(tmp_path, env,
                 "def reward(sample):\n"
                 "    raise KeyError('no answer field')\n",
                 "--num-rollout", "3")
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    (last,) = [line for line in result.stderr.splitlines() if line.startswith("plugrl train: error:")]
    assert last.startswith("plugrl train: error: the reward failed on 8 of 8 samples of rollout 0 (0 timed out), "
                           "more than --reward-error-threshold 0.5; first failure: reward --custom-rm-path "
                           "flaky_reward:reward failed on sample "), last
    assert "KeyError: 'no answer field'" in last
    assert train_rows(tmp_path / "out") == []  # it stopped before training on a rollout of zeros


@pytest.mark.parametrize("stop", ["ctrl_c", "sigterm"])
def test_a_stopped_run_names_the_last_checkpoint_and_how_to_resume(tmp_path, env, stop):
    """Ctrl-C in a terminal sends SIGINT to the whole foreground process group (the driver and the Ray
    processes it started; a new session makes the group the run's alone); ``kill``, ``timeout`` and job
    schedulers send SIGTERM to the driver only. Both end in one line naming the last checkpoint. While the
    run holds its --save, a second run on the same directory is refused."""
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-m", "plugrl.core.cli", *SHORT, "--num-rollout", "500", "--save", str(ckpt),
                             "--save-interval", "1", "--output-dir", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (ckpt / "latest").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before its first checkpoint"
        if stop == "ctrl_c":
            # (a --save that holds checkpoints is refused anyway without --load: the resume of the same directory
            # is what would mix the two runs' checkpoints and tidy away the first one's save in progress)
            second = subprocess.run([sys.executable, "-m", "plugrl.core.cli", *SHORT, "--num-rollout", "600", "--load",
                                     str(ckpt), "--save", str(ckpt), "--output-dir", str(tmp_path / "out2")],
                                    capture_output=True, text=True, env=env, timeout=300)
            assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
            assert f"--save {ckpt} is in use by another run (plugrl train, pid {proc.pid}," in second.stderr
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == (130 if stop == "ctrl_c" else 143), out[-2000:] + err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    latest = (ckpt / "latest").read_text().strip()  # the checkpoint the message must name
    done = [r["rollout_id"] for r in train_rows(tmp_path / "out")]
    assert latest == f"rollout_{max(done):06d}" or latest == f"rollout_{max(done) - 1:06d}"  # a save may be cut
    what = "interrupted" if stop == "ctrl_c" else "terminated (SIGTERM)"
    assert (f"plugrl train: {what}. Metrics so far are in {tmp_path / 'out'}/metrics.jsonl; the last checkpoint "
            f"is {ckpt / latest} (after rollout {int(latest.split('_')[1])}): resume with --load {ckpt} --output-dir "
            f"{tmp_path / 'out'}.") in err


def install_plugin(tmp_path, name: str, source: str):
    """A distribution ``plugrl-<name>`` as pip leaves it (module + dist-info with the entry point); its folder."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / f"{name}_plugin.py").write_text(source)
    info = site / f"plugrl_{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: plugrl-{name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[plugrl]\n{name} = {name}_plugin\n")
    return site


OBSERVER = '''
from plugrl import hookimpl

@hookimpl
def plugrl_on_train_step_end(rollout_id, metrics):
    if rollout_id == 1:
        raise ConnectionError("the dashboard is down")
    return {"rollout/raw_reward": -999.0, "dash/seen": 1.0}
'''


def test_an_observer_that_raises_loses_no_rollout(tmp_path, env):
    """A third-party observer (installed as a distribution) raising at rollout 1 gets a warning; that rollout's
    metrics line and checkpoint are still written, and its attempt to overwrite core's reward is refused."""
    site = install_plugin(tmp_path, "dash", OBSERVER)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "plugrl.core.cli", *SHORT, "--num-rollout", "2", "--output-dir", str(out),
         "--save", str(tmp_path / "ckpt"), "--save-interval", "1"], capture_output=True, text=True, timeout=900,
        env={**env, "PYTHONPATH": f"{site}{os.pathsep}{env.get('PYTHONPATH', '')}"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = train_rows(out)
    assert [r["rollout_id"] for r in rows] == [0, 1]
    assert rows[0]["dash/seen"] == 1.0 and "dash/seen" not in rows[1]
    assert all(0.0 <= r["rollout/raw_reward"] <= 1.0 for r in rows)  # core's value, not the observer's
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("rollout_*")) == ["rollout_000000", "rollout_000001"]
    assert ("plugin 'dash' plugrl_on_train_step_end (rollout 1) raised ConnectionError: the dashboard is down"
            in result.stderr)
    assert "returned 'rollout/raw_reward', which the step's metrics already hold" in result.stderr


RAISING_FILTER = '''
from plugrl import hookimpl

def fussy(group, reward_key=None):
    if group[0].group_index >= 4:  # the second rollout's groups
        raise ZeroDivisionError("spread of nothing")
    return True

@hookimpl
def plugrl_register_filters(register):
    register("fussy", fussy)
'''


def test_a_filter_that_raises_stops_the_run_with_one_line_naming_it(tmp_path, env):
    """A dynamic-sampling filter raising in rollout 1 stops the run (exit 1) with a line naming the filter and
    its error, and what is kept (rollout 0's metrics and checkpoint), not Ray's traceback of the actor."""
    site = install_plugin(tmp_path, "fussy", RAISING_FILTER)
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    result = subprocess.run(
        [sys.executable, "-m", "plugrl.core.cli", *SHORT, "--num-rollout", "3", "--output-dir", str(out),
         "--dynamic-sampling-filter", "fussy", "--save", str(ckpt), "--save-interval", "1"],
        capture_output=True, text=True, timeout=900,
        env={**env, "PYTHONPATH": f"{site}{os.pathsep}{env.get('PYTHONPATH', '')}"})
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert ("plugrl train: error: --dynamic-sampling-filter fussy (on a group of 2 samples) raised "
            "ZeroDivisionError: spread of nothing") in result.stderr
    assert (f"plugrl train: Metrics so far are in {out}/metrics.jsonl; the last checkpoint is {ckpt / 'rollout_000000'} "
            f"(after rollout 0): resume with --load {ckpt} --output-dir {out}.") in result.stderr
    assert "Traceback (most recent call last)" not in result.stderr.split("plugrl train: error:")[-1]
    assert [r["rollout_id"] for r in train_rows(out)] == [0]

"""End to end through the SGLang path: ``plugrl train --rollout-backend sglang`` on the embedded
default, with two ``plugrl serve`` engines (CPU) launched by the backend behind the real
``sglang_router``. Weights go to the engines over the backend's push path after every step, and the
engines and the router are gone when the run ends."""

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("sglang_router")
psutil = pytest.importorskip("psutil")

SERVE = f"{sys.executable} -m plugrl.plugins.backends.sglang.server"
MARKER = "PLUGRL_SGLANG_E2E_MARKER"


def _launched(marker: str) -> dict:
    """``{(pid, create_time): "engine" | "router"}`` for live processes this run started. Engines
    carry an env marker every process of the run inherits (so a concurrent run's servers are not
    counted); the router renames itself (``sglang::router``, which also overwrites what
    ``/proc/<pid>/environ`` shows), so it is found as a child of the process that launched the
    engines (the rollout manager)."""
    engines, owners, routers = {}, set(), []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline", "create_time"]):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
            key = (proc.info["pid"], proc.info["create_time"])
            if "plugrl.plugins.backends.sglang.server" in cmdline:
                if proc.environ().get(MARKER) == marker:
                    engines[key] = "engine"
                    owners.add(proc.info["ppid"])
            elif "sglang::router" in cmdline or "sglang_router" in cmdline:
                routers.append((key, proc.info["ppid"]))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return {**engines, **{key: "router" for key, ppid in routers if ppid in owners}}


def _alive(key) -> bool:
    pid, create_time = key
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == create_time and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _sglang_run(tmp_path_factory, out, *extra) -> tuple[str, dict, list[str]]:
    """(marker, environment, command) of an embedded-default run through two ``plugrl serve`` engines; the
    marker tells this run's engines from a concurrent run's."""
    cache = os.environ.get("PLUGRL_CACHE") or str(tmp_path_factory.mktemp("cache"))
    marker = uuid.uuid4().hex
    env = {**os.environ, "PLUGRL_CACHE": cache, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "PLUGRL_SGLANG_LAUNCH_COMMAND": SERVE, MARKER: marker}
    command = [sys.executable, "-m", "plugrl.core.cli", "train", "--rollout-backend", "sglang",
               "--rollout-num-gpus", "2", "--rollout-batch-size", "4", "--n-samples-per-prompt", "4",
               "--global-batch-size", "16", "--eval-interval", "0", "--output-dir", str(out), *extra]
    return marker, env, command


def test_train_through_sglang_router_pushes_weights_every_step(tmp_path_factory):
    out = tmp_path_factory.mktemp("sglang_run")
    marker, env, command = _sglang_run(tmp_path_factory, out, "--num-rollout", "3", "--sft-warmup-steps", "20")

    seen: dict = {}
    log_dirs: set = set()
    done = threading.Event()

    def watch():
        while not done.is_set():
            found = _launched(marker)
            seen.update(found)
            for pid, _ in found:
                try:  # the backend's log directory: an engine's stdout is a log file in it
                    log_dirs.add(os.path.dirname(os.readlink(f"/proc/{pid}/fd/1")))
                except OSError:
                    pass
            done.wait(1.0)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        started = time.monotonic()
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
        finally:
            done.set()
            watcher.join(timeout=30)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]

        # Both engines and the router really ran (so the rollouts went through them) ...
        kinds = sorted(seen.values())
        assert kinds == ["engine", "engine", "router"], (kinds, time.monotonic() - started)

        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if r["phase"] == "train"]
        assert [r["rollout_id"] for r in train] == [0, 1, 2]
        for r in train:
            assert r["rollout/num_samples"] == 16
            assert 0.0 <= r["rollout/raw_reward"] <= 1.0
            assert "train/loss" in r
        # ... and rollout k was generated with the weights pushed after step k - 1 (version k): a new
        # version reached the engines through the SGLang push path before every rollout.
        versions = [(r["rollout/weight_version_min"], r["rollout/weight_version_max"]) for r in train]
        assert versions == [(0, 0), (1, 1), (2, 2)]

        # Nothing it launched outlives the run.
        deadline = time.monotonic() + 20
        while any(_alive(key) for key in seen) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [seen[key] for key in seen if _alive(key)], {key: seen[key] for key in seen if _alive(key)}
        assert _launched(marker) == {}
        # The rollout manager closed the backend itself before the actors were killed (close() stops
        # the engines and the router and removes its log directory; without it, only Ray's cleanup of
        # a killed worker's children would stop them, and the directory would stay).
        assert log_dirs and all(os.path.basename(d).startswith("plugrl-sglang-") for d in log_dirs), log_dirs
        assert not [d for d in log_dirs if os.path.exists(d)], log_dirs
    finally:  # a failed run must not leave its servers behind for the rest of the suite
        for key in [k for k in seen if _alive(k)]:
            with contextlib.suppress(psutil.Error):
                psutil.Process(key[0]).kill()


def test_a_terminated_run_stops_the_engines_it_launched(tmp_path_factory):
    """SIGTERM (a scheduler's preemption) while rollouts run: one line with the resume hint (exit 143), and the
    rollout manager stops its SGLang servers and router itself (``stop`` runs in its own concurrency group,
    beside a generate still running); the servers live in sessions of their own, so a bare kill of the
    actor would leave them holding their GPUs."""
    import signal

    out = tmp_path_factory.mktemp("sglang_term")
    marker, env, command = _sglang_run(tmp_path_factory, out, "--num-rollout", "200", "--sft-warmup-steps", "0",
                                       "--rollout-max-response-len", "64")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen: dict = {}
    try:
        deadline = time.monotonic() + 600
        metrics = out / "metrics.jsonl"
        while time.monotonic() < deadline and proc.poll() is None:  # until a rollout has trained
            seen.update(_launched(marker))
            if metrics.exists() and '"phase": "train"' in metrics.read_text():
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the run ended before its first rollout"
        seen.update(_launched(marker))
        assert sorted(seen.values()) == ["engine", "engine", "router"]
        os.kill(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 143, stdout[-2000:] + stderr[-3000:]
        assert "plugrl train: stopping: waiting up to 60 s for the rollout manager to stop its engines" in stdout
        assert f"plugrl train: terminated (SIGTERM). Metrics so far are in {out}/metrics.jsonl" in stderr
        deadline = time.monotonic() + 20
        while any(_alive(key) for key in seen) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [seen[key] for key in seen if _alive(key)]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for key in [k for k in seen if _alive(k)]:
            with contextlib.suppress(psutil.Error):
                psutil.Process(key[0]).kill()

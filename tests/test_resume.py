"""Checkpoint / resume end to end (real Ray, the embedded tiny default, shortened).

* Resume equivalence: run A (6 rollouts, a checkpoint after each) against run B (3 rollouts) + run C
  (``--load`` B's checkpoint, on to 6 rollouts, same ``--output-dir``). The prompts, the data cursor,
  the generated responses, the metrics and the final weights must match (slime reference §1.1, §2.2:
  a resumed run starts at ``rollout_id + 1`` with the data-source cursor restored).
* SIGKILL: kill a long run (driver and every Ray process) once a checkpoint >= 3 exists, resume from
  it, and check that it restarts right after that checkpoint without skipping or repeating a prompt.

Prompts are observed with a probe reward (``--custom-rm-path``) that wraps the default deepscaler
reward (so training is unchanged) and appends one JSON line per scored sample to ``$PROBE_LOG``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process-session cleanup reads /proc"),
]

PLUGRL = [sys.executable, "-m", "plugrl.core.cli"]
BATCH = 8  # --rollout-batch-size
N_SAMPLES = 4  # --n-samples-per-prompt
SHORT = ["train", "--sft-warmup-steps", "50", "--rollout-batch-size", str(BATCH), "--n-samples-per-prompt", str(N_SAMPLES),
         "--global-batch-size", "32", "--eval-interval", "0", "--custom-rm-path", "resume_probe_rm:reward"]
CKPT_FILES = ("train_state.pt", "rollout_state.json", "meta.json")

PROBE_RM = '''
import json, os, threading
from plugrl.plugins.rewards.deepscaler import deepscaler_reward

_lock = threading.Lock()


def reward(sample):
    value = deepscaler_reward(sample)
    line = json.dumps({"group_index": sample.group_index, "index": sample.index, "prompt": sample.prompt,
                       "label": sample.label, "response": sample.response, "reward": value,
                       "weight_versions": [str(v) for v in sample.weight_versions]})
    with _lock, open(os.environ["PROBE_LOG"], "a") as f:
        f.write(line + "\\n")
    return value
'''


# ---- processes ----------------------------------------------------------------------------------


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid``: the driver (started with start_new_session) and everything
    it spawned, Ray's GCS, raylet and workers included (workers get their own process group, so
    killpg alone does not reach them, but they stay in the session)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        state, session = fields[0], int(fields[3])
        if session == sid and state not in ("Z", "X"):
            pids.append(int(entry))
    return pids


def kill_session(sid: int, timeout: float = 30.0) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while pids := session_pids(sid):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of session {sid} survived SIGKILL: {pids}")
        time.sleep(0.2)


def start(args, env, probe_log: Path, log: Path) -> subprocess.Popen:
    out = open(log, "w")  # noqa: SIM115 - closed by the caller through proc.stdout_file
    proc = subprocess.Popen(PLUGRL + args, env={**env, "PROBE_LOG": str(probe_log)}, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    proc.stdout_file = out
    return proc


def finish(proc: subprocess.Popen) -> None:
    kill_session(proc.pid)  # leftovers only (a clean exit leaves none); never other sessions' Ray
    proc.wait()
    proc.stdout_file.close()


def tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:]


def run_plugrl(args, env, probe_log: Path, log: Path, timeout: float = 900) -> None:
    proc = start(args, env, probe_log, log)
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        rc = "timeout"
    finally:
        finish(proc)
    assert rc == 0, f"plugrl {' '.join(args)} -> {rc}\n{tail(log)}"


# ---- reading what runs leave ------------------------------------------------------------------------


def probe_rows(path: Path) -> list[dict]:
    """Probe lines; a killed run may leave its last line cut short (ignored)."""
    lines = path.read_text().splitlines() if path.exists() else []
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            assert number == len(lines), f"{path}:{number}: corrupt probe line"
    return rows


def by_group(rows: list[dict]) -> dict[int, list[dict]]:
    groups: dict[int, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["group_index"]].append(row)
    return {g: sorted(rs, key=lambda r: r["index"]) for g, rs in groups.items()}


def metrics_rows(text: str) -> list[dict]:
    # Strict: a resumed run appends whole lines after whole lines.
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def train_rows(rows: list[dict]) -> dict[int, dict]:
    return {r["rollout_id"]: r for r in rows if r["phase"] == "train"}


def checkpoint_ids(root: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in root.iterdir() if p.name.startswith("rollout_") and p.is_dir())


def latest_id(root: Path) -> int | None:
    try:
        name = (root / "latest").read_text().strip()
    except OSError:
        return None
    return int(name.split("_")[1]) if name.startswith("rollout_") else None


def rollout_state(root: Path, rollout_id: int) -> dict:
    return json.loads((root / f"rollout_{rollout_id:06d}" / "rollout_state.json").read_text())


def expected_cursor(rollout_id: int) -> dict:
    """The data cursor after rollout ``rollout_id`` (no dynamic sampling, one epoch of 800 prompts)."""
    done = rollout_id + 1
    return {"epoch": 0, "offset": done * BATCH, "group_index": done * BATCH, "sample_index": done * BATCH * N_SAMPLES}


def reference_order(run_dir: Path, num_rollout: int) -> dict[int, tuple[str, list[int]]]:
    """``group_index -> (prompt, sample indices)`` of an uninterrupted run, from the data source itself,
    configured from the run's resolved ``config.yaml``."""
    import yaml
    from transformers import AutoTokenizer

    from plugrl.core.data import PromptDataSource, load_prompt_dataset

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    tokenizer = AutoTokenizer.from_pretrained(config["hf_checkpoint"])
    dataset = load_prompt_dataset(
        config["prompt_data"], input_key=config["input_key"], label_key=config["label_key"],
        apply_chat_template=bool(config["apply_chat_template"]), tokenizer=tokenizer,
        apply_chat_template_kwargs=config.get("apply_chat_template_kwargs") or None,
        metadata_key=config["metadata_key"], tool_key=config.get("tool_key") or "tools",
        max_prompt_len=config.get("rollout_max_prompt_len"),
    )
    assert len(dataset) >= num_rollout * BATCH, "the test assumes no epoch wrap"
    source = PromptDataSource(dataset, int(config["n_samples_per_prompt"]), shuffle=bool(config["rollout_shuffle"]),
                              seed=int(config["rollout_seed"]))
    order = {}
    for _ in range(num_rollout):
        for group in source.next_groups(int(config["rollout_batch_size"])):
            order[group[0].group_index] = (group[0].prompt, [s.index for s in group])
    return order


def assert_complete_checkpoints(root: Path) -> list[int]:
    ids = checkpoint_ids(root)
    for rid in ids:
        path = root / f"rollout_{rid:06d}"
        missing = [name for name in CKPT_FILES if not (path / name).is_file() or (path / name).stat().st_size == 0]
        assert not missing, f"{path} is incomplete: {missing} missing"
        assert json.loads((path / "meta.json").read_text())["rollout_id"] == rid
        cursor = rollout_state(root, rid)["data_source"]
        assert {k: cursor[k] for k in expected_cursor(rid)} == expected_cursor(rid), (rid, cursor)
    return ids


# ---- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    probe_dir = tmp_path_factory.mktemp("probe")
    (probe_dir / "resume_probe_rm.py").write_text(PROBE_RM)
    cache = tmp_path_factory.mktemp("cache")
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always a private local cluster
    pythonpath = os.pathsep.join(p for p in (str(probe_dir), base.get("PYTHONPATH")) if p)
    return {**base, "PYTHONPATH": pythonpath, "PLUGRL_CACHE": str(cache), "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def abc_runs(tmp_path_factory, env):
    """A: 6 rollouts, saved every rollout. B: 3 rollouts, saved at the end. C: resume B to 6 rollouts,
    same --save and --output-dir."""
    root = tmp_path_factory.mktemp("abc")
    a_out, a_ckpt, b_out, b_ckpt = root / "a_out", root / "a_ckpt", root / "b_out", root / "b_ckpt"
    run_plugrl(SHORT + ["--num-rollout", "6", "--save", str(a_ckpt), "--save-interval", "1",
                        "--output-dir", str(a_out)], env, root / "a.jsonl", root / "a.log")
    run_plugrl(SHORT + ["--num-rollout", "3", "--save", str(b_ckpt), "--save-interval", "3",
                        "--output-dir", str(b_out)], env, root / "b.jsonl", root / "b.log")
    b_metrics = (b_out / "metrics.jsonl").read_text()
    b_checkpoints = checkpoint_ids(b_ckpt)
    run_plugrl(SHORT + ["--num-rollout", "6", "--load", str(b_ckpt), "--save", str(b_ckpt), "--save-interval", "3",
                        "--output-dir", str(b_out)], env, root / "c.jsonl", root / "c.log")
    return {
        "root": root, "a_out": a_out, "a_ckpt": a_ckpt, "b_out": b_out, "b_ckpt": b_ckpt,
        "a": by_group(probe_rows(root / "a.jsonl")), "b": by_group(probe_rows(root / "b.jsonl")),
        "c": by_group(probe_rows(root / "c.jsonl")), "b_metrics": b_metrics, "b_checkpoints": b_checkpoints,
    }


# ---- resume equivalence -------------------------------------------------------------------------------


def test_resume_sees_the_same_prompts_in_the_same_order(abc_runs):
    a, b, c = abc_runs["a"], abc_runs["b"], abc_runs["c"]
    assert sorted(a) == list(range(6 * BATCH))
    assert sorted(b) == list(range(3 * BATCH)), "run B generated other groups than rollouts 0..2"
    assert sorted(c) == list(range(3 * BATCH, 6 * BATCH)), "the resumed run did not continue the group numbering"
    resumed = {**b, **c}
    for rollout_id in range(6):
        groups = range(rollout_id * BATCH, (rollout_id + 1) * BATCH)
        assert [a[g][0]["prompt"] for g in groups] == [resumed[g][0]["prompt"] for g in groups], rollout_id
        assert [[r["index"] for r in a[g]] for g in groups] == [[r["index"] for r in resumed[g]] for g in groups]
    for groups in (a, b, c):
        assert all(len(rows) == N_SAMPLES and len({r["prompt"] for r in rows}) == 1 for rows in groups.values())
    # ... and that order is the data source's own (seeded shuffle), not something both runs share by chance.
    reference = reference_order(abc_runs["a_out"], 6)
    assert {g: (rows[0]["prompt"], [r["index"] for r in rows]) for g, rows in a.items()} == reference


def test_checkpoints_hold_the_same_data_cursor(abc_runs):
    a_ckpt, b_ckpt = abc_runs["a_ckpt"], abc_runs["b_ckpt"]
    assert abc_runs["b_checkpoints"] == [2]
    assert assert_complete_checkpoints(a_ckpt) == list(range(6))
    assert assert_complete_checkpoints(b_ckpt) == [2, 5]
    assert (b_ckpt / "latest").read_text().strip() == "rollout_000005"
    for rid in (2, 5):
        assert rollout_state(a_ckpt, rid)["data_source"] == rollout_state(b_ckpt, rid)["data_source"], rid
        assert rollout_state(a_ckpt, rid)["buffer"] == rollout_state(b_ckpt, rid)["buffer"], rid


def test_fresh_runs_generate_identically(abc_runs):
    """Baseline for the next test: on CPU with fixed seeds two fresh runs are bit-identical (so any
    difference after a resume comes from state the checkpoint failed to restore)."""
    a, b = abc_runs["a"], abc_runs["b"]
    for g in b:
        assert [(r["index"], r["response"], r["reward"]) for r in a[g]] == \
               [(r["index"], r["response"], r["reward"]) for r in b[g]], f"group {g}"
    a_rows = train_rows(metrics_rows((abc_runs["a_out"] / "metrics.jsonl").read_text()))
    b_rows = train_rows(metrics_rows(abc_runs["b_metrics"]))
    for rid in range(3):
        assert_metrics_close(a_rows[rid], b_rows[rid], rid)


def assert_metrics_close(expected: dict, actual: dict, rollout_id: int, rel: float = 1e-5, abs_: float = 1e-7):
    keys = [k for k, v in expected.items() if isinstance(v, (int, float)) and not k.startswith("perf/")
            and k not in ("time", "rollout_id")]
    assert keys, expected
    bad = {k: (expected[k], actual.get(k)) for k in keys
           if actual.get(k) is None or not math.isclose(expected[k], actual[k], rel_tol=rel, abs_tol=abs_)}
    assert not bad, f"rollout {rollout_id}: metrics differ from the uninterrupted run: {bad}"


def test_resumed_run_reproduces_the_uninterrupted_run(abc_runs):
    """C (resumed at rollout 3) against A: same responses, rewards and weight versions per sample,
    same metrics, same final weights. Generation is bit-deterministic on CPU (previous test), so
    this holds only if the checkpoint restores everything generation and training depend on:
    weights, optimizer, RNGs, data cursor, and the rollout engine's sampling RNG."""
    a, c = abc_runs["a"], abc_runs["c"]
    diverged = [g for g in c if [(r["index"], r["response"], r["reward"], r["weight_versions"]) for r in a[g]]
                != [(r["index"], r["response"], r["reward"], r["weight_versions"]) for r in c[g]]]
    assert not diverged, (
        f"responses of groups {diverged} (rollouts {sorted({g // BATCH for g in diverged})}) differ after resume; "
        f"e.g. A {[r['response'] for r in a[diverged[0]]]} vs C {[r['response'] for r in c[diverged[0]]]}"
    )
    a_rows = train_rows(metrics_rows((abc_runs["a_out"] / "metrics.jsonl").read_text()))
    c_rows = train_rows(metrics_rows((abc_runs["b_out"] / "metrics.jsonl").read_text()))
    for rid in range(3, 6):
        assert_metrics_close(a_rows[rid], c_rows[rid], rid)

    import torch

    a_state = torch.load(abc_runs["a_ckpt"] / "rollout_000005" / "train_state.pt", map_location="cpu", weights_only=False)
    c_state = torch.load(abc_runs["b_ckpt"] / "rollout_000005" / "train_state.pt", map_location="cpu", weights_only=False)
    assert a_state["optimizer_steps"] == c_state["optimizer_steps"]
    assert a_state["scheduler"]["last_epoch"] == c_state["scheduler"]["last_epoch"]
    worst = max((a_state["model"][k].float() - c_state["model"][k].float()).abs().max().item() for k in a_state["model"])
    assert worst <= 1e-6, f"final weights differ by up to {worst}"


def test_resumed_run_appends_to_metrics_jsonl(abc_runs):
    before = abc_runs["b_metrics"]
    after = (abc_runs["b_out"] / "metrics.jsonl").read_text()
    assert after.startswith(before), "the resumed run rewrote or truncated metrics.jsonl"
    rows = metrics_rows(after)
    assert len(rows) == len(metrics_rows(before)) + 3
    assert [r["phase"] for r in rows].count("sft") == 1, "the format warm-up ran again on resume"
    assert [r["rollout_id"] for r in rows if r["phase"] == "train"] == list(range(6))
    new = metrics_rows(after[len(before):])
    assert [(r["rollout_id"], r["phase"]) for r in new] == [(3, "train"), (4, "train"), (5, "train")]


def test_resuming_a_finished_run_says_so_and_starts_nothing(abc_runs, env):
    """Run C trained rollouts 3-5 of 6: the same command again has nothing to train. It says so, exits 0 and
    leaves the metrics and checkpoints as they were (no Ray, no model: well under the runs' start-up)."""
    b_ckpt, b_out = abc_runs["b_ckpt"], abc_runs["b_out"]
    metrics_before, checkpoints_before = (b_out / "metrics.jsonl").read_text(), checkpoint_ids(b_ckpt)
    result = subprocess.run([sys.executable, "-m", "plugrl.core.cli", *SHORT, "--num-rollout", "6", "--load", str(b_ckpt),
                             "--save", str(b_ckpt), "--save-interval", "3", "--output-dir", str(b_out)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (f"plugrl train: --load {b_ckpt}: the run already trained rollouts 0-5 (rollout_000005), and "
            "--num-rollout is 6: nothing left to train; raise --num-rollout to go on") in result.stdout
    assert "Ray" not in result.stdout + result.stderr and "rollouts, output in" not in result.stdout
    assert (b_out / "metrics.jsonl").read_text() == metrics_before and checkpoint_ids(b_ckpt) == checkpoints_before


# ---- SIGKILL and resume ----------------------------------------------------------------------------


def test_sigkill_then_resume(tmp_path, env):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    killed_probe, resumed_probe = tmp_path / "killed.jsonl", tmp_path / "resumed.jsonl"
    proc = start(SHORT + ["--num-rollout", "40", "--save", str(ckpt), "--save-interval", "2", "--output-dir", str(out)],
                 env, killed_probe, tmp_path / "killed.log")
    try:
        deadline = time.monotonic() + 600
        while (latest_id(ckpt) or -1) < 3:
            assert proc.poll() is None, f"the run ended before it was killed:\n{tail(tmp_path / 'killed.log')}"
            assert time.monotonic() < deadline, f"no checkpoint >= 3 in time:\n{tail(tmp_path / 'killed.log')}"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        finish(proc)  # SIGKILLs whatever is left of the session: Ray's GCS, raylet and workers
    assert proc.returncode == -signal.SIGKILL
    assert not session_pids(proc.pid)

    last = latest_id(ckpt)  # re-read: a save may have completed before the kill landed
    assert last is not None and last >= 3 and last % 2 == 1, last
    assert_complete_checkpoints(ckpt)
    metrics_before = (out / "metrics.jsonl").read_text()
    killed_train = [r["rollout_id"] for r in metrics_rows(metrics_before) if r["phase"] == "train"]
    # (rollout `last` is logged after its save: a kill in between leaves its row out, >= last not last + 1)
    assert killed_train == list(range(len(killed_train))) and len(killed_train) >= last

    num_rollout = last + 4  # saves at last + 2 (interval) and last + 3 (the final rollout)
    run_plugrl(SHORT + ["--num-rollout", str(num_rollout), "--load", str(ckpt), "--save", str(ckpt),
                        "--save-interval", "2", "--output-dir", str(out)], env, resumed_probe, tmp_path / "resumed.log")

    # Restarted right after the last checkpoint, appending to the same metrics.jsonl; lines the killed
    # run logged for rollouts after it (run again now) were moved to metrics.superseded.jsonl.
    before_rows = metrics_rows(metrics_before)
    kept = [r for r in before_rows if r["rollout_id"] <= last]
    superseded = out / "metrics.superseded.jsonl"
    assert (metrics_rows(superseded.read_text()) if superseded.exists() else []) == \
        [r for r in before_rows if r["rollout_id"] > last]
    after_rows = metrics_rows((out / "metrics.jsonl").read_text())
    assert after_rows[:len(kept)] == kept
    assert len({(r["rollout_id"], r["phase"]) for r in after_rows}) == len(after_rows), "a duplicated line"
    new = after_rows[len(kept):]
    assert new and new[0]["rollout_id"] == last + 1 and new[0]["phase"] == "train", new[:1]
    assert [r["rollout_id"] for r in new] == list(range(last + 1, num_rollout))
    assert all(r["phase"] == "train" for r in new), "the resumed run re-ran the format warm-up"

    # No prompt skipped or repeated: checkpointed part of the killed run + the resumed run == the
    # uninterrupted order of the data source.
    reference = reference_order(out, num_rollout)
    killed, resumed = by_group(probe_rows(killed_probe)), by_group(probe_rows(resumed_probe))
    first_new_group = (last + 1) * BATCH
    assert set(range(first_new_group)) <= set(killed)
    assert sorted(resumed) == list(range(first_new_group, num_rollout * BATCH)), \
        f"resumed run generated groups {sorted(resumed)[:3]}..., expected from {first_new_group}"
    # (the killed run may have started rollout last + 1 before it died: that work is redone)
    for groups in (killed, resumed):
        for g, rows in groups.items():
            assert rows and rows[0]["prompt"] == reference[g][0], f"group {g}: prompt out of order"
    for g, rows in resumed.items():
        assert [r["index"] for r in rows] == reference[g][1], f"group {g}: sample indices"
        assert all(r["weight_versions"] == [str(g // BATCH)] for r in rows), \
            f"group {g}: generated with weight version {rows[0]['weight_versions']}, expected {g // BATCH}"
    sequence = [killed[g][0]["prompt"] for g in range(first_new_group)] + \
               [resumed[g][0]["prompt"] for g in sorted(resumed)]
    assert sequence == [reference[g][0] for g in range(num_rollout * BATCH)]
    assert len(set(sequence)) == len(sequence), "a prompt was repeated within the epoch"

    # Every checkpoint directory complete, with the cursor of its rollout.
    ids = assert_complete_checkpoints(ckpt)
    assert ids == list(range(1, last + 3, 2)) + [last + 3], ids
    assert latest_id(ckpt) == num_rollout - 1

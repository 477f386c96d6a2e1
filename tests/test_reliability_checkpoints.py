"""Nothing produced is lost and nothing is counted twice: interrupted checkpoint writes are tidied at the
next start, --overwrite-save is the only way to replace another run's checkpoints, a resumed run never
duplicates a metrics line (and ``plugrl report`` never counts one twice); progress stays readable in a
log file."""

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from plugrl.core.checkpoint import (
    SaveDirLock,
    checkpoint_damage,
    newest_whole_checkpoint,
    checkpoint_rollout_id,
    clean_interrupted_writes,
    delete_checkpoints,
    find_latest_checkpoint,
    write_checkpoint_atomically,
)
from plugrl.core.metrics import latest_rows, read_metrics, set_aside_rows, start_fresh_metrics
from plugrl.core.progress import Progress, progress_iter
from plugrl.core.report import main as report_main
from plugrl.core.train_cli import ProgressBars, prepare_dirs


def save(root, rollout_id, text="weights"):
    def write(tmp):
        Path(tmp, "model.bin").write_text(text)
        Path(tmp, "meta.json").write_text(json.dumps({"rollout_id": rollout_id}))

    return write_checkpoint_atomically(str(root), rollout_id, write)


def whole_checkpoint(root, rollout_id):
    """A checkpoint with the files the loop and the torch backend write (a real torch archive)."""
    import torch

    def write(tmp):
        torch.save({"w": torch.arange(4.0)}, Path(tmp, "train_state.pt"))
        Path(tmp, "rollout_state.json").write_text(json.dumps({"offset": rollout_id}))
        Path(tmp, "meta.json").write_text(json.dumps({"rollout_id": rollout_id}))

    return Path(write_checkpoint_atomically(str(root), rollout_id, write))


def test_damaged_checkpoints_are_named_and_the_newest_whole_one_found(tmp_path):
    whole_checkpoint(tmp_path, 3)
    newest = whole_checkpoint(tmp_path, 5)
    assert checkpoint_damage(str(newest)) is None
    archive = (newest / "train_state.pt").read_bytes()
    (newest / "train_state.pt").write_bytes(archive[: len(archive) // 2])  # a cut copy
    assert checkpoint_damage(str(newest)) == "its train_state.pt is cut short or damaged (not a complete torch archive)"
    assert newest_whole_checkpoint(str(tmp_path)) == str(tmp_path / "rollout_000003")
    (newest / "train_state.pt").write_bytes(archive)
    (newest / "meta.json").unlink()
    assert checkpoint_damage(str(newest)) == "its meta.json is missing or unreadable"
    (newest / "meta.json").write_text(json.dumps({"rollout_id": 5}))
    (newest / "rollout_state.json").write_text("{cut")
    assert checkpoint_damage(str(newest)) == "its rollout_state.json is missing or unreadable"
    (newest / "rollout_state.json").write_text("{}")
    backend = newest / "megatron"  # the megatron backend's files live in a sub-folder
    backend.mkdir()
    (backend / "model_rank00000.pt").write_bytes(archive[:100])
    assert checkpoint_damage(str(newest)) == ("its megatron/model_rank00000.pt is cut short or damaged (not a complete "
                                              "torch archive)")
    (backend / "model_rank00000.pt").write_bytes(archive)
    (backend / "meta.json").write_text('{"iteration": ')
    assert checkpoint_damage(str(newest)) == "its megatron/meta.json is unreadable"


def test_orphan_temp_folders_are_removed_and_checkpoints_kept(tmp_path):
    save(tmp_path, 1)
    (tmp_path / ".rollout_000003.k2j4").mkdir()  # killed while writing rollout 3
    (tmp_path / ".rollout_000003.k2j4" / "model.bin").write_text("half")
    (tmp_path / ".train_rollout_000003.x1").mkdir()  # killed with the trainer's state staged
    (tmp_path / ".latest.tmp").write_text("rollout_000003\n")
    changed = clean_interrupted_writes(str(tmp_path))
    assert changed == ["removed .latest.tmp", "removed .rollout_000003.k2j4", "removed .train_rollout_000003.x1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "rollout_000001"]
    assert (tmp_path / "rollout_000001" / "model.bin").read_text() == "weights"
    assert clean_interrupted_writes(str(tmp_path)) == []


def test_a_copy_moved_aside_is_put_back_when_the_kill_fell_between_the_renames(tmp_path):
    save(tmp_path, 2, "old")
    aside = tmp_path / ".old_rollout_000002.q9"
    aside.mkdir()
    (tmp_path / "rollout_000002").rename(aside / "checkpoint")  # the state right after the first rename
    assert find_latest_checkpoint(str(tmp_path)) is None
    assert clean_interrupted_writes(str(tmp_path)) == ["restored rollout_000002 from .old_rollout_000002.q9",
                                                       "removed .old_rollout_000002.q9"]
    assert (tmp_path / "rollout_000002" / "model.bin").read_text() == "old"
    assert checkpoint_rollout_id(find_latest_checkpoint(str(tmp_path))) == 2


def test_a_copy_moved_aside_is_dropped_when_the_new_one_is_complete(tmp_path):
    save(tmp_path, 2, "new")
    (tmp_path / ".old_rollout_000002.q9" / "checkpoint").mkdir(parents=True)
    assert clean_interrupted_writes(str(tmp_path)) == ["removed .old_rollout_000002.q9"]
    assert (tmp_path / "rollout_000002" / "model.bin").read_text() == "new"


def test_delete_checkpoints_leaves_other_files(tmp_path):
    save(tmp_path, 0)
    save(tmp_path, 1)
    (tmp_path / "notes.txt").write_text("mine")
    assert delete_checkpoints(str(tmp_path)) == ["latest", "rollout_000000", "rollout_000001"]
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def metrics_file(path, rollout_ids, phase="train"):
    rows = [{"rollout_id": -1, "phase": "sft", "sft/loss_last": 1.0}]
    rows += [{"rollout_id": i, "phase": phase, "rollout/raw_reward": i / 10} for i in rollout_ids]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_resume_moves_lines_of_rollouts_to_be_rerun_aside(tmp_path):
    metrics_file(tmp_path / "metrics.jsonl", [0, 1, 2, 3])
    assert set_aside_rows(tmp_path, 2) == 2  # checkpoint after rollout 1: rollouts 2 and 3 run again
    assert [r["rollout_id"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [-1, 0, 1]
    assert [r["rollout_id"] for r in read_metrics(tmp_path / "metrics.superseded.jsonl")] == [2, 3]


def test_resume_keeps_a_cut_last_line_and_damaged_bytes(tmp_path):
    """A run killed mid-write cuts its last line: it goes to metrics.jsonl.cut (with a warning), not away.
    A non-UTF-8 byte in a kept line is carried through unchanged instead of failing the resume."""
    metrics_file(tmp_path / "metrics.jsonl", [0, 1, 2])
    damaged = (tmp_path / "metrics.jsonl").read_bytes().replace(b'"phase": "sft"', b'"phase": "s\xfft"')
    (tmp_path / "metrics.jsonl").write_bytes(damaged + b'{"rollout_id": 3, "pha')
    with pytest.warns(UserWarning, match="last line was cut off"):
        assert set_aside_rows(tmp_path, 2) == 1
    assert (tmp_path / "metrics.jsonl.cut").read_bytes() == b'{"rollout_id": 3, "pha\n'
    assert b"s\xfft" in (tmp_path / "metrics.jsonl").read_bytes()
    assert [r["rollout_id"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [-1, 0, 1]
    assert [r["rollout_id"] for r in read_metrics(tmp_path / "metrics.superseded.jsonl")] == [2]


def test_prepare_dirs_on_resume_and_on_a_fresh_run(tmp_path, capsys):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    out.mkdir()
    save(ckpt, 1)
    (ckpt / ".rollout_000002.zz").mkdir()
    metrics_file(out / "metrics.jsonl", [0, 1, 2])  # killed after logging rollout 2, before its save
    args = SimpleNamespace(load=str(ckpt), save=str(ckpt), output_dir=str(out), overwrite_save=False)
    prepare_dirs(args)
    printed = capsys.readouterr().out
    assert "removed .rollout_000002.zz (left by an interrupted checkpoint write)" in printed
    assert "resuming after rollout 1: 1 metrics line(s) of later rollouts moved" in printed
    assert [r["rollout_id"] for r in read_metrics(out / "metrics.jsonl")] == [-1, 0, 1]
    # The same output dir for a new run: the old history and its config are renamed, not appended to or
    # overwritten.
    (out / "config.yaml").write_text("num_rollout: 3\n")
    fresh = SimpleNamespace(load=None, save=str(tmp_path / "ckpt2"), output_dir=str(out), overwrite_save=False)
    prepare_dirs(fresh)
    assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()
    (kept,) = [p for p in out.glob("metrics.2*.jsonl")]
    assert [r["rollout_id"] for r in read_metrics(kept)] == [-1, 0, 1]
    stamp = kept.name[len("metrics."):-len(".jsonl")]
    assert (out / f"config.{stamp}.yaml").read_text() == "num_rollout: 3\n"


def test_a_fresh_start_with_load_says_so(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"  # --load DIR --save DIR, first run: nothing there yet
    assert prepare_dirs(SimpleNamespace(load=str(ckpt), save=str(ckpt), output_dir=str(tmp_path / "out"),
                                        overwrite_save=False)) is None
    assert f"plugrl train: --load {ckpt}: no checkpoint there" in capsys.readouterr().out
    prepare_dirs(SimpleNamespace(load=None, save=str(ckpt), output_dir=str(tmp_path / "out"), overwrite_save=False))
    assert "--load" not in capsys.readouterr().out


def test_overwrite_save_deletes_only_when_asked(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    save(ckpt, 4)
    keep = SimpleNamespace(load=str(ckpt), save=str(ckpt), output_dir=str(tmp_path / "o1"), overwrite_save=True)
    prepare_dirs(keep)  # --load names it: a resume, nothing deleted
    assert (ckpt / "rollout_000004").is_dir()
    prepare_dirs(SimpleNamespace(load=None, save=str(ckpt), output_dir=str(tmp_path / "o2"), overwrite_save=True))
    assert "--overwrite-save: deleted latest, rollout_000004" in capsys.readouterr().out
    assert not any(ckpt.iterdir())


def test_report_counts_a_duplicated_line_once(tmp_path, capsys):
    rows = [{"rollout_id": 0, "phase": "train", "rollout/raw_reward": 0.1},
            {"rollout_id": 1, "phase": "train", "rollout/raw_reward": 0.2},
            {"rollout_id": 1, "phase": "train", "rollout/raw_reward": 0.3},  # re-run after a resume
            {"rollout_id": 1, "phase": "eval", "eval/x/pass@1": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["rollout/raw_reward"] for r in latest_rows(rows) if r["phase"] == "train"] == [0.1, 0.3]
    assert report_main([str(tmp_path)]) == 0
    assert "(3 rows," in capsys.readouterr().out


def test_progress_in_a_file_has_no_carriage_returns():
    stream = io.StringIO()
    items = list(progress_iter(range(5), "[format warm-up]", unit="step", stream=stream, every=0.0))
    assert items == [0, 1, 2, 3, 4]
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("[format warm-up]: 1/5 steps, ") and "left" in lines[0]
    assert lines[-1].startswith("[format warm-up]: 5/5 steps, ") and lines[-1].endswith("(done)")
    quiet = io.StringIO()
    with Progress(3, "convert", stream=quiet, every=3600) as progress:
        progress.update(3)
    assert quiet.getvalue().startswith("convert: 3/3 steps") and len(quiet.getvalue().splitlines()) == 1


def test_rollout_progress_bars_become_plain_lines_outside_a_terminal():
    stream = io.StringIO()
    bars = ProgressBars(stream=stream, every=0.0)
    bars.on_phase("generate", 3)
    bars.on_progress({"generate": (5, 16), "reward": (2, 16)})
    bars.close()
    assert stream.getvalue() == "rollout 3: generate 5/16, reward 2/16\n"


@pytest.mark.parametrize("save, interval, expected", [
    ("ckpt", None, [4]),        # --save alone: after the last rollout (slime would save nothing)
    ("ckpt", 0, [4]),
    ("ckpt", 2, [1, 3, 4]),     # every 2 rollouts and after the last
    ("ckpt", 10, [4]),
    (None, 2, []),              # nowhere to save
])
def test_checkpoints_follow_save_interval_and_the_last_rollout(save, interval, expected):
    from plugrl.core.loop import saves_after

    args = SimpleNamespace(save=save, save_interval=interval)
    assert [r for r in range(5) if saves_after(args, r, last_rollout=4)] == expected


def test_one_run_at_a_time_holds_a_save_directory(tmp_path):
    """A second holder (here another process, as a second run would be) is refused and told who holds it;
    the lock goes away with its holder, also when that process dies without releasing it."""
    import subprocess
    import sys

    hold = ("import sys, time; from plugrl.core.checkpoint import SaveDirLock; "
            "lock = SaveDirLock(sys.argv[1]); assert lock.acquire('run A (pid 1, output runs/a)') is None; "
            "print('held', flush=True); time.sleep(60)")
    other = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        assert SaveDirLock(str(tmp_path)).acquire("run B") == "run A (pid 1, output runs/a)"
    finally:
        other.kill()  # dies holding it
        other.wait()
    lock = SaveDirLock(str(tmp_path))
    assert lock.acquire("run B") is None
    second = SaveDirLock(str(tmp_path))
    assert second.acquire("run C") == "run B"  # a second open in one process is refused too
    lock.release()
    assert second.acquire("run C") is None
    second.release()


def test_a_second_run_on_the_same_save_directory_is_refused(tmp_path):
    from plugrl.core.checkpoint import lock_run_dirs

    save, base = tmp_path / "ckpt", tmp_path / "first_weights"
    base.mkdir()
    first, problem = lock_run_dirs(str(base), str(save), "run A")
    assert problem is None and len(first) == 1  # only --save: a --load of first weights is shared by many runs
    sweep, problem = lock_run_dirs(str(base), str(tmp_path / "exp2"), "run B")
    assert problem is None  # another experiment from the same first weights
    assert lock_run_dirs(None, str(save), "run C") == ([], f"--save {save} is in use by another run (run A): two runs "
                                                           "would mix their checkpoints; wait for it to end, or give "
                                                           "this run another --save")
    whole_checkpoint(save, 1)  # run A has written a checkpoint: resuming from it elsewhere must wait
    _, problem = lock_run_dirs(str(save), str(tmp_path / "elsewhere"), "run D")
    assert problem.startswith(f"--load {save} is the --save of a run still writing checkpoints there (run A)")
    assert SaveDirLock(str(tmp_path / "elsewhere")).acquire("probe") is None  # D's --save lock was given back
    link = tmp_path / "ckpt_link"
    link.symlink_to(save)
    for lock in first + sweep:
        lock.release()
    taken, problem = lock_run_dirs(str(link), str(save), "run E")  # --load is --save through a link: one lock
    assert problem is None and len(taken) == 1
    blocked = tmp_path / "a_file"
    blocked.write_text("x")
    assert lock_run_dirs(None, str(blocked / "sub"), "run F") == ([], None)  # cannot lock there: unguarded, no crash


def _resume_args(load, prompt_data=None):
    return SimpleNamespace(load=str(load), prompt_data=prompt_data, input_key="prompt", label_key="label",
                           rollout_max_prompt_len=None, skip_bad_rows=False)


def test_resuming_from_a_damaged_checkpoint_is_refused_before_anything_moves(tmp_path):
    from plugrl.core.resume_check import resume_problems

    whole_checkpoint(tmp_path, 3)
    newest = whole_checkpoint(tmp_path, 5)
    assert resume_problems(_resume_args(tmp_path)) == []
    (newest / "meta.json").unlink()
    (problem,) = resume_problems(_resume_args(tmp_path))
    assert problem == (f"--load {tmp_path}: the checkpoint to resume from, rollout_000005, is damaged: its meta.json is "
                       f"missing or unreadable; move it out of the way (mv {newest} {tmp_path}/damaged_rollout_000005) "
                       "to resume from rollout_000003, the newest whole checkpoint there")
    newest.rename(tmp_path / "damaged_rollout_000005")  # what the message says to do
    assert resume_problems(_resume_args(tmp_path)) == []


def test_resuming_past_the_end_of_smaller_prompt_data_is_refused(tmp_path):
    from plugrl.core.resume_check import resume_problems

    ckpt = whole_checkpoint(tmp_path / "ckpt", 1)
    (ckpt / "rollout_state.json").write_text(json.dumps({"data_source": {"offset": 8, "dataset_size": 40}}))
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "label": "1"}) + "\n" for i in range(5)))
    (problem,) = resume_problems(_resume_args(tmp_path / "ckpt", str(data)))
    assert problem == (f"--load {tmp_path / 'ckpt'}: rollout_000001 was saved 8 prompts into an epoch of 40 prompts, "
                       f"but --prompt-data {data} now has 5; resume with the prompt data it was saved with, or start "
                       "a new run (another --save, no --load)")
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "label": "1"}) + "\n" for i in range(12)))
    assert resume_problems(_resume_args(tmp_path / "ckpt", str(data))) == []

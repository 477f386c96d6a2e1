"""Driver-side checks before Ray starts (core/preflight.py): each bad input is one line naming the
flag, the file (and line) and the fix, from ``--dry-run`` and from the start of ``plugrl train``."""

import json
import os
import shutil
import sys
from types import SimpleNamespace

import pytest

from plugrl.core import preflight
from plugrl.core.train_cli import main as train_main


pytestmark = pytest.mark.usefixtures("no_ray_started")


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def base_argv(model, tmp_path, prompts=None, *extra):
    prompts = prompts or write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "1+1", "label": "2"}] * 4)
    return ["--hf-checkpoint", str(model), "--prompt-data", prompts, "--input-key", "prompt", "--label-key", "label",
            "--rm-type", "deepscaler", "--rollout-batch-size", "2", "--n-samples-per-prompt", "2",
            "--global-batch-size", "4", "--num-rollout", "1", "--output-dir", str(tmp_path / "out"), *extra]


def run_main(argv, capsys):
    code = train_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- --save -----------------------------------------------------------------------------------------
def test_save_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    (problem,) = preflight.save_problems(SimpleNamespace(save=str(tmp_path / "file" / "ckpt"), output_dir=None))
    assert problem == f"--save {tmp_path / 'file' / 'ckpt'} is under {tmp_path / 'file'}, which is a file, not a " \
                      "directory; choose a directory path"


def test_save_in_a_read_only_place_is_refused():
    # /sys is read-only even for root (os.access would say yes to root; the probe write does not).
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("no /sys")
    (problem,) = preflight.save_problems(SimpleNamespace(save="/sys/kernel/plugrl-ckpt", output_dir=None))
    assert problem.startswith("--save /sys/kernel/plugrl-ckpt: cannot write in /sys/kernel (")


def test_save_with_another_runs_checkpoints_is_refused_unless_resumed_or_overwritten(tmp_path):
    save = tmp_path / "ckpt"
    for name in ("rollout_000001", "rollout_000003", "rollout_000005"):
        (save / name).mkdir(parents=True)
    (save / "latest").write_text("rollout_000005\n")
    args = SimpleNamespace(save=str(save), output_dir=None, load=None, overwrite_save=False)
    (problem,) = preflight.save_problems(args)
    # the three checkpoints are named, and the ``latest`` pointer is not counted as a fourth
    assert problem == (f"--save {save} already holds checkpoints of another run (rollout_000001, rollout_000003, "
                       f"rollout_000005); resume it with --load {save}, pass --overwrite-save to delete "
                       "them, or choose another --save")
    (save / "rollout_000007").mkdir()
    (problem,) = preflight.save_problems(args)
    assert "(rollout_000001, rollout_000003, rollout_000005 and 1 more)" in problem
    args.load = str(save) + "/"  # the same directory, spelled differently
    assert preflight.save_problems(args) == []
    args.load, args.overwrite_save = None, True
    assert preflight.save_problems(args) == []


# ---- --load -----------------------------------------------------------------------------------------
def test_a_load_path_that_does_not_exist_is_refused_unless_it_is_also_save(tmp_path):
    typo = tmp_path / "ckpt_typo"
    (problem,) = preflight.load_problems(SimpleNamespace(load=str(typo), save=str(tmp_path / "ckpt")))
    assert problem.startswith(f"--load {typo} does not exist; to resume a run, give the directory its --save wrote")
    assert "to start fresh, drop --load" in problem
    # slime's --load DIR --save DIR: the first run finds nothing and starts fresh
    assert preflight.load_problems(SimpleNamespace(load=str(typo), save=str(typo) + "/")) == []
    hf_dir = tmp_path / "hf_dir"
    hf_dir.mkdir()  # first weights (slime: an HF or torch_dist directory under --load) are allowed
    (hf_dir / "model.safetensors").write_bytes(b"")
    assert preflight.load_problems(SimpleNamespace(load=str(hf_dir), save=None)) == []
    (tmp_path / "dist").mkdir()
    (tmp_path / "dist" / "latest_checkpointed_iteration.txt").write_text("release")
    assert preflight.load_problems(SimpleNamespace(load=str(tmp_path / "dist"), save=None)) == []
    assert preflight.load_problems(SimpleNamespace(load=None, save=None)) == []


def test_a_load_path_holding_no_checkpoint_is_refused(tmp_path):
    """Easy mistakes that would start a long run over: one checkpoint instead of the --save directory, the
    run's output directory, an empty directory. --load equal to --save stays slime's fresh-then-resume."""
    save = tmp_path / "ckpt"
    (save / "rollout_000004").mkdir(parents=True)
    (save / "rollout_000004" / "model.safetensors").write_bytes(b"")
    (save / "latest").write_text("rollout_000004")

    def problems(load, save=None):
        return preflight.load_problems(SimpleNamespace(load=str(load), save=save))

    assert problems(save) == []
    assert problems(save / "rollout_000004") == [
        f"--load {save / 'rollout_000004'} is one checkpoint, not a --save directory: give its parent, --load {save} "
        "(it resumes from the checkpoint that directory's `latest` names)"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    (problem,) = problems(run)
    assert problem.startswith(f"--load {run} is a run's output directory (config.yaml, metrics.jsonl), not a --save "
                              "directory, so the run would start over; to resume a run, give the directory its --save")
    (tmp_path / "empty").mkdir()
    (problem,) = problems(tmp_path / "empty")
    assert "is a directory with no checkpoint and no model weights in it" in problem
    assert problems(tmp_path / "empty", save=str(tmp_path / "empty")) == []
    (tmp_path / "a_file").write_text("x")
    (problem,) = problems(tmp_path / "a_file")
    assert problem.startswith(f"--load {tmp_path / 'a_file'} is a file, not a directory; to resume a run, give")


def test_where_a_run_with_load_starts(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert preflight.start_point(SimpleNamespace(load=None)) is None
    assert preflight.start_point(SimpleNamespace(load=str(ckpt))) == (
        f"--load {ckpt}: no checkpoint there (no `latest` file or rollout_* folder), so the run starts at rollout 0")
    for rollout_id in (2, 5):
        (ckpt / f"rollout_{rollout_id:06d}").mkdir(parents=True)
        (ckpt / f"rollout_{rollout_id:06d}" / "meta.json").write_text(json.dumps({"rollout_id": rollout_id}))
    (ckpt / "latest").write_text("rollout_000005\n")
    assert preflight.start_point(SimpleNamespace(load=str(ckpt))) == (
        f"--load {ckpt}: resumes after rollout 5 (rollout_000005)")
    # a kill between the two renames of a rewrite of rollout 5: the start puts the copy back, so the
    # dry run (which changes nothing) already counts it
    (ckpt / ".old_rollout_000005.xyz").mkdir()
    (ckpt / "rollout_000005").rename(ckpt / ".old_rollout_000005.xyz" / "checkpoint")
    assert preflight.start_point(SimpleNamespace(load=str(ckpt))) == (
        f"--load {ckpt}: resumes after rollout 5 (rollout_000005)")
    assert sorted(p.name for p in ckpt.iterdir()) == [".old_rollout_000005.xyz", "latest", "rollout_000002"]
    # a run that already trained its last rollout has nothing to resume (plugrl train stops before Ray)
    assert preflight.finished_run(SimpleNamespace(load=str(ckpt), num_rollout=7)) is None
    finished = (f"--load {ckpt}: the run already trained rollouts 0-5 (rollout_000005), and --num-rollout is 6: "
                "nothing left to train; raise --num-rollout to go on")
    assert preflight.finished_run(SimpleNamespace(load=str(ckpt), num_rollout=6)) == finished
    assert preflight.start_point(SimpleNamespace(load=str(ckpt), num_rollout=6)) == finished
    from plugrl.core.checkpoint import clean_interrupted_writes, find_latest_checkpoint

    assert find_latest_checkpoint(str(ckpt)) == str(ckpt / "rollout_000002")  # before the tidy-up
    assert clean_interrupted_writes(str(ckpt)) == ["restored rollout_000005 from .old_rollout_000005.xyz",
                                                   "removed .old_rollout_000005.xyz"]
    assert find_latest_checkpoint(str(ckpt)) == str(ckpt / "rollout_000005")


def test_mistyped_load_stops_the_run_before_ray_and_dry_run_shows_the_start(model, tmp_path, capsys):
    typo = tmp_path / "ckpt_typo"
    code, _, err = run_main(base_argv(model, tmp_path, None, "--load", str(typo), "--save", str(tmp_path / "ckpt")),
                            capsys)
    assert code == 2 and f"--load {typo} does not exist" in err
    code, out, err = run_main(base_argv(model, tmp_path, None, "--dry-run", "--load", str(typo), "--save", str(typo)),
                              capsys)
    assert code == 0, err
    assert f"# --load {typo}: no checkpoint there (no `latest` file or rollout_* folder), so the run starts at " \
           "rollout 0" in out


def test_temp_folders_alone_are_not_another_runs_checkpoints(tmp_path):
    (tmp_path / ".rollout_000002.abc").mkdir()
    assert preflight.save_problems(SimpleNamespace(save=str(tmp_path), output_dir=None, load=None)) == []


# ---- the model folder ---------------------------------------------------------------------------------
def test_model_folder_with_only_config_names_tokenizer_and_weights_not_the_data(model, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(model / "config.json", bare / "config.json")
    code, _, err = run_main(base_argv(bare, tmp_path), capsys)
    assert code == 2
    assert f"--hf-checkpoint {bare} has no tokenizer" in err
    assert f"--hf-checkpoint {bare} has no weights" in err
    assert "prompts.jsonl" not in err


def test_corrupt_config_json_is_one_line_not_a_traceback(model, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    (broken / "config.json").write_text('{"model_type": "qwen3",\n  "hidden_size": }')
    code, _, err = run_main(base_argv(broken, tmp_path), capsys)
    assert code == 2
    assert err.strip() == (f"plugrl train: error: --hf-checkpoint {broken}: config.json is not valid JSON (line 2, "
                           "column 18: Expecting value); restore the model's config.json")


def test_index_naming_a_missing_shard(model, tmp_path):
    copy = tmp_path / "sharded"
    shutil.copytree(model, copy)
    (copy / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    problems = preflight.model_problems(SimpleNamespace(hf_checkpoint=str(copy)))
    assert problems == [f"--hf-checkpoint {copy}: model.safetensors.index.json names 1 missing weight file(s): "
                        "model-00002-of-00002.safetensors"]


def test_complete_model_folder_passes(model):
    assert preflight.model_problems(SimpleNamespace(hf_checkpoint=str(model), apply_chat_template=True)) == []


# ---- --*-path functions --------------------------------------------------------------------------------
def test_custom_paths_importable_with_the_right_signature(tmp_path, monkeypatch):
    (tmp_path / "user_fns.py").write_text(
        "def rm(args, sample):\n    return 1.0\n"
        "def plain_rm(sample, scale=1):\n    return 1.0\n"
        "def bad_rm():\n    return 1.0\n"
        "def buffer_two(args, rollout_id):\n    return []\n"
        "def hook(args, sample, *, rollout_id, evaluation):\n    return None\n"
        "NOT_CALLABLE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def problems(**paths):
        base = {dest: None for dest in (*preflight.PATH_SIGNATURES, "custom_rm_path")}
        return preflight.import_problems(SimpleNamespace(**{**base, **paths}))

    assert problems(custom_rm_path="user_fns:rm") == []
    assert problems(custom_rm_path="user_fns.plain_rm") == []
    (bad,) = problems(custom_rm_path="user_fns:bad_rm")
    assert bad.startswith("--custom-rm-path user_fns:bad_rm: takes (), but plugrl calls async fn(args, sample)")
    (buffer,) = problems(buffer_filter_path="user_fns:buffer_two")
    assert buffer.startswith("--buffer-filter-path user_fns:buffer_two: takes (args, rollout_id), but plugrl calls "
                             "fn(args, rollout_id, buffer, num_samples)")
    (missing,) = problems(custom_rm_path="no_such_module_xyz:rm")
    assert missing.startswith("--custom-rm-path no_such_module_xyz:rm: cannot import it (ImportError: cannot import "
                              "module 'no_such_module_xyz'")
    (attr,) = problems(dynamic_sampling_filter_path="user_fns:nothing_here")
    assert "has no attribute 'nothing_here'" in attr
    assert problems(custom_rm_path="user_fns:NOT_CALLABLE") == ["--custom-rm-path user_fns:NOT_CALLABLE is not "
                                                               "callable (a int: 3); point it at a function"]
    (tmp_path / "script_fns.py").write_text("import sys\ndef rm(sample):\n    return 1.0\nsys.exit(3)\n")
    assert problems(custom_rm_path="script_fns:rm") == [
        "--custom-rm-path script_fns:rm: importing it called sys.exit(3); move the module's script code under "
        '`if __name__ == "__main__":`']
    (hooks,) = problems(rollout_sample_hook_path=["user_fns:hook", "user_fns:rm"])
    assert hooks.startswith("--rollout-sample-hook-path user_fns:rm: takes (args, sample), but plugrl calls "
                            "fn(args, sample, *, rollout_id, evaluation)")


# ---- data files -----------------------------------------------------------------------------------------
def test_malformed_prompt_file_is_reported_by_the_driver(model, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1", "label": "2"}, '{"prompt": "2+2", "label": '])
    code, _, err = run_main(base_argv(model, tmp_path, prompts), capsys)
    assert code == 2
    assert err.startswith(f"plugrl train: error: --prompt-data: {prompts}, line 2: ")
    assert len(err.strip().splitlines()) == 1


def test_empty_prompt_file_is_reported_by_the_driver(model, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = run_main(base_argv(model, tmp_path, str(empty)), capsys)
    assert code == 2
    assert err.strip() == f"plugrl train: error: --prompt-data: {empty}: no prompts left (0 lines read)"


def test_prompt_file_missing_the_label_key(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1"}])
    args = SimpleNamespace(prompt_data=prompts, input_key="prompt", label_key="label", eval_prompt_data=None)
    (problem,) = preflight.data_problems(args)
    assert problem.startswith(f"--prompt-data: {prompts}, line 1: no key 'label'")


def test_eval_and_sft_files_are_parsed(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "1+1", "label": "2"}])
    bad_eval = write_jsonl(tmp_path / "eval.jsonl", ["[1, 2]"])
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c"}])
    args = SimpleNamespace(prompt_data=good, input_key="prompt", label_key="label",
                           eval_prompt_data=["toy", bad_eval], sft_warmup_data=sft, sft_warmup_steps=3)
    problems = preflight.data_problems(args)
    assert problems[0].startswith(f"--eval-prompt-data: {bad_eval}, line 1: expected a JSON object, got list")
    assert problems[1] == (f"--sft-warmup-data: {sft}, line 2: no 'response' "
                           "(each line is {\"prompt\": ..., \"response\": ...})")


# ---- values, and --dry-run ------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value, message", [
    ("--reward-timeout", "-5", "--reward-timeout must be > 0 seconds, got -5"),
    ("--reward-timeout", "0", "--reward-timeout must be > 0 seconds, got 0"),
    ("--reward-error-threshold", "1.5", "--reward-error-threshold is a fraction of a rollout's samples in (0, 1], "
                                        "got 1.5"),
])
def test_reward_limits_are_refused_in_dry_run(model, tmp_path, capsys, flag, value, message):
    code, _, err = run_main(base_argv(model, tmp_path, None, "--dry-run", flag, value), capsys)
    assert code == 2
    assert err.startswith(f"plugrl train: error: {message}")


def test_dry_run_lists_what_would_fail_at_start(model, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, out, err = run_main(base_argv(model, tmp_path, None, "--dry-run", "--save", str(tmp_path / "file" / "c"),
                                        "--custom-rm-path", "no_such_module_xyz.rm"), capsys)
    assert code == 1
    assert "# ---- plan" in out
    assert f"  - --save {tmp_path / 'file' / 'c'} is under {tmp_path / 'file'}, which is a file" in err
    assert "  - --custom-rm-path no_such_module_xyz.rm: cannot import it" in err


def test_valid_inputs_pass_dry_run(model, tmp_path, capsys):
    code, out, err = run_main(base_argv(model, tmp_path, None, "--dry-run", "--save", str(tmp_path / "ckpt")), capsys)
    assert code == 0, err
    assert "# ready: every path and package this run needs is here" in out


def test_a_ref_load_that_does_not_exist_stops_the_run_on_the_driver(model, tmp_path, capsys):
    missing = tmp_path / "ref_typo"
    code, _, err = run_main(base_argv(model, tmp_path, None, "--ref-load", str(missing)), capsys)
    assert code == 2
    assert f"--ref-load {missing} does not exist (give the reference model: a Hugging Face directory or a " \
           "torch_dist checkpoint)" in err
    code, _, err = run_main(base_argv(model, tmp_path, None, "--ref-load", str(model), "--dry-run"), capsys)
    assert code == 0, err


def test_save_hf_pattern_and_place_are_checked_on_the_driver(tmp_path):
    assert preflight.save_hf_problems(str(tmp_path / "hf_{rollout_id}")) == []
    (problem,) = preflight.save_hf_problems(str(tmp_path / "hf_{step}"))
    assert problem.startswith(f"--save-hf {tmp_path / 'hf_{step}'}: only {{rollout_id}} may appear in braces (KeyError")
    for pattern, error in (("hf_{rollout_id.x}", "AttributeError"), ("hf_{rollout_id[0]}", "TypeError"),
                           ("hf_{0}", "IndexError")):  # one line each, not a traceback
        (problem,) = preflight.save_hf_problems(str(tmp_path / pattern))
        assert problem.startswith(f"--save-hf {tmp_path / pattern}: only {{rollout_id}} may appear in braces ({error}")
    (tmp_path / "file").write_text("x")
    (problem,) = preflight.save_hf_problems(str(tmp_path / "file" / "hf"))
    assert problem == f"--save-hf {tmp_path / 'file' / 'hf'} is under {tmp_path / 'file'}, which is a file, not a " \
                      "directory; choose a directory path"

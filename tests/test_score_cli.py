"""``plugrl score``: rows in, rewards out; malformed rows reported by line; exit codes; custom rewards."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from plugrl.core.score import main

GOOD_AND_BAD = [
    json.dumps({"response": "<think>hm</think> so \\boxed{\\frac12}", "label": "0.5", "id": "a"}),  # 1
    json.dumps({"response": "</think> \\boxed{3}", "label": 4, "id": "b"}),  # 0
    '{"response": "</think> \\\\boxed{1}", "label": ',  # line 3: truncated JSON
    json.dumps({"label": "1", "id": "d"}),  # line 4: no response
    "",  # blank lines are not rows
    json.dumps({"response": "</think>\\boxed{7}", "label": "7", "prompt": "p", "metadata": {"k": 1}, "id": "e"}),  # 1
    "[1, 2]",  # line 7: not an object
]


@pytest.fixture
def rows_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(GOOD_AND_BAD) + "\n")
    return path


def _summary(out: str) -> dict:
    return dict(line.split(": ", 1) for line in out.splitlines() if line.split(": ", 1)[0] in ("count", "mean", "errors"))


def _read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_scores_good_rows_and_reports_bad_ones_by_line(rows_file, tmp_path, capsys):
    out_path = tmp_path / "out.jsonl"
    code = main(["--rm-type", "deepscaler", "--input", str(rows_file), "--output", str(out_path)])
    captured = capsys.readouterr()
    assert code == 1
    assert _summary(captured.out) == {"count": "3", "mean": "0.666667", "errors": "3"}
    assert f"{rows_file}:3: invalid JSON" in captured.err
    assert f"{rows_file}:4: missing key 'response'" in captured.err
    assert f"{rows_file}:7: expected a JSON object, got list" in captured.err
    assert ":6:" not in captured.err and ":5:" not in captured.err
    rows = _read_jsonl(out_path)
    assert [(r["id"], r["reward"]) for r in rows] == [("a", 1), ("b", 0), ("e", 1)]
    assert rows[2]["metadata"] == {"k": 1} and rows[2]["prompt"] == "p"


def test_all_rows_good_exits_zero_and_prints_no_rows(tmp_path, capsys):
    path = tmp_path / "good.jsonl"
    path.write_text("\n".join([GOOD_AND_BAD[0], GOOD_AND_BAD[1]]) + "\n")
    assert main(["--rm-type", "deepscaler", "--input", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[:3] == ["count: 2", "mean: 0.5", "errors: 0"]
    assert captured.err == ""


def test_custom_keys_and_options(tmp_path, capsys):
    path = tmp_path / "keys.jsonl"
    path.write_text(json.dumps({"completion": "\\boxed{4}", "answer": "4"}) + "\n")
    code = main(["--rm-type", "math", "--rm-opt", "timeout=0", "--input", str(path),
                 "--response-key", "completion", "--label-key", "answer"])
    assert code == 0
    assert _summary(capsys.readouterr().out)["mean"] == "1"


def test_dict_rewards_with_and_without_reward_key(tmp_path, capsys):
    path = tmp_path / "dapo.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"response": "Answer: 42", "label": 42},
        {"response": "\\boxed{42}", "label": 42},
        {"response": "Answer: 7", "label": "7"},
    ]) + "\n")
    out_path = tmp_path / "out.jsonl"
    assert main(["--rm-type", "dapo", "--reward-key", "score", "--input", str(path), "--output", str(out_path)]) == 0
    assert _summary(capsys.readouterr().out) == {"count": "3", "mean": "0.333333", "errors": "0"}
    assert _read_jsonl(out_path)[1]["reward"] == {"score": -1.0, "acc": False, "pred": "[INVALID]"}

    assert main(["--rm-type", "dapo", "--input", str(path)]) == 0
    assert "mean: n/a (dict rewards: pass --reward-key" in capsys.readouterr().out


def test_unknown_reward_suggests_a_close_match(rows_file, capsys):
    assert main(["--rm-type", "deepscalr", "--input", str(rows_file)]) == 2
    err = capsys.readouterr().err
    assert "unknown reward 'deepscalr'" in err
    assert "Did you mean 'deepscaler'?" in err


def test_help_documents_exit_codes(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "exit status: 0 every row was scored; 1 some row was malformed or failed" in " ".join(out.split())


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        async def slime_rm(args, sample, **kwargs):
            # slime's signature: settings come from args (here --rm-opt bonus=...)
            return len(sample.response) + args.bonus

        def plain(sample, scale=1):
            if sample.label == "boom":
                raise RuntimeError("cannot grade this one")
            return scale * float(sample.label)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [
        {"response": "abc", "label": "1"},
        {"response": "hello", "label": "boom"},
        {"response": "z", "label": "2.5"},
    ]) + "\n")
    return rows


def test_custom_rm_path_with_slime_signature(custom_module, tmp_path, capsys):
    out_path = tmp_path / "out.jsonl"
    code = main(["--custom-rm-path", "my_rewards:slime_rm", "--rm-opt", "bonus=10", "--input", str(custom_module),
                 "--output", str(out_path)])
    assert code == 0
    assert [r["reward"] for r in _read_jsonl(out_path)] == [13, 15, 11]
    assert _summary(capsys.readouterr().out)["mean"] == "13"


def test_custom_rm_path_plain_function_and_a_failing_row(custom_module, capsys):
    code = main(["--custom-rm-path", "my_rewards.plain", "--rm-opt", "scale=2", "--input", str(custom_module)])
    captured = capsys.readouterr()
    assert code == 1
    assert _summary(captured.out) == {"count": "2", "mean": "3.5", "errors": "1"}
    assert f"{custom_module}:2: reward failed: RuntimeError: cannot grade this one" in captured.err


def test_custom_rm_path_that_does_not_import(custom_module, capsys):
    assert main(["--custom-rm-path", "my_rewards:missing", "--input", str(custom_module)]) == 2
    assert "has no attribute 'missing'" in capsys.readouterr().err


def test_console_script(rows_file, tmp_path):
    script = Path(sys.executable).with_name("plugrl")
    out_path = tmp_path / "cli.jsonl"
    env = {**os.environ, "PLUGRL_GRADER_WORKERS": "1"}
    proc = subprocess.run([str(script), "score", "--rm-type", "deepscaler", "--input", str(rows_file),
                           "--output", str(out_path)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert _summary(proc.stdout) == {"count": "3", "mean": "0.666667", "errors": "3"}
    assert f"{rows_file}:7:" in proc.stderr
    assert [r["reward"] for r in _read_jsonl(out_path)] == [1, 0, 1]


def test_rows_become_finished_samples_with_lengths(tmp_path, monkeypatch, capsys):
    """A length- or status-aware reward sees in `plugrl score` what it sees in training: completed samples
    (or the row's status) whose response_length is the row's, else the --hf-checkpoint tokenizer's count."""
    from plugrl.plugins.backends.tiny_default import build_tokenizer

    tokenizer_dir = tmp_path / "tok"
    tokenizer = build_tokenizer([{"prompt": "What is 2 + 3?"}])
    tokenizer.save_pretrained(tokenizer_dir)
    (tmp_path / "length_rewards.py").write_text(
        "def length_and_status(sample):\n"
        "    return {'length': sample.response_length, 'completed': int(sample.status.value == 'completed')}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [
        {"response": "The answer is 42.", "label": None},
        {"response": "cut off", "label": None, "status": "truncated", "response_length": 7},
        {"response": "x", "label": None, "status": "pending"},
        {"response": "x", "label": None, "response_length": -1},
    ]) + "\n")
    out = tmp_path / "out.jsonl"
    code = main(["--custom-rm-path", "length_rewards:length_and_status", "--input", str(rows), "--output", str(out),
                 "--hf-checkpoint", str(tokenizer_dir), "--reward-key", "length"])
    err = capsys.readouterr().err
    assert code == 1  # the two bad rows
    expected = len(tokenizer("The answer is 42.", add_special_tokens=False)["input_ids"])
    assert expected > 0
    assert [r["reward"] for r in _read_jsonl(out)] == [{"length": expected, "completed": 1},
                                                        {"length": 7, "completed": 0}]
    assert f"{rows}:3: status 'pending' is not one of completed, truncated, aborted, failed" in err
    assert f"{rows}:4: response_length must be a whole number >= 0, got -1" in err
    assert main(["--custom-rm-path", "length_rewards:length_and_status", "--input", str(rows),
                 "--hf-checkpoint", str(tmp_path / "nowhere")]) == 2
    assert "--hf-checkpoint" in capsys.readouterr().err


def test_bad_inputs_and_outputs_are_refused_before_scoring(tmp_path, monkeypatch, capsys):
    (tmp_path / "rm_mod.py").write_text("def rm(sample):\n    return None if sample.label == 'na' else 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"response": "a", "label": "na"}\n{"response": 7, "label": "x"}\n{"response": "b", "label": "x"}\n')
    base = ["--custom-rm-path", "rm_mod:rm", "--input", str(rows)]
    out = tmp_path / "out.jsonl"
    assert main([*base, "--output", str(out)]) == 1  # the int response
    captured = capsys.readouterr()
    assert f"{rows}:2: 'response' must be a string, got int" in captured.err
    assert [r["reward"] for r in _read_jsonl(out)] == [0.0, 1.0]  # None: not applicable, scored 0 as in training
    for output, why in [(tmp_path, f"--output {tmp_path} is a directory; give a file path"),
                        (tmp_path / "no" / "o.jsonl", f"--output {tmp_path / 'no' / 'o.jsonl'}: its folder "
                                                       f"{tmp_path / 'no'} does not exist"),
                        (rows, f"--output {rows} is the --input file; it would be replaced by the scored rows only: "
                               "write elsewhere")]:
        assert main([*base, "--output", str(output)]) == 2
        assert capsys.readouterr().err.strip() == f"plugrl score: {why}"
    assert rows.read_text().count("\n") == 3  # the input is untouched
    for flags, why in [(["--concurrency", "0"], "--concurrency must be at least 1 (rows scored at once), got 0"),
                       (["--hf-checkpoint", str(tmp_path / "nope")], f"--hf-checkpoint {tmp_path / 'nope'} is not a "
                                                                       "directory; give the model folder whose tokenizer")]:
        assert main([*base, "--output", str(out), *flags]) == 2
        assert capsys.readouterr().err.strip().startswith(f"plugrl score: {why}")
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b'{"response": "\xed\xa0"}\n')
    assert main(["--custom-rm-path", "rm_mod:rm", "--input", str(binary)]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err


def test_ctrl_c_keeps_the_rows_already_scored(tmp_path):
    """SIGINT while a slow reward is scoring: the rows scored so far are written to --output, exit 130."""
    import signal
    import subprocess
    import time

    (tmp_path / "slow_rm.py").write_text(
        "import time\n"
        "def rm(sample):\n"
        "    if sample.label == 'slow':\n"
        "        time.sleep(60)\n"
        "    return 1.0\n")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"response": "r", "label": label}) + "\n"
                            for label in ["fast", "fast", "slow", "fast"]))
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "plugrl.core.cli", "score", "--custom-rm-path", "slow_rm:rm",
                             "--input", str(rows), "--output", str(out), "--concurrency", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    time.sleep(8)  # the two fast rows are scored, the slow one is running
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"plugrl score: interrupted after 2 of 4 rows; wrote the 2 scored rows to {out}" in err
    assert "Traceback" not in err
    assert [r["reward"] for r in _read_jsonl(out)] == [1.0, 1.0]

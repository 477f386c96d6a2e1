"""Prompt lengths checked on the driver (core/prompt_check.py via core/preflight.py), before Ray starts:
prompts the model's context cannot hold and a prompt limit that drops every prompt are one line naming
the flag, the file, the first offending line and the fix, in ``--dry-run`` and at the start of a run."""

import json

import pytest

from plugrl.core import prompt_check
from plugrl.core.train_cli import main as train_main

TOY = "plugins/backends/torch/data/toy_math_train.jsonl"


pytestmark = pytest.mark.usefixtures("no_ray_started")


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


def context(model) -> int:
    return json.loads((model / "config.json").read_text())["max_position_embeddings"]


def data_with_a_long_row(tmp_path, tokens_over: int = 1000, line: int = 3):
    """Short prompts with one row, at ``line``, ``tokens_over`` tokens longer than the tiny model's context."""
    rows = [json.loads(x) for x in open(TOY).read().splitlines()[:8]]
    rows.insert(line - 1, {"prompt": "7" * (256 + tokens_over), "label": "7"})
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def train(model, tmp_path, capsys, *extra, prompts=TOY):
    code = train_main(["--hf-checkpoint", str(model), "--input-key", "prompt", "--label-key", "label", "--rm-type",
                       "deepscaler", "--rollout-batch-size", "4", "--n-samples-per-prompt", "2", "--prompt-data",
                       prompts, "--num-rollout", "2", "--rollout-max-response-len", "8", "--output-dir",
                       str(tmp_path / "out"), *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err, captured.err  # the dry run lists what would fail on stderr


def tokens(model, text: str) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(model))(text, add_special_tokens=False)["input_ids"])


def test_a_prompt_longer_than_the_context_is_refused_before_ray_naming_line_and_fix(model, tmp_path, capsys):
    assert context(model) == 256
    prompts = data_with_a_long_row(tmp_path)
    n = tokens(model, "7" * 1256)
    code, _, err = train(model, tmp_path, capsys, prompts=prompts)
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"plugrl train: error: --prompt-data {prompts}, line 3: the prompt has {n} tokens after the chat template, "
        f"and the model's context is 256 (max_position_embeddings in --hf-checkpoint {model}/config.json; a prompt "
        "must be shorter); 1 of the 9 prompts is that long: pass --rollout-max-prompt-len 255 to drop them at "
        "load, or use a model with a longer context")
    code, out, _ = train(model, tmp_path, capsys, "--dry-run", prompts=prompts)
    assert "line 3: the prompt has" in out and "--rollout-max-prompt-len 255 to drop them" in out


def test_the_prompt_limit_that_drops_long_rows_passes_and_one_that_keeps_them_is_refused(model, tmp_path, capsys):
    prompts = data_with_a_long_row(tmp_path, tokens_over=20)
    code, _, err = train(model, tmp_path, capsys, "--dry-run", "--rollout-max-prompt-len", "255", prompts=prompts)
    assert code == 0, err
    code, out, _ = train(model, tmp_path, capsys, "--dry-run", "--rollout-max-prompt-len", "300", prompts=prompts)
    assert ("and --rollout-max-prompt-len 300 keeps them: lower it to 255 or less, or use a model with a longer "
            "context") in out


@pytest.mark.parametrize("flag, value, named", [("--rollout-max-context-len", "5", "--rollout-max-context-len 5"),
                                                ("--rollout-max-prompt-len", "4", "--rollout-max-prompt-len 4")])
def test_a_limit_that_drops_every_prompt_is_refused_once_before_ray(model, tmp_path, capsys, flag, value, named):
    code, _, err = train(model, tmp_path, capsys, flag, value)
    assert code == 2
    lines = [line for line in err.splitlines() if "no prompts left" in line]
    assert len(lines) == 1
    assert lines[0].startswith(f"plugrl train: error: --prompt-data {TOY}: no prompts left: {named} keeps prompts of "
                               "at most 4 tokens and all 800 are longer (the shortest has ")
    assert lines[0].endswith("raise the limit or check --input-key and --apply-chat-template")


def test_eval_prompts_too_long_for_the_model_are_named(model, tmp_path, capsys):
    prompts = data_with_a_long_row(tmp_path)
    code, out, _ = train(model, tmp_path, capsys, "--dry-run", "--eval-prompt-data", "toy", prompts, "--eval-interval", "1",
                         "--rollout-max-prompt-len", "255")
    assert f"--eval-prompt-data {prompts}, line 3: the prompt has" in out
    assert "(eval prompts are not filtered by --rollout-max-prompt-len)" in out


def test_the_scan_is_bounded(model, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setattr(prompt_check, "SCAN_ROWS", 5)
    kwargs = {"input_key": "prompt", "label_key": "label"}
    scan = prompt_check.scan_prompts(TOY, AutoTokenizer.from_pretrained(str(model)), kwargs, rows=5)
    assert (len(scan.lengths), scan.lines, scan.complete) == (5, [1, 2, 3, 4, 5], False)
    scan = prompt_check.scan_prompts(f"{TOY}@[798:]", AutoTokenizer.from_pretrained(str(model)), kwargs, rows=5)
    assert (scan.lines, scan.complete) == ([799, 800], True)


def test_message_prompts_are_counted_through_the_chat_template(model, tmp_path, capsys):
    """Message prompts (no --apply-chat-template: the rollout manager templates them itself): transformers 5
    returns a BatchEncoding (a Mapping, not a dict) from apply_chat_template, which was read as 2 tokens (its
    keys) here and as the token ids ['input_ids', 'attention_mask'] by the rollout manager."""
    from transformers import AutoTokenizer

    from plugrl.core.data import chat_prompt_ids
    from plugrl.core.rollout import SampleGenerator
    from plugrl.core.types import Sample

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    messages = [{"role": "user", "content": "What is 3 - 3 + 5?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert chat_prompt_ids(tokenizer, messages) == expected
    generator = SampleGenerator.__new__(SampleGenerator)  # prompt_ids reads only the tokenizer
    generator.tokenizer = tokenizer
    assert generator.prompt_ids(Sample(index=0, prompt=messages)) == expected
    rows = [{"prompt": [{"role": "user", "content": "7" * 1200}], "label": "7"}] + [
        {"prompt": [{"role": "user", "content": f"What is {i} + 0?"}], "label": str(i)} for i in range(8)]
    path = tmp_path / "messages.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = train(model, tmp_path, capsys, "--dry-run", prompts=str(path))
    assert code != 0 and f"--prompt-data {path}, line 1: the prompt has" in err


def test_a_chat_template_that_fails_on_a_message_prompt_is_one_line(model, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken_template"
    shutil.copytree(model, broken)
    (broken / "chat_template.jinja").write_text("{{ raise_exception('this template takes no system messages') }}")
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + 0?"}], "label": str(i)} for i in range(8)]
    path = tmp_path / "messages.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = train(broken, tmp_path, capsys, "--dry-run", prompts=str(path))
    assert code != 0 and "Traceback" not in err
    assert (f"--prompt-data: {path}, line 1: the tokenizer's chat template fails on this message prompt "
            "(TemplateError: this template takes no system messages)") in err

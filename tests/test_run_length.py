"""How long a run trains, known on the driver (core/prompt_check.py): ``--num-epoch E`` without
``--num-rollout`` is slime's ``(prompts // --rollout-batch-size) * E`` rollouts, counted after
``--rollout-max-prompt-len``; without --prompt-data --num-rollout is required; the embedded default
keeps its 100 rollouts."""

import json

import pytest

from plugrl.core import loop
from plugrl.core.train_cli import main as train_main

TOY = "plugins/backends/torch/data/toy_math_train.jsonl"


pytestmark = pytest.mark.usefixtures("no_ray_started")


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture
def started(monkeypatch):
    """The args ``run_training`` would get (the loop itself is not run)."""
    seen = []

    def run_training(args, plugin_set, **_):
        seen.append(args)
        return loop.RunSummary(rollouts=args.num_rollout, output_dir=args.output_dir)

    monkeypatch.setattr(loop, "run_training", run_training)
    return seen


def train(model, tmp_path, capsys, *extra, prompts=TOY):
    data = ["--prompt-data", prompts] if prompts else []
    code = train_main(["--hf-checkpoint", str(model), "--input-key", "prompt", "--label-key", "label", "--rm-type",
                       "deepscaler", "--rollout-batch-size", "4", "--n-samples-per-prompt", "2", *data,
                       "--rollout-max-response-len", "8", "--output-dir", str(tmp_path / "out"), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_num_epoch_sets_the_rollouts_on_the_driver(model, tmp_path, capsys, started):
    code, out, err = train(model, tmp_path, capsys, "--num-epoch", "2", prompts=f"{TOY}@[0:10]")
    assert code == 0, err
    assert started[0].num_rollout == 4  # (10 // 4) * 2, as slime
    assert "plugrl train: 4 rollouts, output in" in out
    code, out, _ = train(model, tmp_path, capsys, "--num-epoch", "2", "--dry-run", prompts=f"{TOY}@[0:10]")
    assert "loop: sync; 4 rollouts (--num-epoch 2 × 2 per epoch: 10 prompts // --rollout-batch-size 4)" in out


def test_num_epoch_counts_the_prompts_left_after_the_prompt_limit(model, tmp_path, capsys, started):
    rows = [json.loads(x) for x in open(TOY).read().splitlines()[:12]]
    rows[:4] = [{"prompt": "9" * 100, "label": "9"}] * 4  # dropped by --rollout-max-prompt-len 60
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = train(model, tmp_path, capsys, "--num-epoch", "3", "--rollout-max-prompt-len", "60",
                         prompts=str(path))
    assert code == 0, err
    assert started[0].num_rollout == 6  # (8 // 4) * 3


def test_an_epoch_shorter_than_a_rollout_is_refused(model, tmp_path, capsys, started):
    code, _, err = train(model, tmp_path, capsys, "--num-epoch", "1", prompts=f"{TOY}@[0:3]")
    assert code == 2 and not started
    assert err.strip() == (f"plugrl train: error: --num-epoch 1: --prompt-data {TOY}@[0:3] has 3 prompts, fewer than "
                           "one rollout of --rollout-batch-size 4; lower --rollout-batch-size or give --num-rollout")


def test_num_rollout_wins_over_num_epoch(model, tmp_path, capsys, started):
    code, _, err = train(model, tmp_path, capsys, "--num-epoch", "5", "--num-rollout", "3")
    assert code == 0, err
    assert started[0].num_rollout == 3


def test_without_prompt_data_num_rollout_is_required_on_the_driver(model, tmp_path, capsys, started):
    code, _, err = train(model, tmp_path, capsys, prompts=None)
    assert code == 2 and not started
    assert ("--num-rollout is required without --prompt-data (how many rollouts to train); --num-epoch counts "
            "passes over --prompt-data instead") in err
    code, _, err = train(model, tmp_path, capsys, "--num-epoch", "1", prompts=None)
    assert "--num-epoch 1 counts passes over --prompt-data, which is not given" in err


def test_with_prompt_data_a_run_length_is_required(model, tmp_path, capsys, started):
    code, _, err = train(model, tmp_path, capsys)
    assert code == 2 and not started
    assert "give --num-rollout or --num-epoch (how long to train)" in err


def test_the_embedded_default_runs_100_rollouts(tmp_path, capsys):
    code = train_main(["--dry-run", "--output-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    assert "loop: sync; 100 rollouts (--num-rollout)" in out

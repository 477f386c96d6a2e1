"""slime's debug modes and reward-less losses (core/debug_modes.py, core/reward_call.py): --debug-rollout-only
generates without train actors, training, weight pushes or checkpoints; --debug-train-only is refused on
the driver (plugrl has no saved-rollout flags to train from); --loss-type sft_loss without --rm-type runs
without resolving a reward."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from plugrl.core.reward_call import needs_reward, no_reward
from plugrl.core.train_cli import main as train_main
from plugrl.plugins.backends.tiny_default import build_tiny_checkpoint

TOY = "plugins/backends/torch/data/toy_math_train.jsonl"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny")


def argv(model, tmp_path, *extra):
    return ["--hf-checkpoint", str(model), "--input-key", "prompt", "--label-key", "label", "--rollout-batch-size", "4",
            "--n-samples-per-prompt", "2", "--rollout-max-response-len", "8", "--prompt-data", f"{TOY}@[0:8]",
            "--output-dir", str(tmp_path / "out"), *extra]


def test_debug_train_only_is_refused_on_the_driver(model, tmp_path, capsys):
    code = train_main(argv(model, tmp_path, "--num-rollout", "1", "--debug-train-only", "--dry-run"))
    err = capsys.readouterr().err
    assert code == 2
    assert ("--debug-train-only is not implemented in plugrl (slime trains from rollouts saved with "
            "--save-debug-rollout-data, which plugrl does not have); drop it") in err


def test_debug_rollout_only_refuses_what_needs_a_trainer(model, tmp_path, capsys):
    code = train_main(argv(model, tmp_path, "--rm-type", "deepscaler", "--num-rollout", "1", "--debug-rollout-only",
                           "--save", str(tmp_path / "ckpt"), "--dry-run"))
    err = capsys.readouterr().err
    assert code == 2
    assert (f"--debug-rollout-only generates without training, so there is no trainer state to load or save: drop "
            f"--save {tmp_path / 'ckpt'} (or --debug-rollout-only)") in err


def test_debug_rollout_only_samples_one_per_prompt_without_estimator_rules(model, tmp_path, capsys):
    """Nothing trains, so grpo's groups-of-two rule does not apply; a training run is still refused."""
    one = argv(model, tmp_path)
    one[one.index("--n-samples-per-prompt") + 1] = "1"
    assert train_main([*one, "--rm-type", "deepscaler", "--num-rollout", "1", "--debug-rollout-only", "--dry-run"]) == 0
    capsys.readouterr()
    assert train_main([*one, "--rm-type", "deepscaler", "--num-rollout", "1", "--dry-run"]) == 2
    assert "--advantage-estimator grpo with --n-samples-per-prompt 1" in capsys.readouterr().err


def test_a_run_without_rm_type_needs_no_reward_unless_it_learns_from_rewards():
    assert not needs_reward(SimpleNamespace(rm_type=None, custom_rm_path=None, loss_type="sft_loss"))
    assert needs_reward(SimpleNamespace(rm_type="deepscaler", custom_rm_path=None, loss_type="sft_loss"))
    assert needs_reward(SimpleNamespace(rm_type=None, custom_rm_path=None, loss_type="policy_loss"))
    import asyncio

    reward = no_reward(SimpleNamespace(loss_type="sft_loss"))
    assert asyncio.run(reward.score([object(), object()])) == [0.0, 0.0]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "PLUGRL_CACHE": str(cache), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def run_cli(args, env):
    return subprocess.run([sys.executable, "-m", "plugrl.core.cli", "train", *args], capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.mark.slow
def test_debug_rollout_only_generates_every_rollout_of_the_epochs_without_training(model, tmp_path, env):
    result = run_cli(argv(model, tmp_path, "--rm-type", "deepscaler", "--num-epoch", "1", "--debug-rollout-only"), env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "plugrl train: 2 rollouts, output in" in result.stdout  # 8 prompts // 4 per rollout
    assert "--debug-rollout-only: generating only (no train actors, training, weight pushes or checkpoints)" in \
        result.stdout
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    rollouts = [r for r in rows if r["phase"] == "train"]
    assert [r["rollout_id"] for r in rollouts] == [0, 1]
    assert all("rollout/raw_reward" in r and not any(k.startswith("train/") for k in r) for r in rollouts)
    assert all("perf/weight_sync_time" not in r and "perf/train_time" not in r for r in rollouts)


@pytest.mark.slow
def test_sft_loss_without_rm_type_trains(model, tmp_path, env):
    result = run_cli(argv(model, tmp_path, "--num-rollout", "1", "--loss-type", "sft_loss"), env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "rpartition" not in result.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout/raw_reward"] for r in rows if r["phase"] == "train"] == [0.0]


def test_debug_rollout_only_drops_a_recipes_checkpoint_paths():
    """Over the 4B recipe (--load/--save /root/...): no resume point, run lock or --save tidying acts on them."""
    from plugrl.core.config import parse_config
    from plugrl.core.plugins import make_plugin_manager

    ps = make_plugin_manager(entry_points=False)
    recipe = parse_config(["--recipe", "qwen3-4b-8xh100"], ps)
    assert recipe.load and recipe.save  # the recipe names them
    only = parse_config(["--recipe", "qwen3-4b-8xh100", "--debug-rollout-only"], ps)
    assert (only.load, only.save, only.save_hf) == (None, None, None)

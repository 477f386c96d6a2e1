"""--async --max-staleness K end to end on the embedded default (real Ray, CPU): K=1 is today's
one-step-off order exactly; with a trainer slowed down (a --custom-advantage-function-path that
sleeps, run inside the train actor) generation runs ahead, and no rollout trains on samples more
than K weight versions old, while the bound is reached."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

PLUGRL = [sys.executable, "-m", "plugrl.core.cli"]
BASE = ["train", "--async", "--num-rollout", "6", "--sft-warmup-steps", "5", "--rollout-batch-size", "4",
        "--n-samples-per-prompt", "2", "--global-batch-size", "8", "--eval-interval", "0"]
SLOW_ADVANTAGES = '''
import time
import torch


def slow_grpo_like(args, rollout_data):
    time.sleep(float(__import__("os").environ.get("PLUGRL_TEST_TRAIN_DELAY", "0")))
    rollout_data["advantages"] = [torch.full((n,), float(r)) for n, r in
                                  zip(rollout_data["response_lengths"], rollout_data["rewards"])]
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    helpers = tmp_path_factory.mktemp("helpers")
    (helpers / "slow_advantages.py").write_text(SLOW_ADVANTAGES)
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "PLUGRL_CACHE": str(cache), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
            "PYTHONPATH": f"{helpers}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def train_rows(args, env, out):
    result = subprocess.run(PLUGRL + args + ["--output-dir", str(out)], env=env, capture_output=True, text=True,
                            timeout=1200, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["phase"] == "train"]


def test_k1_is_the_one_step_off_order(tmp_path, env):
    rows = train_rows(BASE + ["--max-staleness", "1"], env, tmp_path / "k1")
    versions = [(r["rollout/weight_version_min"], r["rollout/weight_version_max"]) for r in rows]
    assert versions == [(0, 0)] + [(k - 1, k - 1) for k in range(1, 6)]  # as without the flag
    assert [r["rollout/weight_staleness"] for r in rows] == [0] + [1] * 5


def test_a_slow_trainer_never_trains_on_samples_older_than_k(tmp_path, env):
    slow = {**env, "PLUGRL_TEST_TRAIN_DELAY": "3"}
    rows = train_rows(BASE + ["--num-rollout", "7", "--max-staleness", "3", "--custom-advantage-function-path",
                              "slow_advantages.slow_grpo_like"], slow, tmp_path / "k3")
    staleness = [r["rollout_id"] - r["rollout/weight_version_min"] for r in rows]
    assert all(0 <= s <= 3 for s in staleness), staleness
    assert max(staleness) == 3, staleness  # generation ran ahead of the slow trainer up to the bound
    assert all(r["rollout/stale_dropped_groups"] == 0 for r in rows)  # no partial rollout here

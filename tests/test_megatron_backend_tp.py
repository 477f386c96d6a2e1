"""The megatron backend with two ranks on CPU (gloo, fp32, real megatron-core): TP=2 and DP=2 each
give the single-process backend's metrics and updated weights for one GRPO step on the same batch.
This exercises the vocab-parallel log-probs, the TP gathers of the export, megatron's DDP reduction
and the 1/G objective under data parallelism. (TP with sequence parallelism needs reduce-scatter,
which gloo lacks: that case runs on two GPUs in tests/test_megatron_gpu.py.)"""

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core not installed (plugrl[megatron])")

from plugrl.plugins.backends.tiny_default import build_tiny_checkpoint

from .megatron_ranks import run_ranks, train_data
from .test_torch_trainer import make_args, random_sequences

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")
# adam_eps 1e-6: Adam's first step moves a weight by ~lr whatever its gradient's size, so gradients at
# float-noise level (summation order differs across ranks) would otherwise show as lr-sized differences.
ARGS = {"lr": 1e-3, "adam_eps": 1e-6, "clip_grad": 1e9, "n_samples_per_prompt": 2, "micro_batch_size": 1,
        "use_dynamic_batch_size": False, "max_tokens_per_gpu": None, "weight_decay": 0.0, "rollout_temperature": 0.8}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny"))


def single_process_reference(checkpoint, data, **overrides):
    """The torch backend (HF model + AdamW) in this process: an implementation independent of megatron."""
    from plugrl.plugins.backends.torch_trainer import TorchTrainBackend
    from plugrl.plugins.estimators.grpo import GRPOEstimator

    args = make_args(checkpoint, **{**ARGS, **overrides})
    backend = TorchTrainBackend(args, estimator=GRPOEstimator(args))
    return backend.train(0, data), backend.model.state_dict()


@pytest.mark.parametrize("tp", [2, 1], ids=["tp2", "dp2"])
def test_two_ranks_equal_one(checkpoint, tmp_path, tp):
    seqs, resp = random_sequences(seed=5, count=8)
    data = train_data(seqs, resp, [1.0, -1.0, 0.5, -0.5, 0.0, 1.0, 0.25, -0.75])
    expected, expected_weights = single_process_reference(checkpoint, data)
    got, weights = run_ranks(checkpoint, tmp_path, data, world=2, tp=tp, device="cpu", sequence_parallel=False,
                             args_overrides={**ARGS, "device": "cpu"})
    for key in ("train/pg_loss", "train/entropy_loss", "train/grad_norm", "train/train_rollout_logprob_abs_diff"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), (key, got[key], expected[key])
    for name, tensor in expected_weights.items():
        if name == "lm_head.weight" and name not in weights:  # tied embeddings travel once
            continue
        torch.testing.assert_close(weights[name].float(), tensor.float(), atol=2e-5, rtol=1e-4, msg=name)


def test_dp2_with_overlapped_grad_reduce_equals_one(checkpoint, tmp_path):
    """--overlap-grad-reduce over two optimizer steps whose micro-batch counts differ (dynamic batches of
    at most 14 tokens: one per DP rank in the first step, two in the second). Megatron's DDP learns in the
    first step which grads a backward produces; from the second on, every bucket's reduction is launched
    by the last micro-batch's backward, and the result is still the one-process step. Without no_sync
    around the earlier micro-batches, the second step's reduction would start after its first micro-batch."""
    gen = torch.Generator().manual_seed(7)
    seqs = [torch.randint(5, 300, (n,), generator=gen).tolist() for n in [6] * 4 + [14] * 4]
    resp = [3] * 4 + [7] * 4
    data = train_data(seqs, resp, [1.0, -1.0, 0.5, -0.5, 0.0, 1.0, 0.25, -0.75])
    batching = {"global_batch_size": 4, "use_dynamic_batch_size": True, "max_tokens_per_gpu": 14}
    expected, expected_weights = single_process_reference(checkpoint, data, **batching)
    got, weights = run_ranks(checkpoint, tmp_path, data, world=2, tp=1, device="cpu", sequence_parallel=False,
                             args_overrides={**ARGS, **batching, "device": "cpu", "overlap_grad_reduce": True,
                                             "probe_overlap": True})
    assert got["grad_reduce_launched_before_step"] == [False, True]
    for key in ("train/pg_loss", "train/grad_norm"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), (key, got[key], expected[key])
    for name, tensor in expected_weights.items():
        if name == "lm_head.weight" and name not in weights:
            continue
        torch.testing.assert_close(weights[name].float(), tensor.float(), atol=2e-5, rtol=1e-4, msg=name)


def test_plugrl_train_with_megatron_tp2_checkpoints_and_resumes(tmp_path):
    """The whole loop with --train-backend megatron on two CPU train ranks (TP 2): the default toy
    run, shortened, saves every rollout; --load then continues after the last checkpoint, and the
    resumed rollout equals the one of a straight run (same weights, prompts and sampling seeds)."""
    import json
    import os
    import sys

    from .test_train_e2e import run_plugrl

    env = {**os.environ, "PLUGRL_CACHE": str(tmp_path / "cache"), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}
    base = [sys.executable, "-m", "plugrl.core.cli", "train", "--train-backend", "megatron",
            "--tensor-model-parallel-size", "2", "--actor-num-gpus-per-node", "2", "--device", "cpu",
            "--sft-warmup-steps", "20", "--eval-interval", "0", "--rollout-batch-size", "8",
            "--global-batch-size", "64"]

    def run(*extra):
        proc = run_plugrl(base[3:] + list(extra), env)  # limits only a hang reaches (no output for 15 min)
        assert proc.returncode == 0, proc.stderr[-3000:]

    def rows(run_dir):
        with open(run_dir / "metrics.jsonl") as f:
            return {r["rollout_id"]: r for r in map(json.loads, f) if r["phase"] == "train"}

    run("--num-rollout", "2", "--save", str(tmp_path / "ckpt"), "--save-interval", "1",
        "--output-dir", str(tmp_path / "first"))
    run("--num-rollout", "3", "--load", str(tmp_path / "ckpt"), "--output-dir", str(tmp_path / "resumed"))
    run("--num-rollout", "3", "--output-dir", str(tmp_path / "straight"))
    resumed, straight = rows(tmp_path / "resumed"), rows(tmp_path / "straight")
    assert sorted(resumed) == [2] and sorted(straight) == [0, 1, 2]
    for key in ("rollout/raw_reward", "train/pg_loss", "train/grad_norm"):
        assert resumed[2][key] == pytest.approx(straight[2][key], rel=1e-5, abs=1e-7), key

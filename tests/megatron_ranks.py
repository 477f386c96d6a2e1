"""Helpers shared by the megatron backend tests and their rank worker (tests/megatron_tp_worker.py):
the backend's args, a GRPO batch, the backend itself, and ``run_ranks``, which starts one worker
process per rank. Plain absolute imports only: the worker imports this file as a top-level module."""

import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import torch


def make_args(checkpoint, **overrides):
    values = {"hf_checkpoint": checkpoint, "device": "cuda", "lr": 1e-5, "weight_decay": 0.0, "adam_beta1": 0.9,
                  "adam_beta2": 0.98, "adam_eps": 1e-8, "clip_grad": 1.0, "seed": 0, "rollout_temperature": 1.0,
                  "micro_batch_size": 1, "use_dynamic_batch_size": True, "max_tokens_per_gpu": 4096,
                  "global_batch_size": None, "eps_clip": 0.2, "eps_clip_high": 0.28, "loss_type": "policy_loss",
                  "kl_coef": 0.0, "use_kl_loss": False, "entropy_coef": 0.0, "n_samples_per_prompt": 4}
    values.update(overrides)
    return SimpleNamespace(**values)


def train_data(seqs, resp, rewards):
    return {"tokens": seqs, "response_lengths": resp, "rewards": rewards, "raw_reward": rewards,
            "loss_masks": [[1] * r for r in resp], "rollout_log_probs": [[0.0] * r for r in resp],
            "rollout_ids": list(range(len(seqs))), "rollout_mask_sums": list(resp)}


def megatron(args):
    from plugrl.plugins.backends.megatron.backend import MegatronTrainBackend
    from plugrl.plugins.estimators.grpo import GRPOEstimator

    return MegatronTrainBackend(args, estimator=GRPOEstimator(args))


def run_ranks(checkpoint, workdir, data, *, world: int, tp: int, device: str, sequence_parallel: bool,
              args_overrides: dict | None = None) -> tuple[dict, dict]:
    """Start ``world`` worker processes (tests/megatron_tp_worker.py); rank 0's metrics and weights."""
    (workdir / "data.json").write_text(json.dumps(data))
    (workdir / "args.json").write_text(json.dumps(args_overrides or {}))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    worker = os.path.join(os.path.dirname(__file__), "megatron_tp_worker.py")
    procs = []
    for rank in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank if device == "cuda" else 0)}
        procs.append(subprocess.Popen([sys.executable, worker, checkpoint, str(workdir), device, str(tp),
                                       "1" if sequence_parallel else "0"], env=env))
    assert [p.wait(timeout=600) for p in procs] == [0] * world
    return json.loads((workdir / "metrics.json").read_text()), torch.load(workdir / "weights.pt")

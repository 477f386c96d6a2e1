"""The GPU path end to end (run on the GPU machine: ``python -m pytest -m gpu tests/test_gpu_path.py``):
the README's main command learns on CUDA, the Qwen3-4B recipe scaled to one GPU runs with its own
offload defaults inside its host-memory plan, the decoupled recipe runs on 2 GPUs, and a run killed on
the GPU resumes from its checkpoint. Every run here is a real ``plugrl train`` process (real Ray,
real megatron-core where the recipe selects it). Skipped without CUDA; slow by nature."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .test_resume import latest_id

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PLUGRL = [sys.executable, "-m", "plugrl.core.cli"]
ROOT = Path(__file__).resolve().parents[1]
RECOMPILE_WARNING = "recompile_limit"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = os.environ.get("PLUGRL_CACHE") or str(tmp_path_factory.mktemp("cache"))
    return {**os.environ, "PLUGRL_CACHE": cache, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
            "PYTHONUNBUFFERED": "1"}


def run(args, env, log: Path, timeout: float):
    with open(log, "w") as out:
        result = subprocess.run(PLUGRL + args, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                                check=False)
    return result.returncode, log.read_text(errors="replace")


def rows(metrics: Path, phase: str = "train") -> list[dict]:
    return [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("phase") == phase]


def test_default_command_learns_on_cuda(tmp_path, env):
    """`plugrl train` with no flags: bf16 chosen for CUDA and reported, eval rises by >= 0.3 (chance is
    ~1/3 after the format warm-up; the CPU runs end near 1.0), no dynamo recompile warnings."""
    code, log = run(["train", "--output-dir", str(tmp_path / "run")], env, tmp_path / "train.log", timeout=900)
    assert code == 0, log[-4000:]
    assert "train precision bf16, packed attention varlen flash [auto (cuda)" in log, log[:3000]
    match = re.search(r"first eval ([0-9.]+) -> last eval ([0-9.]+)", log)
    assert match, log[-2000:]
    first, last = map(float, match.groups())
    assert last - first >= 0.3, (first, last)
    assert RECOMPILE_WARNING not in log


def test_fp32_override_runs_sdpa_on_cuda(tmp_path, env):
    """--fp32 wins over the CUDA default and runs the SDPA packed attention (the flash kernel refuses fp32)."""
    code, log = run(["train", "--fp32", "--num-rollout", "2", "--sft-warmup-steps", "5", "--eval-interval", "0",
                     "--output-dir", str(tmp_path / "run")], env, tmp_path / "train.log", timeout=600)
    assert code == 0, log[-4000:]
    assert "train precision fp32, packed attention SDPA per sample [--fp32]" in log
    assert len(rows(tmp_path / "run" / "metrics.jsonl")) == 2


@pytest.fixture(scope="module")
def recipe_checkpoint(tmp_path_factory, env):
    """A Qwen3-4B-shaped checkpoint (random bf16 weights, the tiny tokenizer) and its torch_dist copy
    for the reference model, as `benchmarks/recipe_run.sh` builds them."""
    root = Path(os.environ.get("PLUGRL_GPU_TEST_MODELS") or tmp_path_factory.mktemp("models"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from hf_engine_throughput import build
    finally:
        sys.path.pop(0)
    ckpt = root / "4b" if (root / "4b" / "config.json").exists() else build("4b", root)
    dist = root / "4b_torch_dist"
    if not (root / ".4b_torch_dist.done").exists():
        result = subprocess.run(PLUGRL + ["convert", "hf-to-megatron", "--hf-checkpoint", str(ckpt), "--save", str(dist)],
                                env=env, capture_output=True, text=True, timeout=900, check=False)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        (root / ".4b_torch_dist.done").touch()
    return ckpt, dist


def recipe_args(ckpt, dist, out: Path, rollouts: int) -> list[str]:
    from plugrl.plugins.backends.tiny_default import EVAL_FILE, TRAIN_FILE

    return ["train", "--hf-checkpoint", str(ckpt), "--ref-load", str(dist), "--prompt-data", str(TRAIN_FILE),
            "--eval-prompt-data", "toy", str(EVAL_FILE), "--eval-interval", "0", "--save", "", "--load", "",
            "--rollout-backend", "hf", "--rollout-num-gpus-per-engine", "1", "--num-rollout", str(rollouts),
            "--rollout-max-response-len", "512", "--output-dir", str(out)]


# A rollout's tokens are scored by the engine (HF transformers, bf16, SDPA) and again by the trainer
# (megatron-core, bf16, varlen flash, fused RMSNorm/RoPE) with the same weights: the two forwards differ
# only by bf16 rounding in differently ordered kernels. On a near-uniform 151,936-way distribution
# (random weights) a log-prob is a sum over ~36 layers of bf16 rounding (relative 2^-8 per op) of
# logits of size ~1, i.e. a few 1e-2 nats per token at most; a wrong weight mapping, a missing
# RoPE or a stale push moves log-probs by whole nats. 0.1 nats separates the two with margin.
LOGPROB_DIFF_BOUND = 0.1


def test_4b_recipe_on_one_gpu_with_its_own_offload_defaults(tmp_path, env, recipe_checkpoint):
    """`--recipe qwen3-4b-8xh100` on one GPU (TP 1): colocated, trainer and engine offloaded (the
    recipe's defaults), 2 rollouts. Every phase is timed, the engine and trainer agree on log-probs,
    the host peak stays within 15% of the plan printed at start, no recompile warnings."""
    ckpt, dist = recipe_checkpoint
    out = tmp_path / "run"
    args = recipe_args(ckpt, dist, out, 2) + ["--recipe", "qwen3-4b-8xh100", "--actor-num-gpus-per-node", "1",
                                              "--tensor-model-parallel-size", "1", "--no-sequence-parallel"]
    code, log = run(args, env, tmp_path / "train.log", timeout=900)
    assert code == 0, log[-5000:]
    train = rows(out / "metrics.jsonl")
    assert [r["rollout_id"] for r in train] == [0, 1]
    for row in train:
        for phase in ("wait_rollout", "train", "weight_sync", "offload", "step"):
            assert row[f"perf/{phase}_time"] > 0, (phase, row)
        assert row["train/train_rollout_logprob_abs_diff"] < LOGPROB_DIFF_BOUND, row
    peak, plan = train[-1]["perf/host_mem_peak_gib"], train[-1]["perf/host_mem_plan_gib"]
    assert abs(peak - plan) <= 0.15 * peak, (peak, plan)
    assert RECOMPILE_WARNING not in log


def test_decoupled_recipe_on_two_gpus(tmp_path, env, recipe_checkpoint):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"the decoupled recipe needs 2 GPUs (1 train + 1 engine); this machine has {torch.cuda.device_count()}")
    ckpt, dist = recipe_checkpoint
    out = tmp_path / "run"
    args = recipe_args(ckpt, dist, out, 2) + ["--recipe", "qwen3-4b-8xh100-decoupled", "--actor-num-gpus-per-node", "1",
                                              "--rollout-num-gpus", "1", "--tensor-model-parallel-size", "1",
                                              "--no-sequence-parallel"]
    code, log = run(args, env, tmp_path / "train.log", timeout=900)
    assert code == 0, log[-5000:]
    train = rows(out / "metrics.jsonl")
    assert [r["rollout_id"] for r in train] == [0, 1]
    assert all(r["train/train_rollout_logprob_abs_diff"] < LOGPROB_DIFF_BOUND for r in train)


def test_kill_on_gpu_then_resume(tmp_path, env):
    """SIGKILL the whole run after its second checkpoint; `--load` continues at the next rollout and the
    metrics file continues (each train rollout id once, in order)."""
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    short = ["train", "--sft-warmup-steps", "50", "--eval-interval", "0", "--save", str(ckpt), "--save-interval", "2",
             "--output-dir", str(out)]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(PLUGRL + short + ["--num-rollout", "40"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while (latest_id(ckpt) or -1) < 3:
                assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no second checkpoint in 10 minutes"
                time.sleep(0.2)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    last = latest_id(ckpt)
    assert last is not None and last >= 3
    code, text = run(short + ["--num-rollout", str(last + 3), "--load", str(ckpt)], env, tmp_path / "resumed.log",
                     timeout=600)
    assert code == 0, text[-4000:]
    ids = [r["rollout_id"] for r in rows(out / "metrics.jsonl")]
    assert ids == list(range(last + 3)), ids
    assert "train precision bf16" in text

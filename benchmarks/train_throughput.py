"""Training throughput: the ``torch`` backend (HF model + gradient checkpointing) and the ``megatron``
backend (megatron-core, packed THD micro-batches, full recompute) against two baselines in the same run:
plain ``transformers`` and ``transformers+liger`` (benchmarks/hf_train_baseline.py), same GPU.

Each backend runs in its own process (fresh CUDA memory, its own process group) on a Qwen3-shaped
checkpoint with random bf16 weights built here (no hub): ``4b`` is Qwen3-4B's shape (4.02 B params).
One train() call = one GRPO optimizer step on one micro-batch of ``--tokens`` tokens (``--samples``
sequences, each ``--response`` response tokens after its prompt), forward + backward + optimizer.
MFU counts 6·N FLOPs per token (N = parameters) against the GPU's dense bf16 peak, as
shared/MEASURED.md does. Below the table each row's memory by part, measured from its tensors at an
optimizer step (plugins/backends/state_memory.py): weights, grads, fp32 master weights, optimizer
state, and the rest of the peak (activations, logits, workspace). ``--profile`` adds the top CUDA
kernels of one step per row, baselines included (benchmarks/kernel_profile.py), and ``--attention`` a micro-benchmark
of the packed attention implementations (fwd + bwd).

    python benchmarks/train_throughput.py --model 4b --tokens 9216 --samples 8 --steps 5
    python benchmarks/train_throughput.py --model 4b --backends transformers,transformers+liger,torch,megatron
    python benchmarks/train_throughput.py --model 4b --backends torch,megatron --megatron-tp 2 --profile
    python benchmarks/train_throughput.py --model 4b --backends transformers+liger,torch-fused,torch-full-logits
    python benchmarks/train_throughput.py --model 4b --backends megatron --megatron-dp 2 --checkpoint-cache /tmp/ckpt
    python benchmarks/train_throughput.py --model 4b --backends megatron --megatron-dp 2 --micro-batches 4 --megatron-overlap-grad-reduce
    python benchmarks/train_throughput.py --model 4b --backends megatron --megatron-dp 2 --megatron-unfused
    python benchmarks/train_throughput.py --model 4b --backends megatron --megatron-dp 2 --megatron-recompute block:24

``torch-full-logits`` and ``torch-fused`` are the torch backend with ``--fused-log-probs never`` (log-probs
from full logits) and ``always`` (from hidden states in slices, fused_log_probs.py); ``torch`` is its
default, ``auto`` (fused when a micro-batch's logits exceed one slice, as at the 4B shape), with Liger's
RoPE / RMSNorm / SwiGLU kernels on CUDA when liger-kernel is installed; ``torch-no-liger`` turns those off.
``torch-eager-slices`` runs the fused log-probs' per-slice kernels eagerly (``--compile-log-prob-slices off``);
``torch-no-grad-cache`` keeps no gradient basis from their forward (``--log-prob-grad-cache off``: the
backward recomputes the logits).
``--megatron-tp``/``--megatron-dp`` run the megatron backend on TP x DP GPUs (one process each); with DP
every data-parallel rank trains its own ``--tokens`` micro-batch, so tokens/s per GPU stay comparable.
``--megatron-unfused`` runs its elementwise kernels unfused (the ``--no-*-fusion`` flags), the baseline
of the fusions; ``--megatron-recompute block:N`` recomputes only the first N layers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(__file__))
from hf_engine_throughput import build
from hf_train_baseline import NAMES as BASELINES
from hf_train_baseline import baseline_worker
from gc_pauses import GcPauses
from kernel_profile import profile_cuda, profile_lines

from plugrl.plugins.backends.state_memory import at_next_optimizer_step

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops() -> float:
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return float("nan")


def backend_args(checkpoint: str, backend: str, tokens: int, *, device: str = "cuda", tp: int = 1,
                 recompute: str = "full") -> SimpleNamespace:
    common = {"hf_checkpoint": checkpoint, "device": device, "lr": 1e-6, "weight_decay": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.98,
                  "adam_eps": 1e-8, "clip_grad": 1.0, "seed": 0, "rollout_temperature": 1.0, "micro_batch_size": 1,
                  "use_dynamic_batch_size": True, "max_tokens_per_gpu": tokens, "global_batch_size": None, "eps_clip": 0.2,
                  "eps_clip_high": 0.28, "loss_type": "policy_loss", "kl_coef": 0.0, "use_kl_loss": False, "entropy_coef": 0.0,
                  "n_samples_per_prompt": 8}
    if backend == "torch":
        return SimpleNamespace(**common, gradient_checkpointing=True)
    if backend == "torch-full-logits":  # the torch backend's log-probs from full logits (its own LM head)
        return SimpleNamespace(**common, gradient_checkpointing=True, fused_log_probs="never")
    if backend == "torch-fused":  # ... from hidden states in slices, whatever the size
        return SimpleNamespace(**common, gradient_checkpointing=True, fused_log_probs="always")
    if backend == "torch-eager-slices":  # the fused log-probs' slice kernels run eagerly (not compiled)
        return SimpleNamespace(**common, gradient_checkpointing=True, compile_log_prob_slices="off")
    if backend == "torch-no-grad-cache":  # the fused log-probs recompute every logit in the backward
        return SimpleNamespace(**common, gradient_checkpointing=True, log_prob_grad_cache="off")
    if backend == "torch-no-liger":  # the torch backend without Liger's RoPE / RMSNorm / SwiGLU kernels
        return SimpleNamespace(**common, gradient_checkpointing=True, liger_kernels="off")
    # fp32 grad buffers as slime's recipe sets (--accumulate-allreduce-grads-in-fp32): with bf16 buffers
    # megatron's distributed optimizer makes an fp32 copy of every grad at step time (+4 bytes/param).
    if recompute == "none":
        return SimpleNamespace(**common, recompute_granularity=None, accumulate_allreduce_grads_in_fp32=True,
                               tensor_model_parallel_size=tp, sequence_parallel=tp > 1 and device == "cuda")
    method, layers = ("block", int(recompute.split(":", 1)[1])) if recompute.startswith("block:") else ("uniform", 1)
    return SimpleNamespace(**common, recompute_granularity="full", recompute_method=method, recompute_num_layers=layers,
                           accumulate_allreduce_grads_in_fp32=True, tensor_model_parallel_size=tp,
                           sequence_parallel=tp > 1 and device == "cuda")  # gloo (CPU) has no reduce-scatter


def batch(samples: int, tokens: int, response: int, vocab: int) -> dict:
    length = tokens // samples
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(samples)]
    resp = [min(response, length - 1)] * samples
    rewards = [float(i % 2) for i in range(samples)]
    return {"tokens": seqs, "response_lengths": resp, "rewards": rewards, "raw_reward": rewards,
            "loss_masks": [[1] * r for r in resp], "rollout_log_probs": [[0.0] * r for r in resp],
            "rollout_ids": list(range(samples)), "rollout_mask_sums": resp}


PART_LABELS = {"weights": "weights", "ref_weights": "ref weights", "grads": "grads",
               "master_weights": "fp32 master", "optimizer_state": "optimizer state"}


def memory_parts_line(parts: dict[str, int], peak_gib: float) -> str:
    """``weights 7.5, grads 15.0, ..., rest 6.2`` (GiB; parts that are 0 left out; rest = peak - parts)."""
    shown = [f"{PART_LABELS.get(name, name)} {value / 2**30:.2f}" for name, value in parts.items() if value]
    rest = peak_gib - sum(parts.values()) / 2**30
    return ", ".join(shown + [f"rest {rest:.2f}" if rest == rest else "rest n/a (no GPU peak)"])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _model_parameters(backend, name: str) -> int:
    """Parameters of the whole model (a TP rank holds shards of some and copies of the others)."""
    params = list(backend.model.parameters())
    if name != "megatron" or backend.tp_size == 1:
        return sum(p.numel() for p in params)
    import torch.distributed as dist

    sharded = torch.tensor(float(sum(p.numel() for p in params if getattr(p, "tensor_model_parallel", False))),
                           device=params[0].device)  # NCCL reduces device tensors only
    dist.all_reduce(sharded, group=backend.tp_group)
    return int(sharded.item()) + sum(p.numel() for p in params if not getattr(p, "tensor_model_parallel", False))


def worker(opts) -> dict | None:
    """One backend in this process (one rank of it for megatron with TP > 1): warm-up step, then
    ``--steps`` timed train() calls. Rank 0 returns the result."""
    from plugrl.plugins.estimators.grpo import GRPOEstimator

    if opts.worker in BASELINES:
        return baseline_worker(opts.worker, opts.checkpoint, opts.tokens, opts.samples, opts.steps, opts.device,
                               opts.micro_batches, profile_top=opts.top if opts.profile else None,
                               profile_origins=opts.profile_origins)
    tp = opts.megatron_tp if opts.worker == "megatron" else 1
    dp = opts.megatron_dp if opts.worker == "megatron" else 1
    args = backend_args(opts.checkpoint, opts.worker, opts.tokens, device=opts.device, tp=tp,
                        recompute=opts.megatron_recompute)
    if opts.worker.startswith("torch"):
        from plugrl.plugins.backends.torch.trainer import TorchTrainBackend as Backend
    else:
        from plugrl.plugins.backends.megatron.backend import (
            MegatronTrainBackend as Backend,
        )
    if opts.worker == "megatron" and opts.megatron_unfused:
        for flag in ("no_bias_swiglu_fusion", "no_bias_dropout_fusion", "no_rope_fusion", "no_rmsnorm_fusion"):
            setattr(args, flag, True)
    if opts.worker == "megatron" and opts.megatron_local_grad_ops:
        from plugrl.plugins.backends.megatron import foreach_grad_ops

        foreach_grad_ops.install_foreach_grad_ops = lambda: []  # the optimizer calls it at construction
    if opts.worker == "megatron" and opts.megatron_no_wgrad_fusion:
        args.no_gradient_accumulation_fusion = True
    if opts.worker == "megatron" and opts.megatron_overlap_grad_reduce:
        args.overlap_grad_reduce = True
    if opts.worker == "megatron" and opts.megatron_set:
        args.megatron_passthrough = dict(setting.split("=", 1) for setting in opts.megatron_set)
    backend = Backend(args, estimator=GRPOEstimator(args))
    n_params = _model_parameters(backend, opts.worker)
    vocab = backend.cfg.vocab_size if opts.worker == "megatron" else backend.model.config.vocab_size
    # --tokens per TP group and micro-batch: with DP every data-parallel rank gets its own micro-batches of
    # that size; with --micro-batches K, K of them per rank before the one optimizer step (gradient
    # accumulation, as the recipe's global batch does in the loop).
    k = opts.micro_batches * dp
    data = batch(opts.samples * k, opts.tokens * k, opts.response, vocab)
    tokens = sum(len(t) for t in data["tokens"])
    backend.train(0, data)  # warm-up
    _sync(opts.device)
    if opts.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    state = at_next_optimizer_step(backend.torch_optimizers(), backend.state_memory)
    # the caching allocator's flushes: an allocation that found no cached block frees all cached memory
    # (a device sync plus unmapping) and retries; near a full card that can happen every micro-batch
    retries = torch.cuda.memory_stats().get("num_alloc_retries", 0) if opts.device == "cuda" else 0
    times = []
    with GcPauses() as gc_pauses:
        for step in range(opts.steps):
            start = time.perf_counter()
            backend.train(step + 1, data)
            _sync(opts.device)
            times.append(time.perf_counter() - start)
    cuda = opts.device == "cuda"
    label = opts.worker if tp * dp == 1 else f"megatron tp{tp}" + (f" dp{dp}" if dp > 1 else "")
    if opts.worker == "megatron" and opts.megatron_recompute == "none":
        label += " norc"  # no activation recompute
    elif opts.worker == "megatron" and opts.megatron_recompute.startswith("block:"):
        label += f" rc{opts.megatron_recompute.split(':')[1]}"  # that many layers recomputed
    if opts.worker == "megatron" and opts.megatron_unfused:
        label += " unfused"
    if opts.worker == "megatron" and opts.megatron_local_grad_ops:
        label += " local-grad-ops"
    if opts.worker == "megatron" and opts.megatron_no_wgrad_fusion:
        label += " no-wgrad-fusion"
    if opts.worker == "megatron" and opts.megatron_overlap_grad_reduce and dp > 1:
        label += " overlap"
    if opts.micro_batches > 1:
        label += f" x{opts.micro_batches}mb"
    if opts.worker == "megatron" and opts.megatron_set:
        label += " +" + ",".join(setting.split("=")[0] for setting in opts.megatron_set)
    result = {"backend": label, "gpus": tp * dp, "params": n_params, "tp": tp, "dp": dp,
              "tokens": tokens, "step_s": sorted(times)[len(times) // 2],
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
              "device": torch.cuda.get_device_name() if cuda else "cpu", "state_bytes": state,
              "micro_batches": backend.progress[1],  # this rank's micro-batches in the last train() call
              **gc_pauses.per_step(opts.steps),
              "alloc_retries_per_step": ((torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries) / opts.steps
                                         if cuda else float("nan"))}
    if opts.profile and cuda:
        result["profile"] = profile_cuda(lambda: (backend.train(99, data), torch.cuda.synchronize()), top=opts.top,
                                         origins=opts.profile_origins)
    return result if int(os.environ.get("RANK", "0")) == 0 else None


# the megatron row's on/off switches (each applied and labelled in worker()), passed on to the worker process
MEGATRON_SWITCHES = ("megatron_unfused", "megatron_local_grad_ops", "megatron_no_wgrad_fusion",
                     "megatron_overlap_grad_reduce")


def run_worker(name: str, opts, checkpoint: str) -> dict | None:
    """Start the worker process(es) of one backend; rank 0's result."""
    import socket

    ranks = opts.megatron_tp * opts.megatron_dp if name == "megatron" else 1
    cmd = [sys.executable, __file__, "--worker", name, "--checkpoint", checkpoint, "--tokens", str(opts.tokens),
           "--samples", str(opts.samples), "--response", str(opts.response), "--steps", str(opts.steps),
           "--micro-batches", str(opts.micro_batches), "--device", opts.device,
           "--megatron-tp", str(opts.megatron_tp), "--megatron-dp", str(opts.megatron_dp),
           "--megatron-recompute", opts.megatron_recompute, "--top", str(opts.top)] + (["--profile"] if opts.profile else [])
    cmd += [arg for setting in opts.megatron_set for arg in ("--megatron-set", setting)]
    cmd += ["--" + dest.replace("_", "-") for dest in MEGATRON_SWITCHES if getattr(opts, dest)]
    cmd += ["--profile-origins"] if opts.profile_origins else []
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}  # same for every backend
    if ranks > 1:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(ranks))
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r if opts.device == "cuda" else 0)}
                              if ranks > 1 else env) for r in range(ranks)]
    outputs = [p.communicate() for p in procs]
    lines = [line for line in outputs[0][0].splitlines() if line.startswith("RESULT ")]
    failed = [r for r, p in enumerate(procs) if p.returncode]
    if failed or not lines:
        rank = failed[0] if failed else 0
        print(f"{name} failed (rank {rank}, rc {procs[rank].returncode}):\n{outputs[rank][1][-3000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def attention_bench(samples: int, tokens: int, heads: int = 32, kv_heads: int = 8, dim: int = 128) -> list[dict]:
    """Packed causal attention, fwd + bwd, per implementation (plus FlexAttention with a document mask)."""
    from plugrl.plugins.backends.megatron.attention import packed_attention

    length = tokens // samples
    cu = torch.arange(0, samples + 1, device="cuda", dtype=torch.int32) * length
    q = torch.randn(samples * length, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(samples * length, kv_heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(samples * length, kv_heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    runs = {impl: (lambda impl=impl: packed_attention(q, k, v, cu, length, scale=dim ** -0.5, implementation=impl))
            for impl in ("varlen", "sdpa")}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc = torch.arange(samples, device="cuda").repeat_interleave(length)

        def mask_mod(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

        block_mask = create_block_mask(mask_mod, None, None, samples * length, samples * length, device="cuda")
        compiled = torch.compile(flex_attention)

        def flex():
            out = compiled(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                           block_mask=block_mask, enable_gqa=True, scale=dim ** -0.5)
            return out[0].transpose(0, 1)

        runs["flex"] = flex
    except Exception as exc:  # noqa: BLE001  (flex needs triton and a compiler; report and go on)
        print(f"flex attention unavailable: {exc}", file=sys.stderr)
    flops = 4 * samples * length * length / 2 * heads * dim * 3.5  # causal fwd (2 matmuls) + bwd (2.5x)
    results = []
    for name, fn in runs.items():
        for _ in range(3):
            fn().sum().backward()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            fn().sum().backward()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / 10 * 1e3
        results.append({"impl": name, "ms": ms, "tflops": flops / ms / 1e9})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="4b", choices=["tiny", "0.6b", "4b"])
    parser.add_argument("--tokens", type=int, default=9216, help="tokens per micro-batch (= per step)")
    parser.add_argument("--samples", type=int, default=8, help="sequences packed into the micro-batch")
    parser.add_argument("--response", type=int, default=1024, help="response tokens per sequence")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--micro-batches", type=int, default=1, metavar="K",
                        help="micro-batches of --tokens per optimizer step (gradients accumulated), for every row; "
                             "the recipe's loop accumulates a whole global batch, so its in-loop MFU compares "
                             "with K > 1")
    parser.add_argument("--backends", default="transformers,transformers+liger,torch,megatron",
                        help="rows to run, in order: the baselines " + ", ".join(BASELINES)
                        + ", then torch, torch-fused, torch-full-logits, torch-eager-slices, torch-no-grad-cache, torch-no-liger, "
                        "megatron")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=25, help="kernels listed per backend with --profile")
    parser.add_argument("--profile-origins", action="store_true",
                        help="with --profile: under each top kernel, the ops and source lines that launched it "
                             "(records CPU ops and stacks too; the profiled wall time then means little)")
    parser.add_argument("--megatron-unfused", action="store_true",
                        help="megatron backend with --no-bias-swiglu-fusion --no-bias-dropout-fusion --no-rope-fusion "
                             "--no-rmsnorm-fusion (the elementwise kernels as megatron-core's local spec runs them)")
    parser.add_argument("--megatron-local-grad-ops", action="store_true",
                        help="megatron backend with megatron-core's per-tensor grad-norm / clipping fallbacks "
                             "instead of foreach_grad_ops.py (where neither TE nor apex is installed)")
    parser.add_argument("--megatron-no-wgrad-fusion", action="store_true",
                        help="megatron backend with --no-gradient-accumulation-fusion (bf16 weight gradients added "
                             "to the gradient buffer per micro-batch instead of accumulated by the GEMM)")
    parser.add_argument("--megatron-overlap-grad-reduce", action="store_true",
                        help="megatron backend with --overlap-grad-reduce (with --megatron-dp > 1: each gradient "
                             "bucket reduced over DP during the last micro-batch's backward)")
    parser.add_argument("--megatron-set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a megatron-core TransformerConfig override for the megatron backend (as the "
                             "--megatron-<field> train flag), e.g. bias_activation_fusion=true; repeatable")
    parser.add_argument("--attention", action="store_true", help="also time the packed attention implementations")
    parser.add_argument("--megatron-tp", type=int, default=1,
                        help="tensor parallelism of the megatron backend (that many GPUs, one process each)")
    parser.add_argument("--megatron-dp", type=int, default=1,
                        help="data parallelism of the megatron backend (TP x DP GPUs; each DP rank gets "
                             "its own --tokens micro-batch, the optimizer state is sharded over DP)")
    parser.add_argument("--checkpoint-cache", metavar="DIR",
                        help="build the random checkpoint in DIR/<model> once and reuse it on later runs "
                             "(the 4B build takes minutes)")
    parser.add_argument("--megatron-recompute", default="full", metavar="{full,none,block:N}",
                        help="the megatron backend's activation recompute: full (every layer, the issue's setting), "
                             "none, or block:N (the first N layers recomputed, the rest keep their activations)")
    parser.add_argument("--json", metavar="PATH", help="also write the result rows as JSON")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a smoke run of the same code paths (numbers mean nothing)")
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.micro_batches < 1:
        parser.error(f"--micro-batches {opts.micro_batches}: must be >= 1")
    if opts.megatron_recompute not in ("full", "none") and not (
            opts.megatron_recompute.startswith("block:") and opts.megatron_recompute[6:].isdigit()):
        parser.error(f"--megatron-recompute {opts.megatron_recompute!r}: use full, none or block:N")
    if opts.worker:
        result = worker(opts)
        if result is not None:
            print("RESULT " + json.dumps(result), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(opts.checkpoint_cache or tmp)
        cached = root / opts.model  # build_tiny_checkpoint renames a finished build into place
        checkpoint = str(cached if (cached / "config.json").exists() else build(opts.model, root))
        results = [r for name in opts.backends.split(",") if (r := run_worker(name, opts, checkpoint))]
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=1))
    peak = peak_flops() if opts.device == "cuda" else float("nan")
    device = torch.cuda.get_device_name() if opts.device == "cuda" else "cpu (smoke run)"
    print(f"\ndevice: {device}; model {opts.model}; {opts.micro_batches} x {opts.tokens} tokens/step "
          f"(micro-batches of {opts.samples} x {opts.tokens // opts.samples}), GRPO step incl. optimizer; "
          "per GPU = per process")
    print(f"{'backend':<20}{'GPUs':>5}{'params':>10}{'step s':>9}{'tok/s/GPU':>11}{'MFU(6N)':>9}{'peak GiB':>10}"
          f"{'vs best baseline':>18}")
    per_gpu = {r["backend"]: r["tokens"] / r["step_s"] / r["gpus"] for r in results}
    baselines = [per_gpu[r["backend"]] for r in results if r.get("baseline")]
    best = max(baselines) if baselines else float("nan")
    for r in results:
        tps = per_gpu[r["backend"]]
        mfu = 6 * r["params"] * tps / peak
        print(f"{r['backend']:<20}{r['gpus']:>5}{r['params'] / 1e9:>9.2f}B{r['step_s']:>9.3f}{tps:>11.0f}{mfu:>9.1%}"
              f"{r['peak_gib']:>10.1f}{tps / best:>17.2f}x")
    print("\nmemory by part at an optimizer step (GiB per GPU, measured from the tensors; rest = peak minus "
          "the parts: activations, logits, workspace, allocator slack):")
    for r in results:
        if r.get("state_bytes"):
            retries = r.get("alloc_retries_per_step", float("nan"))
            print(f"  {r['backend']:<18} " + memory_parts_line(r["state_bytes"], r["peak_gib"])
                  + (f"; allocator flushes {retries:.1f}/step" if retries == retries else "")
                  + f"; Python gc {1000 * r['gc_s_per_step']:.1f} ms/step "
                    f"({r['gc_full_collections_per_step']:.1f} full collections)")
    for r in results:
        if "profile" in r:
            print("\n" + "\n".join(profile_lines(r["backend"], r["profile"])))
    if opts.attention:
        print(f"\npacked attention, {opts.samples} x {opts.tokens // opts.samples} tokens, 32 heads / 8 KV, dim 128, "
              "fwd+bwd")
        for row in attention_bench(opts.samples, opts.tokens):
            print(f"  {row['impl']:<8}{row['ms']:8.2f} ms {row['tflops']:8.1f} TFLOP/s")


if __name__ == "__main__":
    main()

"""The baseline rows of ``benchmarks/train_throughput.py``: plain transformers, and transformers with
Liger's kernels, training the same checkpoint on the same micro-batch as the plugrl backends.

Runs inside a worker process of train_throughput.py (one row per process, fresh CUDA memory). One
step = forward + backward + AdamW step over ``--samples`` sequences of ``--tokens / --samples`` tokens
each (equal lengths, so no padding), next-token cross-entropy over the whole sequence, gradient
checkpointing on. The model and its AdamW state stay in the checkpoint's dtype (bf16), as a plain
transformers fine-tune keeps them; plugrl's backends keep fp32 master weights and moments as slime does,
so compare memory by its parts, not its total. ``transformers+liger`` applies
``liger_kernel.transformers.apply_liger_kernel_to_qwen3`` (RoPE, RMSNorm, SwiGLU and the fused linear
cross-entropy that never materialises the full logits); it needs CUDA and the ``liger-kernel`` wheel.
"""

from __future__ import annotations

import time

import torch

from gc_pauses import GcPauses
from plugrl.plugins.backends.state_memory import at_next_optimizer_step, state_bytes

NAMES = ("transformers", "transformers+liger")


def _apply_liger(model) -> None:
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3
    except ImportError as exc:  # a clear reason in the benchmark's stderr, and the row is left out
        raise SystemExit(f"transformers+liger needs the liger-kernel wheel (pip install liger-kernel): {exc}")
    apply_liger_kernel_to_qwen3(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True,
                                model=model)


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def baseline_worker(name: str, checkpoint: str, tokens: int, samples: int, steps: int, device: str,
                    micro_batches: int = 1, profile_top: int | None = None, profile_origins: bool = False) -> dict:
    """Warm-up step, then ``steps`` timed steps; the median step time and the peak memory. A step is
    ``micro_batches`` forward/backward passes of ``tokens`` tokens (gradients accumulated) and one
    optimizer step. With ``profile_top`` (CUDA), one more step's kernels, as the plugrl rows get them."""
    from transformers import AutoModelForCausalLM

    if name not in NAMES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {NAMES}")
    if name == "transformers+liger" and device != "cuda":
        raise SystemExit("transformers+liger runs Triton kernels: it needs --device cuda")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, attn_implementation="sdpa").to(device)
    if name == "transformers+liger":
        _apply_liger(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.1, fused=device == "cuda")
    length = tokens // samples
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (samples, length), generator=generator).to(device)

    def step() -> None:
        for _ in range(micro_batches):
            loss = model(input_ids=input_ids, labels=input_ids).loss / micro_batches
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, kernels' autotuning, optimizer state
    _synchronize(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    state = at_next_optimizer_step([optimizer], lambda: state_bytes(model.parameters(), optimizers=[optimizer]))
    times = []
    with GcPauses() as gc_pauses:
        for _ in range(steps):
            start = time.perf_counter()
            step()
            _synchronize(device)
            times.append(time.perf_counter() - start)
    cuda = device == "cuda"
    result = {"backend": name, "gpus": 1, "params": sum(p.numel() for p in model.parameters()),
              "tokens": samples * length * micro_batches, "step_s": sorted(times)[len(times) // 2],
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
              "device": torch.cuda.get_device_name() if cuda else "cpu", "baseline": True, "state_bytes": state,
              **gc_pauses.per_step(steps)}
    if profile_top is not None and cuda:
        from kernel_profile import profile_cuda

        result["profile"] = profile_cuda(lambda: (step(), _synchronize(device)), top=profile_top,
                                         origins=profile_origins)
    return result

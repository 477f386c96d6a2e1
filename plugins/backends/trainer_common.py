"""Helpers both train backends use (torch and megatron), in their train actors: the device, the LR
schedule, the offload report, and response log-probs over packed rows."""

from __future__ import annotations

import math
import time

import torch
from plugrl.core.types import option as _opt


def resolve_device(requested: str | None) -> torch.device:
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def synced_clock(device: torch.device) -> float:
    """``time.perf_counter()`` once ``device`` has run its queued work (CUDA kernels are asynchronous:
    a clock read without waiting would charge one phase's kernels to the next). One sync per phase
    boundary of a train call, so ``perf/train_log_probs_time`` and ``perf/train_update_time`` are the GPU's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def lr_lambda_factory(args, total_steps: int):
    """LR multiplier per optimizer step: linear warmup, then constant / linear / cosine to ``--min-lr``."""
    base = float(args.lr)
    min_ratio = (float(_opt(args, "min_lr", 0.0)) / base) if base > 0 else 0.0
    warmup = int(_opt(args, "lr_warmup_iters", 0) or 0)
    if getattr(args, "lr_warmup_fraction", None):
        warmup = int(args.lr_warmup_fraction * total_steps)
    decay_steps = int(_opt(args, "lr_decay_iters", 0) or total_steps) or 1
    style = _opt(args, "lr_decay_style", "constant")

    def multiplier(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if style == "constant":
            return 1.0
        progress = min(1.0, max(0.0, (step - warmup) / max(1, decay_steps - warmup)))
        if style == "linear":
            return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
        if style == "cosine":
            return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"--lr-decay-style must be constant, linear or cosine, got '{style}'")

    return multiplier


def offload_report(allocated_before: int) -> dict[str, float]:
    """After a trainer offload (colocated GPU runs): what it freed and what it leaves on the GPU for
    the engine, in GiB; the backend adds it to its next ``train`` metrics (``train/offload_*``)."""
    left = torch.cuda.memory_allocated()
    return {"offload_freed_gib": (allocated_before - left) / 2**30, "offload_left_gib": left / 2**30}


def response_log_probs(backend, sequences: list[list[int]], response_lengths: list[int]) -> list[list[float]]:
    """``backend.log_probs`` of both train backends: the trainer's response log-probs for fixed
    sequences (weight-push checks), one forward without grad; every rank calls it."""
    with torch.no_grad():
        lp, _ = backend._forward_response(backend.model, sequences, response_lengths, with_entropy=False)
    return [chunk.tolist() for chunk in lp.split(response_lengths)]


def response_slices(token_lists: list[list[int]], response_lengths: list[int]) -> list[tuple[int, int]]:
    """For each packed sequence, the [start, end) range of logits that predict its response tokens
    (the logit at position p predicts token p + 1)."""
    slices, offset = [], 0
    for tokens, resp in zip(token_lists, response_lengths):
        end = offset + len(tokens) - 1
        slices.append((end - resp, end))
        offset += len(tokens)
    return slices


def response_index(token_lists: list[list[int]], response_lengths: list[int], device) -> torch.Tensor:
    """The packed row's positions whose logits predict response tokens (``response_slices``, concatenated),
    built on the host and copied without a host sync; both backends' forward of every micro-batch."""
    from plugrl.core.host_to_device import to_device

    spans = response_slices(token_lists, response_lengths)
    return to_device(torch.cat([torch.arange(s, e) for s, e in spans]), device)

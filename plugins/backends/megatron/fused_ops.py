"""Elementwise parts of the megatron layer spec, fused into Triton kernels by ``torch.compile`` on CUDA.

Without Transformer Engine and apex, megatron-core's local spec runs RMSNorm, RoPE and the GQA
expansion as chains of separate PyTorch kernels (casts, non-contiguous copies, ``cat``, ``mul``,
``add``), each a full pass over activation memory; on a Qwen3-4B step these passes took more GPU
time than the GEMMs (``benchmarks/train_throughput.py --profile``). Each function here is written
once in plain PyTorch, runs as is on CPU (the tests' reference numerics), and is compiled
(automatic dynamic shapes: the pack length is specialised on the first call and made symbolic on
the first change, the head and hidden sizes stay static) into one forward and one backward kernel when its input is on
CUDA and the fusion is on. Called inside the train actors from the norm and core-attention modules;
``TORCHDYNAMO_DISABLE=1`` (or the ``--no-*-fusion`` flags) runs the plain versions on GPUs too.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch


def rms_norm_fp32(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Qwen3/Llama RMSNorm: normalise in fp32, cast back to the input dtype, then scale."""
    normed = torch.nn.functional.rms_norm(hidden.float(), (hidden.shape[-1],), eps=eps)
    return weight * normed.to(hidden.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved RoPE (HF ``rotate_half`` convention, megatron's default) of ``x [t, heads, dim]``
    with per-token ``cos``/``sin [t, 1, rot]``; with ``rot < dim`` (``--rotary-percent``) the last
    ``dim - rot`` channels pass through unrotated."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((rotate(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    half = rot // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated_half * sin


def rotate_and_expand(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: int) -> torch.Tensor:
    """RoPE of keys ``[t, kv_heads, dim]``, then each KV head repeated for its ``groups`` query heads
    (for attention kernels without grouped-query support)."""
    return expand_heads(rotate(x, cos, sin), groups)


def expand_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x.repeat_interleave(groups, dim=1) if groups > 1 else x


def round_like_eager() -> None:
    """Make inductor round every intermediate to its eager dtype (bf16) as unfused PyTorch does,
    instead of keeping fp32 in registers across a fused chain: fused and unfused kernels then give
    the same numbers, and the logits stay those of HF transformers' eager model. Process-wide (it
    also covers megatron-core's own compiled SwiGLU / bias-dropout-add); set by the train backend
    in its actor before it builds a model on CUDA. Costs a few register conversions per element."""
    import torch._inductor.config as inductor_config

    inductor_config.emulate_precision_casts = True


_compiler_problem: str | None = None  # set by check_compiler when torch.compile cannot run here
_compiler_checked: set[str] = set()  # device types already probed in this process


def check_compiler(device: torch.device | str = "cuda") -> str | None:
    """Compile and run one tiny kernel on ``device``; ``None`` when that works, else why not (and
    every later ``fused`` call then returns the plain function). Called once per train actor by the
    backend before it builds a model on CUDA, so a machine without a working Triton / C compiler
    trains unfused with one warning instead of failing inside the first forward pass."""
    global _compiler_problem
    device_type = torch.device(device).type
    if device_type in _compiler_checked:
        return _compiler_problem
    _compiler_checked.add(device_type)
    try:
        probe = torch.compile(lambda x: torch.nn.functional.silu(x) * 2 + 1)
        x = torch.linspace(-1.0, 1.0, 64, device=device)
        if not torch.allclose(probe(x), torch.nn.functional.silu(x) * 2 + 1):
            raise RuntimeError("a compiled kernel gave a wrong result")
    except Exception as exc:  # noqa: BLE001  (any failure means: do not compile here)
        _compiler_problem = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return _compiler_problem


@cache
def _compiled(fn: Callable, trailing_shape: tuple = ()) -> Callable:
    return torch.compile(fn)


def fused(fn: Callable, tensor: torch.Tensor, enabled: bool) -> Callable:
    """``fn`` compiled when ``enabled``, ``tensor`` is on CUDA and compiling works, else ``fn`` itself.

    One compiled wrapper per function and trailing shape of ``tensor`` (all but the token
    dimension): the same norm runs on ``[T, hidden]``, ``[T, q_heads, dim]`` and ``[T, kv_heads, dim]``,
    each with and without grad and with a static then a symbolic ``T``; in one wrapper those
    variants would pass dynamo's recompile limit (8) and the rest would silently run unfused."""
    if not (enabled and tensor.is_cuda and _compiler_problem is None):
        return fn
    return _compiled(fn, tuple(tensor.shape[1:]))

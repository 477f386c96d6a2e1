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

import types
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


def _signature(value) -> tuple | object:
    """What dynamo guards on, minus the token count: rank, trailing sizes, dtype, grad and layout
    (strides as contiguity, size-1 dimensions ignored: a view's stride there is arbitrary)."""
    if isinstance(value, torch.Tensor):
        layout = value.is_contiguous() or value.reshape(-1).is_contiguous()
        return ("tensor", value.dim(), tuple(value.shape[1:]), value.dtype, value.requires_grad, layout)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value)


@cache
def _compiled(fn: Callable, signature: tuple) -> Callable:
    """A compiled copy of ``fn`` for one argument signature. Dynamo keeps its cache (and counts the
    recompile limit) per code object, so each variant gets its own copy of ``fn``'s code: a variant
    then compiles at most twice (static token count, then symbolic) however many variants run."""
    code = fn.__code__.replace()  # an equal but distinct code object
    copy = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return torch.compile(copy, backend=_BACKEND)


_BACKEND = "inductor"  # tests swap in dynamo's "eager" backend: the same guards, no kernel build


def dispatcher(fn: Callable) -> Callable:
    """Calls ``fn``'s compiled copy for the signature of each call's arguments."""

    def dispatch(*args, **kwargs):
        signature = (tuple(_signature(a) for a in args), tuple(sorted((k, _signature(v)) for k, v in kwargs.items())),
                     torch.is_grad_enabled())
        return _compiled(fn, signature)(*args, **kwargs)

    return dispatch


def fused(fn: Callable, tensor: torch.Tensor, enabled: bool) -> Callable:
    """``fn`` compiled when ``enabled``, ``tensor`` is on CUDA and compiling works, else ``fn`` itself.

    The returned callable picks one compiled copy per call signature (``_signature`` of every
    argument): the same norm runs on ``[T, hidden]``, ``[s, b, hidden]``, ``[T, q_heads, dim]`` and
    ``[T, kv_heads, dim]``, with and without grad, contiguous or not; sharing one code object those
    variants passed dynamo's recompile limit (8) within a few steps, and every call after that ran
    uncompiled, with a warning per step."""
    if not (enabled and tensor.is_cuda and _compiler_problem is None):
        return fn
    return _dispatchers(fn)


@cache
def _dispatchers(fn: Callable) -> Callable:
    return dispatcher(fn)

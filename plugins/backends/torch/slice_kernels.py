"""The elementwise work of one slice of the fused log-probs (fused_log_probs.py), between its GEMMs:
the forward's log-probs / logsumexp / entropy statistics and the backward's ``∂/∂z``, from a slice's
raw fp32 logits ``z = h·Wᵀ`` (before the temperature).

At the Qwen3-4B shape each slice's logits are a [~440, 151,936] fp32 slab (256 MiB) and a 9k-token
micro-batch has ~21 slices. Run eagerly, every op below is one memory-bound pass over the slab (the
forward's logsumexp alone takes four, the entropy four more, the backward five); compiled
(``torch.compile``, ``dynamic=True`` so every slice length shares one graph) the forward becomes
reductions that only read the slab and the backward one pass that reads it and writes the bf16
gradient. ``kernels(compiled)`` picks the pair; both run the same Python below, so the CPU tests of
the eager functions cover the compiled ones' math.
"""

from __future__ import annotations

import functools

import torch

from ..compile_guard import CompileGroup


def slice_forward(z: torch.Tensor, targets: torch.Tensor, inv_temperature: float, with_entropy: bool):
    """-> ``(log_probs, lse, mean_z or None)`` of one slice, all ``[n]`` in z's dtype: ``z' = z / T``,
    ``lse = logsumexp(z')``, ``log_probs = z'[target] − lse`` and, for the entropy ``lse − mean_z``,
    ``mean_z = Σ softmax(z')·z'``. Runs once per slice in the forward."""
    if inv_temperature != 1.0:
        z = z * inv_temperature
    lse = torch.logsumexp(z, dim=-1)
    log_probs = z.gather(-1, targets[:, None]).squeeze(-1) - lse
    mean_z = (torch.exp(z - lse[:, None]) * z).sum(-1) if with_entropy else None
    return log_probs, lse, mean_z


def slice_grad(z: torch.Tensor, lse: torch.Tensor, mean_z: torch.Tensor | None, targets: torch.Tensor,
               grad_log_probs: torch.Tensor | None, grad_entropy: torch.Tensor | None, inv_temperature: float,
               out_dtype: torch.dtype) -> torch.Tensor:
    """``∂loss/∂z`` of one slice (z before the temperature, so the ``1/T`` is in it), cast to
    ``out_dtype`` for the two GEMMs that follow. Runs once per slice in the backward.

    With ``p = softmax(z')``: ``∂ log p[target]/∂z' = onehot(target) − p`` and
    ``∂H/∂z' = p·(mean_z − z')``. The one-hot is a comparison with the column index, which a
    compiled kernel computes in registers (no scatter, no one-hot slab)."""
    if inv_temperature != 1.0:
        z = z * inv_temperature
    p = torch.exp(z - lse[:, None])
    # no zero-filled start: run eagerly, that would be one more slab written and added
    grad = None
    if grad_entropy is not None:
        grad = (mean_z[:, None] - z) * p * grad_entropy[:, None].to(z.dtype)
    if grad_log_probs is not None:
        onehot = torch.arange(z.shape[-1], device=z.device)[None, :] == targets[:, None]
        from_log_probs = (onehot.to(z.dtype) - p) * grad_log_probs[:, None].to(z.dtype)
        grad = from_log_probs if grad is None else grad + from_log_probs
    if grad is None:
        grad = torch.zeros_like(z)
    if inv_temperature != 1.0:
        grad = grad * inv_temperature
    return grad.to(out_dtype)


def slice_grad_basis(z: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, inv_temperature: float,
                     out: torch.Tensor) -> None:
    """``out = onehot(target) − softmax(z')`` for the columns of ``z`` given (a leading block of the
    vocabulary; targets outside it match no column), in ``out``'s dtype: the log-probs' gradient per
    logit up to each token's scalar, kept from the forward so the backward needs no recomputed logits
    (fused_log_probs.py, ``grad_cache_bytes``). Runs once per slice in the forward, after slice_forward."""
    if inv_temperature != 1.0:
        z = z * inv_temperature
    onehot = torch.arange(z.shape[-1], device=z.device)[None, :] == targets[:, None]
    out.copy_(onehot.to(z.dtype) - torch.exp(z - lse[:, None]))


_GROUP = CompileGroup("fused log-probs: compiling the slice kernels", "--compile-log-prob-slices off skips the attempt")
_failed = _GROUP.failed  # the first compile error, after which this process runs the eager functions


@functools.cache
def _compiled():
    # dynamic: a micro-batch's token count (and so its last slice) changes every step; one symbolic
    # graph serves them all instead of a recompile per length (which would hit dynamo's recompile limit)
    return (_GROUP.compile(slice_forward, dynamic=True, fullgraph=True),
            _GROUP.compile(slice_grad, dynamic=True, fullgraph=True))


@functools.cache
def _compiled_basis():
    return _GROUP.compile(slice_grad_basis, dynamic=True, fullgraph=True)


def kernels(compiled: bool):
    """-> ``(forward, grad)``: the compiled pair when ``compiled`` and no compile has failed in this
    process yet, else the eager functions. Called by the fused log-probs per micro-batch."""
    if not compiled or _failed:
        return slice_forward, slice_grad
    return _compiled()


def grad_basis_kernel(compiled: bool):
    """``slice_grad_basis``, compiled as ``kernels`` decides; called by the fused log-probs' forward when
    it keeps the gradient basis."""
    if not compiled or _failed:
        return slice_grad_basis
    return _compiled_basis()

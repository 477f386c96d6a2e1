"""Token log-probs and entropy from vocab-parallel logits, in fp32, without fp32 copies of the logits.

Runs in the megatron train actors on each micro-batch. Each TP rank holds the logits of its slice
``[start, start + local)`` of the padded vocabulary for every packed token; only the rows in
``index`` (the response positions) are scored. Per row, the max, the softmax normaliser, the target
logit and ``E_p[z]`` are reduced over the TP group in the forward pass; the backward pass needs no
communication (``d logp/dz = onehot - p``, ``dH/dz = -p (z - E_p[z])``, with p from the saved
global statistics). Rows are processed in chunks so the fp32 temporaries stay at
``chunk x local_vocab`` (a Qwen3 vocabulary is 151,936 wide); on CUDA each chunk's pass is one
compiled kernel (``fused_ops.fused``) that reads the bf16 rows once and keeps the fp32 values in
registers. Padding columns beyond the real vocabulary are excluded, so the distribution equals the
HF model's over ``vocab_size`` tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

CHUNK_ROWS = 1024


def _reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


# Per-chunk passes over ``logits[rows, :valid]`` (this chunk's scored rows; the gather is part of the
# compiled kernel, so the rows are never copied), plain PyTorch: run as is on CPU, compiled on CUDA.
def _chunk_max(logits: torch.Tensor, rows: torch.Tensor, valid: int, temperature: float) -> torch.Tensor:
    return (logits[rows, :valid].float() / temperature).max(dim=-1).values


def _chunk_sums(logits, rows, valid: int, temperature: float, row_max, local_target, owned):
    """-> ``[3, n]``: softmax normaliser, target logit and ``sum exp(z) * z`` (z shifted by the max)."""
    z = logits[rows, :valid].float() / temperature - row_max[:, None]
    exp = z.exp()
    picked = z.gather(-1, local_target[:, None])[:, 0]
    return torch.stack([exp.sum(dim=-1), torch.where(owned, picked, torch.zeros_like(picked)), (exp * z).sum(dim=-1)])


def _chunk_grad(logits, rows, valid: int, temperature: float, row_max, log_normaliser, mean_z, local_target, owned,
                grad_log_probs, grad_entropy):
    """d(loss)/d(logits[rows, :valid]): ``(onehot - p) * g_logp - g_H * p * (z - E_p[z])``, over the temperature."""
    z = logits[rows, :valid].float() / temperature - row_max[:, None]
    p = (z - log_normaliser[:, None]).exp()
    columns = torch.arange(valid, device=logits.device)
    onehot = ((columns[None] == local_target[:, None]) & owned[:, None]).float()
    grad = (onehot - p) * grad_log_probs[:, None] - grad_entropy[:, None] * p * (z - mean_z[:, None])
    return (grad / temperature).to(logits.dtype)


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, index, targets, temperature, vocab_start, valid, group, with_entropy):
        from .fused_ops import fused

        n = index.numel()
        device = logits.device
        local_target = targets - vocab_start
        owned = (local_target >= 0) & (local_target < valid)
        local_target = local_target.clamp(0, max(valid - 1, 0))
        row_max = torch.full((n,), float("-inf"), device=device)
        sums = torch.zeros(3, n, device=device)  # normaliser, target logit, sum p*z (shifted, unnormalised)
        if valid:
            chunk_max, chunk_sums = fused(_chunk_max, logits, True), fused(_chunk_sums, logits, True)
            for lo in range(0, n, CHUNK_ROWS):
                row_max[lo:lo + CHUNK_ROWS] = chunk_max(logits, index[lo:lo + CHUNK_ROWS], valid, temperature)
        _reduce(row_max, dist.ReduceOp.MAX, group)
        if valid:
            for lo in range(0, n, CHUNK_ROWS):
                hi = min(n, lo + CHUNK_ROWS)
                sums[:, lo:hi] = chunk_sums(logits, index[lo:hi], valid, temperature, row_max[lo:hi],
                                            local_target[lo:hi], owned[lo:hi])
        _reduce(sums, dist.ReduceOp.SUM, group)
        log_normaliser = sums[0].log()
        log_probs = sums[1] - log_normaliser
        mean_z = sums[2] / sums[0]  # E_p[z - max]
        entropy = log_normaliser - mean_z
        ctx.save_for_backward(logits, index, local_target, owned, row_max, log_normaliser, mean_z)
        ctx.temperature, ctx.valid, ctx.with_entropy = temperature, valid, with_entropy
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        from .fused_ops import fused

        logits, index, local_target, owned, row_max, log_normaliser, mean_z = ctx.saved_tensors
        temperature, valid = ctx.temperature, ctx.valid
        grad_logits = torch.zeros_like(logits)
        n = index.numel()
        grad_log_probs = torch.zeros(n, device=logits.device) if grad_log_probs is None else grad_log_probs.float()
        if not ctx.with_entropy or grad_entropy is None:
            grad_entropy = torch.zeros(n, device=logits.device)
        if valid:
            chunk_grad = fused(_chunk_grad, logits, True)
            for lo in range(0, n, CHUNK_ROWS):
                hi = min(n, lo + CHUNK_ROWS)
                rows = index[lo:hi]
                # plain assignment: each scored row appears once (response positions are distinct)
                grad_logits[rows, :valid] = chunk_grad(
                    logits, rows, valid, temperature, row_max[lo:hi], log_normaliser[lo:hi], mean_z[lo:hi],
                    local_target[lo:hi], owned[lo:hi], grad_log_probs[lo:hi], grad_entropy[lo:hi].float())
        return grad_logits, None, None, None, None, None, None, None


def vocab_parallel_log_probs(logits: torch.Tensor, index: torch.Tensor, targets: torch.Tensor, *, temperature: float,
                             vocab_start: int, vocab_size: int, group=None, with_entropy: bool = False):
    """``logits [T, local_vocab]`` (this rank's columns), ``index [n]`` distinct rows to score,
    ``targets [n]`` global token ids -> ``(log_probs [n], entropy [n] | None)`` of
    ``softmax(logits / temperature)`` over the whole vocabulary, both fp32 and differentiable."""
    valid = max(0, min(logits.shape[-1], vocab_size - vocab_start))
    log_probs, entropy = _VocabParallelLogProbs.apply(logits, index, targets, float(temperature), int(vocab_start),
                                                      valid, group, bool(with_entropy))
    return log_probs, (entropy if with_entropy else None)

"""Token log-probs and entropy from vocab-parallel logits, in fp32, without fp32 copies of the logits.

Runs in the megatron train actors on each micro-batch. Each TP rank holds the logits of its slice
``[start, start + local)`` of the padded vocabulary for every packed token; only the rows in
``index`` (the response positions) are scored. Per row, the max, the softmax normaliser, the target
logit and ``E_p[z]`` are reduced over the TP group in the forward pass; the backward pass needs no
communication (``d logp/dz = onehot - p``, ``dH/dz = -p (z - E_p[z])``, with p from the saved
global statistics). Rows are processed in chunks so the fp32 temporaries stay at
``chunk x local_vocab`` (a Qwen3 vocabulary is 151,936 wide). Padding columns beyond the real
vocabulary are excluded, so the distribution equals the HF model's over ``vocab_size`` tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

CHUNK_ROWS = 1024


def _reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, index, targets, temperature, vocab_start, valid, group, with_entropy):
        n = index.numel()
        device = logits.device
        row_max = torch.full((n,), float("-inf"), device=device)
        for lo in range(0, n, CHUNK_ROWS):
            if valid:
                z = logits[index[lo:lo + CHUNK_ROWS], :valid].float() / temperature
                row_max[lo:lo + CHUNK_ROWS] = z.max(dim=-1).values
        _reduce(row_max, dist.ReduceOp.MAX, group)
        # sums: normaliser, target logit (shifted), sum p*z (shifted, unnormalised)
        sums = torch.zeros(3, n, device=device)
        local_target = targets - vocab_start
        owned = (local_target >= 0) & (local_target < valid)
        for lo in range(0, n, CHUNK_ROWS):
            hi = min(n, lo + CHUNK_ROWS)
            if not valid:
                continue
            z = logits[index[lo:hi], :valid].float() / temperature - row_max[lo:hi, None]
            exp = z.exp()
            sums[0, lo:hi] = exp.sum(dim=-1)
            picked = z.gather(-1, local_target[lo:hi].clamp(0, valid - 1)[:, None])[:, 0]
            sums[1, lo:hi] = torch.where(owned[lo:hi], picked, torch.zeros_like(picked))
            if with_entropy:
                sums[2, lo:hi] = (exp * z).sum(dim=-1)
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
        logits, index, local_target, owned, row_max, log_normaliser, mean_z = ctx.saved_tensors
        temperature, valid = ctx.temperature, ctx.valid
        grad_logits = torch.zeros_like(logits)
        n = index.numel()
        if valid:
            for lo in range(0, n, CHUNK_ROWS):
                hi = min(n, lo + CHUNK_ROWS)
                rows = index[lo:hi]
                z = logits[rows, :valid].float() / temperature - row_max[lo:hi, None]
                p = (z - log_normaliser[lo:hi, None]).exp()
                g = -p * grad_log_probs[lo:hi, None].float() if grad_log_probs is not None else torch.zeros_like(p)
                if grad_log_probs is not None:
                    hit = owned[lo:hi]
                    cols = local_target[lo:hi].clamp(0, valid - 1)
                    g[hit, cols[hit]] += grad_log_probs[lo:hi][hit].float()
                if ctx.with_entropy and grad_entropy is not None:
                    g -= grad_entropy[lo:hi, None].float() * p * (z - mean_z[lo:hi, None])
                # plain assignment: each scored row appears once (response positions are distinct)
                grad_logits[rows, :valid] = (g / temperature).to(logits.dtype)
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

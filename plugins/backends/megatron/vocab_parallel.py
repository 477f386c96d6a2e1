"""Token log-probs and entropy from vocab-parallel logits, in fp32, differentiable.

Runs in the megatron train actors on each micro-batch's response positions. Each TP rank holds the
logits of its slice ``[start, start + local)`` of the padded vocabulary; the softmax normaliser, the
target logit and the entropy term are summed over the TP group (``torch.distributed.nn`` all-reduce,
which carries gradients). Padding columns beyond the real vocabulary are dropped first, so the
distribution equals the HF model's (and the rollout engine's) over ``vocab_size`` tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _sum_over(group, tensor: torch.Tensor) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


def vocab_parallel_log_probs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float, vocab_start: int,
                             vocab_size: int, group=None, with_entropy: bool = False):
    """``logits [n, local_vocab]`` (this rank's columns), ``targets [n]`` global token ids ->
    ``(log_probs [n], entropy [n] | None)`` of ``softmax(logits / temperature)`` over the whole vocabulary."""
    valid = max(0, min(logits.shape[-1], vocab_size - vocab_start))
    z = logits[..., :valid].float()
    if temperature != 1.0:
        z = z / temperature
    if valid:
        local_max = z.detach().max(dim=-1).values
    else:  # a TP rank holding only padding columns
        local_max = torch.full(z.shape[:-1], float("-inf"), device=z.device)
    global_max = local_max.clone()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    shifted = z - global_max[..., None]  # the shift is a constant: no gradient through the max
    exp = shifted.exp()
    normaliser = _sum_over(group, exp.sum(dim=-1))
    log_normaliser = normaliser.log()
    local_target = targets - vocab_start
    owned = (local_target >= 0) & (local_target < valid)
    picked = shifted.gather(-1, local_target.clamp(0, max(valid - 1, 0))[..., None])[..., 0] if valid else \
        torch.zeros_like(global_max)
    target_logit = _sum_over(group, torch.where(owned, picked, torch.zeros_like(picked)))
    log_probs = target_logit - log_normaliser
    entropy = None
    if with_entropy:
        # H = log Z - sum_v p_v z_v  (z shifted; the shift cancels)
        expected = _sum_over(group, (exp * shifted).sum(dim=-1)) / normaliser
        entropy = log_normaliser - expected
    return log_probs, entropy

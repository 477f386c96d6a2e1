"""``--normalize-advantages``: masked whitening of advantages, run by core in the train actors after
the estimator's ``compute`` (any estimator). torch is imported inside the function.
"""

from __future__ import annotations

from typing import Callable


def whiten_advantages(advantages, loss_masks, *, eps: float = 1e-8, all_reduce_sum: Callable | None = None):
    """``--normalize-advantages``: masked whitening ``A ← (A − μ) / sqrt(σ² + eps)``.

    ``μ = Σ m A / Σ m``, ``σ² = (Σ m A² / Σ m − μ²) · N/(N−1)`` with ``N = Σ m`` (no correction for
    N < 2). Accepts a list of per-sample tensors (returns a list) or one flat tensor. Train side, after
    ``compute``; ``all_reduce_sum`` (e.g. a ``torch.distributed`` all-reduce over DP×CP) turns the local
    ``[Σ m A, Σ m A², Σ m]`` into global sums, so every rank whitens with the same statistics.
    """
    import torch

    is_list = isinstance(advantages, (list, tuple))
    if is_list:
        lengths = [int(a.numel()) for a in advantages]
        if not lengths:
            return []
        flat = torch.cat([a.reshape(-1) for a in advantages])
        mask = torch.cat([torch.as_tensor(m).reshape(-1) for m in loss_masks])
    else:
        flat, mask = advantages, torch.as_tensor(loss_masks)
    mask = mask.to(device=flat.device, dtype=flat.dtype)
    stats = torch.stack([(flat * mask).sum(), (flat.square() * mask).sum(), mask.sum()])
    if all_reduce_sum is not None:
        stats = all_reduce_sum(stats)
    total_a, total_a2, n = stats.tolist()
    if n <= 0:
        return advantages
    mean = total_a / n
    var = max(total_a2 / n - mean * mean, 0.0)
    if n >= 2:
        var *= n / (n - 1)
    whitened = (flat - mean) * (var + eps) ** -0.5
    if is_list:
        return list(torch.split(whitened, lengths))
    return whitened

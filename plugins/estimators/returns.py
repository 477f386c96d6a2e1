"""Return and advantage arithmetic shared by the estimators (train side): discounted returns, GAE,
and ``--normalize-advantages`` whitening.

torch is imported inside the functions so that registering the estimators never needs torch.
"""

from __future__ import annotations

from typing import Sequence

from plugrl.core.whiten import whiten_advantages  # noqa: F401 - public name stays importable here

# Within a chunk the discounted sum is one small matmul; chunks are chained by a short serial loop,
# so a sequence of T tokens costs T/_CHUNK Python steps instead of T, and no T×T matrix is built.
_CHUNK = 128


def discounted_cumsum(x, discount: float, chunk_size: int = _CHUNK):
    """``y_t = Σ_{k≥t} discount^{k−t} x_k`` along the last dimension (exact, chunked scan).

    ``x[..., T]`` floating tensor; leading dimensions are independent sequences.
    """
    import torch
    import torch.nn.functional as F

    if not x.is_floating_point():
        x = x.float()
    length = x.shape[-1]
    if length == 0:
        return x.clone()
    if discount == 1.0:  # plain reverse cumulative sum
        return x.flip(-1).cumsum(-1).flip(-1)
    c = min(int(chunk_size), length)
    pad = (-length) % c
    # Zeros appended at the end add nothing to any earlier position.
    xc = F.pad(x, (0, pad)).reshape(*x.shape[:-1], -1, c)
    idx = torch.arange(c, device=x.device)
    power = idx[None, :] - idx[:, None]  # [t, k] = k - t
    base = torch.tensor(float(discount), dtype=x.dtype, device=x.device)
    within = torch.where(power >= 0, base.pow(power.clamp(min=0).to(x.dtype)), torch.zeros((), dtype=x.dtype, device=x.device))
    partial = xc @ within.transpose(0, 1)  # [..., n_chunks, c]: sums inside each chunk
    tail = base.pow((c - idx).to(x.dtype))  # discount from position t to the next chunk's start
    chunks = []
    carry = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    for j in range(partial.shape[-2] - 1, -1, -1):
        out = partial[..., j, :] + tail * carry[..., None]
        chunks.append(out)
        carry = out[..., 0]
    return torch.stack(chunks[::-1], dim=-2).reshape(*x.shape[:-1], -1)[..., :length]


def _pad(seqs: Sequence, dtype=None):
    import torch

    lengths = [int(s.numel()) for s in seqs]
    if not seqs:
        return torch.zeros(0, 0), lengths
    dtype = dtype or torch.promote_types(seqs[0].dtype, torch.float32)
    padded = torch.nn.utils.rnn.pad_sequence([s.reshape(-1).to(dtype) for s in seqs], batch_first=True)
    return padded, lengths


def discounted_returns(token_rewards: Sequence, gamma: float) -> list:
    """Per-sequence ``G_t = Σ_{k≥t} γ^{k−t} ρ_k`` for a list of 1-D token-reward tensors."""
    padded, lengths = _pad(token_rewards)
    if not lengths:
        return []
    returns = discounted_cumsum(padded, gamma)
    return [returns[i, :n] for i, n in enumerate(lengths)]


def gae(token_rewards: Sequence, values: Sequence, gamma: float, lambd: float) -> tuple[list, list]:
    """Generalised advantage estimation per sequence.

    ``δ_t = ρ_t + γ V_{t+1} − V_t`` with ``V_T = 0``, ``A_t = Σ_{k≥t} (γλ)^{k−t} δ_k``, ``R_t = A_t + V_t``.
    Returns ``(advantages, returns)`` as lists of 1-D tensors.
    """
    import torch

    if len(token_rewards) != len(values):
        raise ValueError(f"{len(token_rewards)} reward sequences but {len(values)} value sequences")
    rewards, lengths = _pad(token_rewards)
    if not lengths:
        return [], []
    vals, value_lengths = _pad(values, rewards.dtype)
    if lengths != value_lengths:
        raise ValueError(f"values lengths {value_lengths} differ from reward lengths {lengths}")
    # Padding is zero, so V_{t+1} at each sequence's last token reads 0 (V_T = 0) and padded δ = 0.
    next_vals = torch.cat([vals[:, 1:], torch.zeros_like(vals[:, :1])], dim=1)
    deltas = rewards + gamma * next_vals - vals
    adv = discounted_cumsum(deltas, gamma * lambd)
    ret = adv + vals
    return [adv[i, :n] for i, n in enumerate(lengths)], [ret[i, :n] for i, n in enumerate(lengths)]


def last_trainable_index(loss_mask) -> int:
    """Position that receives a sequence's scalar reward: the last token with ``loss_mask == 1``
    (the last token when none is trainable)."""
    import torch

    nz = torch.nonzero(torch.as_tensor(loss_mask).reshape(-1), as_tuple=False)
    return int(nz[-1]) if nz.numel() else int(torch.as_tensor(loss_mask).numel()) - 1


def kl_shaped_token_rewards(rewards: Sequence[float], kl, loss_masks: Sequence, response_lengths: Sequence[int], kl_coef: float) -> list:
    """Token rewards ``ρ_t = −kl_coef · kl_t · m_t`` with the scalar reward added at the last trainable
    token (``last_trainable_index``), for REINFORCE++ and PPO.

    ``kl`` is a list of per-token KL tensors (old vs ref) or ``None`` when ``kl_coef == 0``. Masking the
    KL keeps environment/tool tokens (loss mask 0) from being charged for a policy they did not come
    from; for single-turn responses (mask all ones) this is slime's formula exactly.
    """
    import torch

    if kl is None and kl_coef != 0.0:
        raise ValueError("--kl-coef is non-zero but no per-token KL was provided (the ref model must run)")
    out = []
    for i, (reward, length) in enumerate(zip(rewards, response_lengths)):
        mask = torch.as_tensor(loss_masks[i]).reshape(-1).to(torch.float32)
        length = int(length)
        if mask.numel() != length:
            raise ValueError(f"sample {i}: loss mask has {mask.numel()} entries, response_length is {length}")
        if kl is not None and kl_coef != 0.0:
            rho = -kl_coef * torch.as_tensor(kl[i]).reshape(-1).to(device=mask.device, dtype=torch.float32) * mask
        else:
            rho = torch.zeros(length, dtype=torch.float32, device=mask.device)
        if length:
            rho[last_trainable_index(mask)] += float(reward)
        out.append(rho)
    return out

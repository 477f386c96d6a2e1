"""RL losses in pure torch: log-probs/entropy from logits, PPO-clip policy loss, KL estimators, the
rollout/train mismatch corrections (TIS, rejection sampling: MIS, IcePop) and the loss reducers.
Runs inside the train actors (embedded torch trainer, megatron backend); nothing here touches CUDA
at import time.

Tensor layout used throughout: one micro-batch's samples are concatenated into flat 1-D tensors
holding the **response tokens only** (sample i contributes ``response_lengths[i]`` entries, in order);
``loss_masks`` is the list of per-sample 0/1 masks over those tokens.

Scaling contract (how a trainer turns the per-micro-batch value into the step objective):

* per-sample mean (default): ``reducer(x) = Σ_i Σ_t m_it x_it / max(1, D_i)`` where ``D_i`` is the
  loss-mask token count of the *whole rollout sample* i belongs to, precomputed over the optimizer
  step (``mask_sums``). The trainer divides every micro-batch loss by G, the number of rollouts in the
  optimizer step over all data-parallel ranks (and multiplies by the DP size, because DDP averages
  gradients over ranks). Then the step objective is ``(1/G) Σ_rollouts mean_t ℓ`` however the samples
  were packed, split into micro-batches or spread over ranks.
* per-token (``--calculate-per-token-loss`` = ``--loss-agg-mode token-mean``): ``reducer(x) = Σ_i Σ_t
  m_it x_it``; the trainer divides by the step's loss-mask tokens counted as ``Σ_i max(1, Σ_t m_it)`` (slime's
  normaliser: a fully masked sample still counts one), giving ``Σ m ℓ / Σ_i max(1, Σ_t m_it)`` over the step.
* token sums (``--loss-agg-mode seq-mean-token-sum`` / ``seq-mean-token-sum-norm``, Dr.GRPO):
  ``reducer(x) = Σ_i Σ_t m_it x_it / C`` with ``C = 1`` or a constant (``--loss-scale-factor``, default
  ``--rollout-max-response-len``); the trainer divides by G as in the per-sample mode.

Metrics returned by ``compute_rl_loss`` are on the same unscaled scale as the loss, so the trainer
divides them by the same normaliser and sums over micro-batches to get step means.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from .host_to_device import to_device
from .types import option as _opt

Reducer = Callable[[torch.Tensor], torch.Tensor]

# Above this many fp32 elements per chunk, log-prob/entropy kernels work on slices of tokens so the
# fp32 temporaries (softmax of a [tokens, vocab] slab) stay bounded (~256 MiB) for large vocabularies.
# (Also the slice size of the torch backend's fused log-probs, plugins/backends/torch/fused_log_probs.py.)
CHUNK_ELEMENTS = 64 * 1024 * 1024


# ---------------------------------------------------------------------------------------------------
# Log-probs and entropy from logits
# ---------------------------------------------------------------------------------------------------


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 logits; fp64 stays fp64 (gradient checks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def slab_tokens(vocab: int) -> int:
    """The most tokens whose ``[tokens, vocab]`` fp32 slab stays within ``CHUNK_ELEMENTS`` (at least 1)."""
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


def token_chunks(num_tokens: int, vocab: int, chunk_size: int | None):
    """``(start, end)`` slices of tokens whose ``[tokens, vocab]`` fp32 slab stays within
    ``CHUNK_ELEMENTS`` (``chunk_size`` tokens each when given)."""
    if chunk_size is None:
        chunk_size = slab_tokens(vocab)
    for start in range(0, num_tokens, chunk_size):
        yield start, min(num_tokens, start + chunk_size)


class _LogProbFn(torch.autograd.Function):
    """log_softmax(z / T)[target] with z cast to fp32 per chunk.

    Only the per-token logsumexp is saved; the backward recomputes the softmax chunk by chunk, so
    autograd never holds an fp32 copy of the full ``[tokens, vocab]`` logits.
    """

    @staticmethod
    def forward(ctx, logits, target, temperature, chunk_size):
        n, vocab = logits.shape
        acc = accumulation_dtype(logits.dtype)
        out = torch.empty(n, dtype=acc, device=logits.device)
        lse = torch.empty(n, dtype=acc, device=logits.device)
        for s, e in token_chunks(n, vocab, chunk_size):
            z = logits[s:e].to(acc) / temperature
            lse[s:e] = torch.logsumexp(z, dim=-1)
            out[s:e] = z.gather(-1, target[s:e, None]).squeeze(-1) - lse[s:e]
        ctx.save_for_backward(logits, target, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, target, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        t = ctx.temperature
        for s, e in token_chunks(logits.shape[0], logits.shape[1], ctx.chunk_size):
            p = torch.exp(logits[s:e].to(lse.dtype) / t - lse[s:e, None])
            # d logp_target / dz = onehot(target) - softmax(z)
            g = -p * grad_out[s:e, None]
            g.scatter_add_(-1, target[s:e, None], grad_out[s:e, None].to(g.dtype))
            grad[s:e] = (g / t).to(grad.dtype)
        return grad, None, None, None


class _EntropyFn(torch.autograd.Function):
    """H(softmax(z / T)) = logsumexp(z) - Σ softmax(z)·z, fp32, chunked like ``_LogProbFn``."""

    @staticmethod
    def forward(ctx, logits, temperature, chunk_size):
        n, vocab = logits.shape
        acc = accumulation_dtype(logits.dtype)
        ent = torch.empty(n, dtype=acc, device=logits.device)
        lse = torch.empty(n, dtype=acc, device=logits.device)
        for s, e in token_chunks(n, vocab, chunk_size):
            z = logits[s:e].to(acc) / temperature
            lse[s:e] = torch.logsumexp(z, dim=-1)
            p = torch.exp(z - lse[s:e, None])
            ent[s:e] = lse[s:e] - (p * z).sum(-1)
        ctx.save_for_backward(logits, lse, ent)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return ent

    @staticmethod
    def backward(ctx, grad_out):
        logits, lse, ent = ctx.saved_tensors
        grad = torch.empty_like(logits)
        t = ctx.temperature
        for s, e in token_chunks(logits.shape[0], logits.shape[1], ctx.chunk_size):
            log_p = logits[s:e].to(lse.dtype) / t - lse[s:e, None]
            # dH/dz_k = -p_k (log p_k + H)
            g = -torch.exp(log_p) * (log_p + ent[s:e, None]) * grad_out[s:e, None]
            grad[s:e] = (g / t).to(grad.dtype)
        return grad, None, None


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (--rollout-temperature), got {temperature}")
    return temperature


def log_probs_from_logits(
    logits: torch.Tensor, target_ids: torch.Tensor, temperature: float = 1.0, *, chunk_size: int | None = None
) -> torch.Tensor:
    """fp32 ``log_softmax(logits / temperature)`` gathered at ``target_ids``.

    ``logits[..., V]`` and ``target_ids[...]`` (same leading shape); returns ``[...]`` fp32. Train side,
    for the current policy (with grad) and for old/ref log-probs (no grad). ``chunk_size`` = tokens
    per fp32 slab (default: bounded by memory); gradients flow to ``logits`` in their own dtype.
    """
    temperature = _check_temperature(temperature)
    lead = target_ids.shape
    flat = logits.reshape(-1, logits.shape[-1])
    out = _LogProbFn.apply(flat, target_ids.reshape(-1).long(), temperature, chunk_size)
    return out.reshape(lead)


def entropy_from_logits(
    logits: torch.Tensor, temperature: float = 1.0, *, chunk_size: int | None = None
) -> torch.Tensor:
    """fp32 entropy of ``softmax(logits / temperature)`` over the full vocabulary: ``logsumexp(z) −
    Σ softmax(z)·z``. ``logits[..., V]`` -> ``[...]``. Train side (the entropy loss/metric)."""
    temperature = _check_temperature(temperature)
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    return _EntropyFn.apply(flat, temperature, chunk_size).reshape(lead)


# ---------------------------------------------------------------------------------------------------
# Policy loss, KL, TIS
# ---------------------------------------------------------------------------------------------------


def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_clip: float,
    eps_clip_high: float | None = None,
    eps_clip_c: float | None = None,
    ppo_kl: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO-clip loss with asymmetric clip and optional dual clip.

    ``ρ = exp(−ppo_kl)`` with ``ppo_kl = old − logπ`` unless given (GSPO passes the sequence-level one
    from ``sequence_level_ppo_kl``). ``ℓ = max(−ρA, −clip(ρ, 1−eps_clip, 1+eps_clip_high)·A)``; with
    ``eps_clip_c = c`` (> 1) tokens with ``A < 0`` take ``min(ℓ, −c·A)``, bounding the loss when ρ
    explodes. Returns ``(loss, clipfrac, ppo_kl)`` per token; ``clipfrac = 1[clipped term > unclipped]``.
    """
    if eps_clip_high is None:
        eps_clip_high = eps_clip
    if ppo_kl is None:
        ppo_kl = old_log_probs - log_probs
    ratio = torch.exp(-ppo_kl)
    loss1 = -ratio * advantages
    loss2 = -ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip_high) * advantages
    loss = torch.maximum(loss1, loss2)
    clipfrac = (loss2 > loss1).float()
    if eps_clip_c is not None:
        if not eps_clip_c > 1.0:
            raise ValueError(f"--eps-clip-c must be > 1 for dual clip, got {eps_clip_c}")
        loss = torch.where(advantages < 0, torch.minimum(loss, -eps_clip_c * advantages), loss)
    return loss, clipfrac, ppo_kl


def _segment_ids(response_lengths: Sequence[int], device) -> torch.Tensor:
    # on the host, then one copy without a host sync (a device-side repeat_interleave waits for the GPU
    # to learn its output size)
    lengths = torch.as_tensor([int(n) for n in response_lengths], dtype=torch.long)
    return to_device(torch.repeat_interleave(torch.arange(len(lengths)), lengths), device)


def _flat_mask(loss_masks: Sequence[torch.Tensor], device, dtype) -> torch.Tensor:
    if len(loss_masks) == 0:
        return torch.zeros(0, device=device, dtype=dtype)
    return torch.cat([torch.as_tensor(m).reshape(-1) for m in loss_masks]).to(device=device, dtype=dtype)


def sequence_level_ppo_kl(
    old_log_probs: torch.Tensor,
    log_probs: torch.Tensor,
    loss_masks: Sequence[torch.Tensor],
    response_lengths: Sequence[int],
) -> torch.Tensor:
    """GSPO: ``s_i = Σ_t m_t (old_t − logπ_t) / max(1, Σ_t m_t)`` for each sample, broadcast to its
    tokens (flat layout). ``exp(−s_i)`` is the sequence's length-normalised (geometric-mean) ratio; the
    gradient reaches every masked token of the sample."""
    seg = _segment_ids(response_lengths, log_probs.device)
    mask = _flat_mask(loss_masks, log_probs.device, log_probs.dtype)
    n = len(response_lengths)
    diff = (old_log_probs - log_probs) * mask
    num = torch.zeros(n, dtype=diff.dtype, device=diff.device).index_add(0, seg, diff)
    den = torch.zeros(n, dtype=diff.dtype, device=diff.device).index_add(0, seg, mask).clamp(min=1.0)
    return (num / den)[seg]


KL_TYPES = ("k1", "k2", "k3", "low_var_kl")


def approx_kl(
    log_probs: torch.Tensor,
    base_log_probs: torch.Tensor,
    kind: str,
    *,
    importance_ratio: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token KL(π‖π_base) estimate from samples of π, with ``Δ = logπ − logπ_base`` (fp32):
    ``k1 = Δ``, ``k2 = Δ²/2``, ``k3 = low_var_kl = exp(−Δ) − 1 + Δ``. Only ``low_var_kl`` is clamped to
    [−10, 10] (slime's behaviour; ``k3`` is the same estimator unclamped). ``importance_ratio``
    (``--use-unbiased-kl``) multiplies before the clamp. Used for the KL loss (current vs ref, with
    grad) and the reward-shaping KL (old vs ref, no grad)."""
    delta = log_probs.float() - base_log_probs.float()
    if kind == "k1":
        kl = delta
    elif kind == "k2":
        kl = delta.square() / 2.0
    elif kind in ("k3", "low_var_kl"):
        kl = torch.expm1(-delta) + delta
    else:
        raise ValueError(f"unknown --kl-loss-type '{kind}'; choose one of {', '.join(KL_TYPES)}")
    if importance_ratio is not None:
        kl = kl * importance_ratio
    if kind == "low_var_kl":
        kl = kl.clamp(-10.0, 10.0)
    return kl


# Bound on a summed log-ratio before ``exp`` (a sequence-level ratio of a long response overflows fp32).
_LOG_RATIO_BOUND = 20.0


def mismatch_log_ratio(
    train_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    loss_masks: Sequence[torch.Tensor],
    response_lengths: Sequence[int],
    level: str = "token",
) -> torch.Tensor:
    """Per-token ``log(π_train / π_rollout)`` at ``level`` (flat layout, no grad):

    ``token``: ``Δ_t = logπ_train,t − logπ_rollout,t``; ``sequence``: ``Σ_t m_t Δ_t`` (the log of the
    product of the sample's token ratios) broadcast to its tokens; ``geometric``: ``Σ_t m_t Δ_t /
    max(1, Σ_t m_t)`` (log of the geometric mean) broadcast. Used by TIS (``--tis-level``) and by
    rejection sampling (``--rs-level``)."""
    with torch.no_grad():
        delta = train_log_probs.float() - rollout_log_probs.float()
        if level == "token":
            return delta
        if level not in ("sequence", "geometric"):
            raise ValueError(f"unknown ratio level '{level}'; choose token, sequence or geometric")
        seg = _segment_ids(response_lengths, delta.device)
        mask = _flat_mask(loss_masks, delta.device, delta.dtype)
        n = len(response_lengths)
        total = torch.zeros(n, dtype=delta.dtype, device=delta.device).index_add(0, seg, delta * mask)
        if level == "geometric":
            count = torch.zeros(n, dtype=delta.dtype, device=delta.device).index_add(0, seg, mask)
            total = total / count.clamp(min=1.0)
        return total[seg]


def tis_weights(
    train_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    clip: float = 2.0,
    clip_low: float = 0.0,
    *,
    log_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance sampling for the train/rollout engine mismatch (``--use-tis``).

    ``w = clamp(exp(logπ_train − logπ_rollout), clip_low, clip)`` (no grad), multiplied into the
    per-token policy loss. ``log_ratio`` replaces the per-token log-ratio (``--tis-level sequence`` /
    ``geometric``, from ``mismatch_log_ratio``); the log-ratio is bounded to ±20 before ``exp`` so a
    long sequence cannot overflow. Per-token metrics: ``tis`` (the ratio before the clamp),
    ``tis_clipfrac`` (1 where the clamp changed it) and ``tis_abs = |ratio − 1|``."""
    with torch.no_grad():
        if log_ratio is None:
            log_ratio = train_log_probs.float() - rollout_log_probs.float()
        ratio = torch.exp(log_ratio.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND))
        weights = ratio.clamp(min=clip_low, max=clip)
        metrics = {
            "tis": ratio,
            "tis_clipfrac": (weights != ratio).float(),
            "tis_abs": (ratio - 1.0).abs(),
        }
    return weights, metrics


def rejection_keep(
    log_ratio: torch.Tensor,
    token_log_ratio: torch.Tensor,
    loss_masks: Sequence[torch.Tensor],
    response_lengths: Sequence[int],
    low: float,
    high: float,
    veto_threshold: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rejection sampling against the train/rollout mismatch (``--use-rs``; MIS, IcePop): a token is
    kept (1) when its ``log_ratio`` (token, sequence or geometric level, from ``mismatch_log_ratio``)
    lies in ``[log low, log high]`` and, with a veto threshold ``c``, no trainable token of its sample
    has a per-token ratio below ``c``. Compared in log space, so a huge sequence ratio never overflows.

    Returns the flat 0/1 ``keep`` tensor and per-token indicator metrics (reduced by the caller over
    the original loss masks): ``rs_masked_fraction``, ``rs_masked_fraction_low`` / ``_high`` (below /
    above the band) and, with a veto, ``rs_veto_fraction``."""
    with torch.no_grad():
        log_low = math.log(low) if low > 0 else -math.inf
        below = log_ratio < log_low
        above = log_ratio > math.log(high)
        keep = ~(below | above)
        metrics = {"rs_masked_fraction_low": below.float(), "rs_masked_fraction_high": above.float()}
        if veto_threshold is not None:
            seg = _segment_ids(response_lengths, log_ratio.device)
            mask = _flat_mask(loss_masks, log_ratio.device, torch.float32)
            bad = ((token_log_ratio < math.log(veto_threshold)) & (mask > 0)).float()
            vetoed = torch.zeros(len(response_lengths), device=log_ratio.device).index_add(0, seg, bad)[seg] > 0
            keep = keep & ~vetoed
            metrics["rs_veto_fraction"] = vetoed.float()
        keep = keep.to(log_ratio.dtype)
        metrics["rs_masked_fraction"] = 1.0 - keep
    return keep, metrics


# ---------------------------------------------------------------------------------------------------
# Reducers
# ---------------------------------------------------------------------------------------------------


def sample_mean_reducer(
    loss_masks: Sequence[torch.Tensor], mask_sums: Sequence[float] | torch.Tensor | None = None
) -> Reducer:
    """Per-sample token mean (slime's default): ``x ↦ Σ_i Σ_t m_it x_it / max(1, D_i)``.

    ``D_i = mask_sums[i]`` is the loss-mask token count of the whole rollout sample i belongs to,
    counted over the step, so a sample split across micro-batches still contributes its own token
    mean; ``None`` uses each piece's own mask sum. The trainer divides by G (rollouts per optimizer
    step); see the module docstring.
    """
    device = loss_masks[0].device if len(loss_masks) else torch.device("cpu")
    lengths = [int(torch.as_tensor(m).numel()) for m in loss_masks]
    # fp64 weights so that 1/D_i is exact enough for any x dtype; cast to x's dtype per call.
    mask = _flat_mask(loss_masks, device, torch.float64)
    if mask_sums is None:
        denom = torch.tensor([float(torch.as_tensor(m).sum()) for m in loss_masks], dtype=torch.float64, device=device)
    else:
        denom = (mask_sums.to(device=device, dtype=torch.float64) if isinstance(mask_sums, torch.Tensor)
                 else to_device([float(x) for x in mask_sums], device, torch.float64)).reshape(-1)
        if denom.numel() != len(loss_masks):
            raise ValueError(f"{len(loss_masks)} loss masks but {denom.numel()} mask_sums")
    weights = mask / denom.clamp(min=1.0)[_segment_ids(lengths, device)]

    def reduce(x: torch.Tensor) -> torch.Tensor:
        return (x * weights.to(device=x.device, dtype=x.dtype)).sum()

    return reduce


def per_token_reducer(loss_masks: Sequence[torch.Tensor]) -> Reducer:
    """``--calculate-per-token-loss``: ``x ↦ Σ_i Σ_t m_it x_it``; the trainer divides by the step's
    loss-mask tokens, ``Σ_i max(1, Σ_t m_it)``."""
    device = loss_masks[0].device if len(loss_masks) else torch.device("cpu")
    mask = _flat_mask(loss_masks, device, torch.float32)

    def reduce(x: torch.Tensor) -> torch.Tensor:
        return (x * mask.to(device=x.device, dtype=x.dtype)).sum()

    return reduce


def token_sum_reducer(loss_masks: Sequence[torch.Tensor], scale_factor: float = 1.0) -> Reducer:
    """``x ↦ Σ_i Σ_t m_it x_it / C``: ``--loss-agg-mode seq-mean-token-sum`` (``C = 1``) and
    ``seq-mean-token-sum-norm`` (Dr.GRPO: ``C`` a constant, by default the generation budget). The
    trainer divides by G, so the step objective is ``(1/G) Σ_rollouts Σ_t m ℓ / C``: every token
    weighs the same whatever its response's length (no 1/|o_i|, the length bias Dr.GRPO removes)."""
    if not scale_factor > 0:
        raise ValueError(f"the loss scale factor must be > 0, got {scale_factor}")
    device = loss_masks[0].device if len(loss_masks) else torch.device("cpu")
    weights = _flat_mask(loss_masks, device, torch.float64) / float(scale_factor)

    def reduce(x: torch.Tensor) -> torch.Tensor:
        return (x * weights.to(device=x.device, dtype=x.dtype)).sum()

    return reduce


def make_reducer(
    mode: str,
    loss_masks: Sequence[torch.Tensor],
    mask_sums: Sequence[float] | torch.Tensor | None = None,
    *,
    scale_factor: float | None = None,
    kept_masks: Sequence[torch.Tensor] | None = None,
) -> Reducer:
    """The reducer of ``--loss-agg-mode`` ``mode`` (names in ``core/loss_options.py``).

    ``kept_masks`` (rejection sampling) replace the masks in the numerators only: the denominators
    (``mask_sums``, or each sample's own mask sum) stay those of ``loss_masks``, as in slime, so a
    rejected token is a zero term, not a token the others are re-averaged over."""
    from .loss_options import SEQ_MEAN_TOKEN_MEAN, SEQ_MEAN_TOKEN_SUM, SEQ_MEAN_TOKEN_SUM_NORM, TOKEN_MEAN

    numerators = loss_masks if kept_masks is None else kept_masks
    if mode == SEQ_MEAN_TOKEN_MEAN:
        if mask_sums is None:
            mask_sums = [float(torch.as_tensor(m).sum()) for m in loss_masks]
        return sample_mean_reducer(numerators, mask_sums)
    if mode == TOKEN_MEAN:
        return per_token_reducer(numerators)
    if mode == SEQ_MEAN_TOKEN_SUM:
        return token_sum_reducer(numerators, 1.0)
    if mode == SEQ_MEAN_TOKEN_SUM_NORM:
        if scale_factor is None:
            raise ValueError("--loss-agg-mode seq-mean-token-sum-norm needs a scale factor")
        return token_sum_reducer(numerators, scale_factor)
    raise ValueError(f"unknown --loss-agg-mode '{mode}'")


# ---------------------------------------------------------------------------------------------------
# The per-micro-batch loss both backends call
# ---------------------------------------------------------------------------------------------------


def _custom_pg_reducer(config, total_lengths, response_lengths, loss_masks, default: Reducer,
                       per_token: bool) -> Reducer:
    path = _opt(config, "custom_pg_loss_reducer_function_path", None)
    if not path:
        return default
    from .registry import import_object

    if total_lengths is None:
        raise ValueError(f"--custom-pg-loss-reducer-function-path {path}: the caller passed no total_lengths")
    return import_object(path)(list(total_lengths), list(response_lengths), list(loss_masks), per_token)


# Metrics that are token/sample counts, not means: ``PreparedRollout`` rescales them so that the
# trainer's scaled sum over micro-batches, ranks and steps is the rollout's total.
COUNT_METRICS = ("rs_masked_tokens", "rs_masked_samples")

PolicyLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor]]


def compute_rl_loss(
    log_probs: torch.Tensor,
    *,
    loss_masks: Sequence[torch.Tensor],
    response_lengths: Sequence[int],
    config: Any,
    mask_sums: Sequence[float] | torch.Tensor | None = None,
    old_log_probs: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    ref_log_probs: torch.Tensor | None = None,
    rollout_log_probs: torch.Tensor | None = None,
    sequence_level_ratio: bool = False,
    total_lengths: Sequence[int] | None = None,
    loss_agg_mode: str | None = None,
    policy_loss_fn: PolicyLossFn | None = None,
    metrics_on_device: bool = False,
) -> tuple[torch.Tensor, dict[str, float]] | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's loss (unscaled: the trainer divides by G or by the step's token count).

    Flat response-token tensors as in the module docstring; ``mask_sums[i]`` is the loss-mask token
    count of the rollout sample i belongs to (``None``: each sample's own). ``log_probs`` (and ``entropy``) carry the
    gradient; every other tensor is detached here. ``old_log_probs=None`` means the one-step on-policy
    shortcut (``old = logπ.detach()``, ratio ≡ 1). ``config`` fields (slime flag names): ``loss_type``
    (``policy_loss`` | ``sft_loss``), ``eps_clip``, ``eps_clip_high``, ``eps_clip_c``, ``use_kl_loss``,
    ``kl_loss_coef``, ``kl_loss_type``, ``use_unbiased_kl``, ``entropy_coef``, ``use_tis``,
    ``tis_clip``, ``tis_clip_low``, ``tis_level``, ``use_rs``, ``rs_level``, ``rs_lower_bound``,
    ``rs_upper_bound``, ``rs_veto_threshold``, ``use_rollout_logprobs``, ``calculate_per_token_loss``,
    ``loss_agg_mode``, ``loss_scale_factor``.
    ``sequence_level_ratio`` (the estimator's class var; GSPO) uses ``sequence_level_ppo_kl``.
    ``loss_agg_mode`` (resolved by the caller, ``loss_options.resolve_loss_agg_mode``; ``None``: from
    ``config``) picks the reducer of every term. ``policy_loss_fn`` (the estimator's ``policy_loss``;
    CISPO) replaces the PPO-clip term: ``fn(log_probs, ppo_kl, advantages, config) -> (per-token loss,
    clipfrac)`` with ``ppo_kl = old − logπ`` (carrying logπ's gradient).
    ``custom_pg_loss_reducer_function_path`` (slime's): ``fn(total_lengths, response_lengths,
    loss_masks, calculate_per_token_loss)`` returns the reducer of the policy-gradient term only (e.g.
    Dr.GRPO's constant divisor); ``total_lengths`` are the samples' prompt + response lengths.

    Rollout/train mismatch: with ``use_tis`` the policy term is multiplied by the TIS weight (at
    ``tis_level``); with ``use_rs`` the tokens (``rs_level`` token) or samples (sequence/geometric)
    whose train/rollout ratio leaves ``[rs_lower_bound, rs_upper_bound]`` leave the numerators of the
    policy, entropy and KL terms (denominators unchanged); the mismatch metrics are reduced over the
    original masks and ``rs_masked_tokens`` / ``rs_masked_samples`` count what was masked.

    ``loss = pg_loss − entropy_coef·entropy_loss (+ kl_loss_coef·kl_loss)``. Returns ``(loss, metrics)``
    with float metrics reduced by the same reducer as the loss; with ``metrics_on_device`` they stay
    detached 0-d fp64 tensors on the loss's device (the trainer's micro-batch loop reads them once per
    optimizer step, ``rl_step.run_rl_steps``, instead of waiting for the GPU at every micro-batch).
    """
    from .loss_options import TOKEN_MEAN, loss_scale_factor, resolve_loss_agg_mode, rs_bounds

    if sum(int(n) for n in response_lengths) != log_probs.numel():
        raise ValueError(f"log_probs has {log_probs.numel()} tokens but response_lengths sum to {sum(response_lengths)}")
    device = log_probs.device
    loss_masks = [torch.as_tensor(m, device=device) for m in loss_masks]
    mode = loss_agg_mode or resolve_loss_agg_mode(config)
    scale_factor = loss_scale_factor(config) if mode.endswith("-norm") else None
    reduce = make_reducer(mode, loss_masks, mask_sums, scale_factor=scale_factor)

    # fp32 (or the log-probs' own dtype when wider, e.g. fp64 in tests)
    compute_dtype = torch.promote_types(log_probs.dtype, torch.float32)

    def detached(t):
        return None if t is None else t.detach().to(device=device, dtype=compute_dtype)

    old_log_probs, advantages = detached(old_log_probs), detached(advantages)
    ref_log_probs, rollout_log_probs = detached(ref_log_probs), detached(rollout_log_probs)
    entropy_coef = float(_opt(config, "entropy_coef", 0.0))
    if entropy is None and entropy_coef != 0.0:
        raise ValueError("--entropy-coef is non-zero but no entropy was passed to compute_rl_loss")

    metrics: dict[str, torch.Tensor] = {}
    # The reducer of the loss terms; rejection sampling swaps in one whose numerators skip rejected tokens.
    reduce_terms = reduce
    loss_type = _opt(config, "loss_type", "policy_loss")
    if loss_type == "sft_loss":
        loss = -reduce(log_probs)
    elif loss_type == "policy_loss":
        if advantages is None:
            raise ValueError("loss_type policy_loss needs advantages")
        if old_log_probs is None:
            old_log_probs = log_probs.detach()
        ppo_kl = None
        if sequence_level_ratio:
            ppo_kl = sequence_level_ppo_kl(old_log_probs, log_probs, loss_masks, response_lengths)
        if policy_loss_fn is None:
            pg, clipfrac, ppo_kl = policy_loss(
                log_probs,
                old_log_probs,
                advantages,
                eps_clip=float(_opt(config, "eps_clip", 0.2)),
                eps_clip_high=_opt(config, "eps_clip_high", None),
                eps_clip_c=_opt(config, "eps_clip_c", None),
                ppo_kl=ppo_kl,
            )
        else:
            if ppo_kl is None:
                ppo_kl = old_log_probs - log_probs
            pg, clipfrac = policy_loss_fn(log_probs, ppo_kl, advantages, config)
        if rollout_log_probs is not None:
            # With --use-rollout-logprobs the old log-probs *are* the rollout ones; compare the current.
            train_lp = log_probs.detach() if _opt(config, "use_rollout_logprobs", False) else old_log_probs
            metrics["train_rollout_logprob_abs_diff"] = reduce((train_lp - rollout_log_probs).abs())
        use_tis, use_rs = bool(_opt(config, "use_tis", False)), bool(_opt(config, "use_rs", False))
        if (use_tis or use_rs) and rollout_log_probs is None:
            raise ValueError("--use-tis / --use-rs need the rollout log-probs of every sample")
        if use_tis:
            tis_level = _opt(config, "tis_level", "token")
            weights, tis_metrics = tis_weights(
                old_log_probs,
                rollout_log_probs,
                clip=float(_opt(config, "tis_clip", 2.0)),
                clip_low=float(_opt(config, "tis_clip_low", 0.0)),
                log_ratio=mismatch_log_ratio(old_log_probs, rollout_log_probs, loss_masks, response_lengths, tis_level),
            )
            pg = pg * weights
            metrics.update({k: reduce(v) for k, v in tis_metrics.items()})
        if use_rs:
            low, high = rs_bounds(config)
            token_lr = mismatch_log_ratio(old_log_probs, rollout_log_probs, loss_masks, response_lengths, "token")
            rs_lr = mismatch_log_ratio(old_log_probs, rollout_log_probs, loss_masks, response_lengths,
                                       _opt(config, "rs_level", "token"))
            keep, rs_metrics = rejection_keep(rs_lr, token_lr, loss_masks, response_lengths, low, high,
                                              _opt(config, "rs_veto_threshold", None))
            kept_masks = list(torch.split(_flat_mask(loss_masks, device, keep.dtype) * keep,
                                          [int(n) for n in response_lengths]))
            reduce_terms = make_reducer(mode, loss_masks, mask_sums, scale_factor=scale_factor, kept_masks=kept_masks)
            metrics.update({k: reduce(v) for k, v in rs_metrics.items()})
            masked = _flat_mask(loss_masks, device, keep.dtype) * (1.0 - keep)
            metrics["rs_masked_tokens"] = masked.sum()
            seg = _segment_ids(response_lengths, device)
            per_sample = torch.zeros(len(response_lengths), dtype=masked.dtype, device=device).index_add(0, seg, masked)
            metrics["rs_masked_samples"] = (per_sample > 0).to(masked.dtype).sum()
        pg_loss = _custom_pg_reducer(config, total_lengths, response_lengths, loss_masks, reduce_terms,
                                     mode == TOKEN_MEAN)(pg)
        metrics["pg_loss"] = pg_loss
        metrics["pg_clipfrac"] = reduce_terms(clipfrac)
        metrics["ppo_kl"] = reduce_terms(ppo_kl.detach())
        loss = pg_loss
    else:
        raise ValueError(f"unknown --loss-type '{loss_type}'; compute_rl_loss handles policy_loss and sft_loss")

    if entropy is not None:
        if entropy_coef == 0.0:
            # a metric only: no gradient flows back through it, so the log-prob kernels' backward
            # skips the entropy terms (several passes over the [tokens, vocab] logits per micro-batch)
            entropy = entropy.detach()
        entropy_loss = reduce_terms(entropy)
        metrics["entropy_loss"] = entropy_loss
        loss = loss - entropy_coef * entropy_loss if entropy_coef != 0.0 else loss
    elif loss_type == "policy_loss":
        metrics["entropy_loss"] = torch.zeros((), device=device)

    if loss_type == "policy_loss" and _opt(config, "use_kl_loss", False):
        if ref_log_probs is None:
            raise ValueError("--use-kl-loss needs reference log-probs")
        ratio = None
        if _opt(config, "use_unbiased_kl", False):
            # Not detached: the gradient of E_old[ρ·k] is the gradient of the on-policy KL.
            ratio = torch.exp(log_probs - old_log_probs)
        kl = approx_kl(log_probs, ref_log_probs, _opt(config, "kl_loss_type", "k1"), importance_ratio=ratio)
        kl_loss = reduce_terms(kl)
        metrics["kl_loss"] = kl_loss
        loss = loss + float(_opt(config, "kl_loss_coef", 0.0)) * kl_loss

    metrics["loss"] = loss
    # fp64, as the host's floats were: counts scaled up and back (rl_step) and sums over micro-batches stay exact
    on_device = {k: torch.as_tensor(v, device=device).detach().double().reshape(()) for k, v in metrics.items()}
    return loss, (on_device if metrics_on_device else metrics_to_host(on_device))


def metrics_to_host(metrics: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """0-d metric tensors -> floats in one device->host transfer (one sync, not one per metric); values
    that are already numbers pass through."""
    on_device = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    host = {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
    if on_device:
        values = torch.stack([metrics[k].detach().double().reshape(()) for k in on_device]).tolist()
        host.update(zip(on_device, values))
    return {k: host[k] for k in metrics}

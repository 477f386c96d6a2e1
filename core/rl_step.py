"""What every train backend does with one rollout's batch besides running its model: old and
reference log-probs, the KL the estimator sees, advantages, the step objective's scale and each
micro-batch's loss. Runs inside the train actors, once per ``train`` call, on every rank.

The backend supplies ``compute_log_probs(which)`` (``"old"`` or ``"ref"``: response log-probs of the
samples this rank owns, ``{position: tensor}``) and ``gather(local, n)`` (the per-sample tensors of
all ranks as one list; identity on a single rank). Advantages are computed over the whole batch on
every rank (an estimator may normalise across groups), so only the per-token KL crosses ranks.

What the estimator declares is read here (class or instance attributes, all optional):
``sequence_level_ratio`` (GSPO's ratio), ``policy_loss(log_probs, ppo_kl, advantages, args) ->
(per-token loss, clipfrac)`` replacing the PPO-clip term (CISPO), and ``loss_agg_mode`` (the
aggregation it wants unless ``--loss-agg-mode`` / ``--calculate-per-token-loss`` say otherwise; Dr.GRPO).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from . import losses
from .host_to_device import to_device
from .loss_options import SEQ_MEAN_TOKEN_MEAN, TOKEN_MEAN, estimator_loss_agg_mode, resolve_loss_agg_mode
from .protocols import AdvantageInputs
from .types import option as _opt


@dataclass
class PreparedRollout:
    """One rollout's per-sample tensors (indexed by position in ``data``) and its loss settings."""

    args: Any
    data: dict
    loss_masks: list[torch.Tensor]
    advantages: list[torch.Tensor]
    rollout_log_probs: list[torch.Tensor]
    old_log_probs: Any  # dict (owned samples) or list (all), None = one-step on-policy shortcut
    ref_log_probs: Any  # dict (owned samples) or None
    sequence_level: bool
    loss_agg_mode: str = SEQ_MEAN_TOKEN_MEAN
    policy_loss_fn: Callable | None = None  # the estimator's ``policy_loss`` (CISPO); None = PPO clip
    num_steps: int = 1
    _scale_of: dict = field(default_factory=dict)  # position -> the scale of the step that trains it

    def step_scale(self, positions: Sequence[int]) -> float:
        """Weight of a micro-batch loss in its optimizer step: the step objective is (1/G) Σ over the
        step's rollouts of their reduced loss (or, token-mean, Σ m ℓ / Σ_i max(1, Σ_t m_it) over the step),
        whatever the micro-batch split or the number of ranks. Called by the trainer once per step,
        before the step's micro-batches."""
        if self.loss_agg_mode == TOKEN_MEAN:
            # Σ_i max(1, Σ_t m_it), as slime's per-token normaliser: a fully masked sample still counts
            # one token. From the host's copy of the masks: no wait for the GPU.
            scale = 1.0 / max(1.0, sum(max(1.0, float(sum(self.data["loss_masks"][p]))) for p in positions))
        else:
            scale = 1.0 / len({self.data["rollout_ids"][p] for p in positions})
        self._scale_of.update(dict.fromkeys(positions, scale))
        return scale

    def loss(self, micro_batch: Sequence[int], log_probs: torch.Tensor,
             entropy: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The RL loss of one micro-batch (unscaled) from the model's response log-probs/entropy; its
        metrics stay 0-d tensors on the device (``losses.metrics_to_host`` reads them)."""

        def cat(values):
            return None if values is None else torch.cat([values[i] for i in micro_batch])

        loss, metrics = losses.compute_rl_loss(
            log_probs, loss_masks=[self.loss_masks[i] for i in micro_batch],
            response_lengths=[self.data["response_lengths"][i] for i in micro_batch], config=self.args,
            mask_sums=[self.data["rollout_mask_sums"][i] for i in micro_batch], old_log_probs=cat(self.old_log_probs),
            advantages=cat(self.advantages), entropy=entropy, ref_log_probs=cat(self.ref_log_probs),
            rollout_log_probs=cat(self.rollout_log_probs), sequence_level_ratio=self.sequence_level,
            total_lengths=[len(self.data["tokens"][i]) for i in micro_batch],
            loss_agg_mode=self.loss_agg_mode, policy_loss_fn=self.policy_loss_fn, metrics_on_device=True,
        )
        # Counts (masked tokens) are summed by the trainer as value x step scale, then averaged over
        # the rollout's steps: undo both so the rollout's metric is the total count.
        scale = self._scale_of.get(micro_batch[0]) if len(micro_batch) else None
        for key in losses.COUNT_METRICS:
            if key in metrics:
                metrics[key] *= self.num_steps / scale if scale else 1.0
        return loss, metrics


def prepare_rollout(args, data: dict, estimator, device, *, num_steps: int, has_ref: bool,
                    compute_log_probs: Callable[[str], dict[int, torch.Tensor]],
                    gather: Callable[[dict[int, torch.Tensor], int], list[torch.Tensor]],
                    trained: Sequence[int] | None = None) -> PreparedRollout:
    """Log-probs, KL and advantages of one rollout. Old log-probs are recomputed unless the rollout
    engine's are used (``--use-rollout-logprobs``) or, as slime does, there is one optimizer step with
    no KL and no TIS (then old = current, detached, inside the loss).

    ``trained``: the positions the optimizer steps train (default all). ``--normalize-advantages``
    takes its statistics over those only: the samples of rollouts that fill no step are not trained,
    and slime drops them before its whitening."""
    from .whiten import whiten_advantages

    def tensors(rows):
        # one host->device copy for all samples, without a host sync (host_to_device.py), then per-sample views
        host = [torch.as_tensor(row, dtype=torch.float32, device="cpu").reshape(-1) for row in rows]
        flat = to_device(torch.cat(host) if host else torch.zeros(0), device, torch.float32)
        return list(flat.split([len(row) for row in host]))

    n = len(data["tokens"])
    loss_masks = tensors(data["loss_masks"])
    kl_coef = float(_opt(args, "kl_coef", 0.0))
    mismatch = bool(getattr(args, "use_tis", False)) or bool(getattr(args, "use_rs", False))
    reuse_current = num_steps == 1 and kl_coef == 0.0 and not mismatch
    old = None
    if getattr(args, "use_rollout_logprobs", False):
        old = tensors(data["rollout_log_probs"])
    elif not reuse_current:
        old = compute_log_probs("old")
    ref = compute_log_probs("ref") if has_ref else None
    kl = None
    if kl_coef != 0.0 and ref is not None and old is not None:
        kl_type = _opt(args, "kl_loss_type", "k1")
        kl = gather({i: losses.approx_kl(old[i], ref[i], kl_type) for i in ref}, n)
    custom = getattr(args, "custom_advantage_function_path", None)
    if custom:
        advantages = custom_advantages(custom, args, data, loss_masks, kl, old, ref)
    else:
        advantages, _returns = estimator.compute(AdvantageInputs(
            rewards=data["rewards"], raw_rewards=data.get("raw_reward"), loss_masks=loss_masks,
            response_lengths=data["response_lengths"], kl=kl,
        ))
    advantages = [a.to(device).float() for a in advantages]
    if getattr(args, "normalize_advantages", False):
        stat_masks = loss_masks
        if trained is not None and len(set(trained)) < n:
            keep = set(trained)
            stat_masks = [m if i in keep else torch.zeros_like(m) for i, m in enumerate(loss_masks)]
        advantages = whiten_advantages(advantages, stat_masks)
    return PreparedRollout(args=args, data=data, loss_masks=loss_masks, advantages=advantages,
                           rollout_log_probs=tensors(data["rollout_log_probs"]), old_log_probs=old,
                           ref_log_probs=ref, sequence_level=bool(getattr(estimator, "sequence_level_ratio", False)),
                           loss_agg_mode=resolve_loss_agg_mode(args, estimator_loss_agg_mode(estimator)),
                           policy_loss_fn=getattr(estimator, "policy_loss", None), num_steps=num_steps)


def custom_advantages(path: str, args, data: dict, loss_masks: list[torch.Tensor], kl, old, ref) -> list[torch.Tensor]:
    """slime's ``--custom-advantage-function-path``: ``fn(args, rollout_data) -> None`` sets
    ``rollout_data["advantages"]`` (and ``"returns"``), one response-length tensor per sample. Called on
    every train rank with the whole rollout: the train data (``tokens``, ``response_lengths``,
    ``rewards``, ``raw_reward``, ``rollout_log_probs``, ...), ``loss_masks`` as tensors, the per-token
    ``kl`` (when a KL coefficient is set) and this rank's ``log_probs`` / ``ref_log_probs``
    (``{sample position: tensor}`` for the samples it trains; ``None`` when not computed)."""
    from .registry import import_object

    fn = import_object(path)
    rollout_data = {**data, "loss_masks": loss_masks, "kl": kl,
                    "log_probs": old if isinstance(old, dict) else None, "ref_log_probs": ref}
    fn(args, rollout_data)
    advantages = rollout_data.get("advantages")
    lengths = data["response_lengths"]
    if advantages is None or len(advantages) != len(lengths):
        raise ValueError(f"--custom-advantage-function-path {path}: must set rollout_data['advantages'] to one "
                         f"tensor per sample ({len(lengths)}), got {type(advantages).__name__}")
    advantages = [torch.as_tensor(a, dtype=torch.float32) for a in advantages]
    wrong = [i for i, (a, n) in enumerate(zip(advantages, lengths)) if a.shape != (n,)]
    if wrong:
        i = wrong[0]
        raise ValueError(f"--custom-advantage-function-path {path}: advantages of sample {i} have shape "
                         f"{tuple(advantages[i].shape)}, expected ({lengths[i]},) (its response length)")
    return advantages


def add_scaled(total: dict, metrics: dict, scale: float) -> None:
    """``total += metrics * scale`` key by key (floats, or 0-d tensors summed on the device)."""
    for key, value in metrics.items():
        total[key] = total.get(key, 0.0) + value * scale


def run_rl_steps(prepared: PreparedRollout, step_positions: list, planned: list[list[list[int]]], *,
                 forward: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor | None]],
                 zero_grad: Callable[[], None], finish_step: Callable[[dict[str, torch.Tensor]], dict],
                 loss_multiplier: float = 1.0, before_step: Callable[[int], None] | None = None,
                 on_micro_batch: Callable[[], None] | None = None,
                 no_sync: Callable[[], AbstractContextManager] | None = None) -> dict[str, float]:
    """The optimizer steps of one rollout, shared by the train backends (in each train actor).

    ``planned[s]`` is this rank's micro-batches (sample positions) of step ``s``; ``forward(mb)`` gives
    their response log-probs and entropy; each micro-batch's loss is scaled by the step's
    ``step_scale`` (so packing never changes the per-sample-mean objective) times ``loss_multiplier``
    (e.g. DP size where the backend's DDP averages gradients) before ``backward``. ``finish_step``
    gets the step's metrics as 0-d device tensors, reduces over ranks and steps the optimizer, returning
    the metrics with ``grad_norm`` and ``lr`` (tensors or floats); the result is their mean over steps.
    ``no_sync`` (e.g. megatron DDP's ``no_sync`` with ``--overlap-grad-reduce``) wraps the forward and
    backward of every micro-batch of a step but its last, so a DDP that reduces gradients as the backward
    produces them does so once per step, during the last micro-batch's backward.

    Nothing here waits for the GPU before the optimizer step has been launched: the micro-batches'
    metrics are summed on the device and read once per step, after ``finish_step``, so the host
    queues clipping and the optimizer while the GPU still runs the backward."""
    totals: dict[str, float] = {}
    for step_id, (positions, micro_batches) in enumerate(zip(step_positions, planned)):
        if before_step is not None:
            before_step(step_id)
        scale = prepared.step_scale(positions)
        zero_grad()
        step_metrics: dict[str, torch.Tensor] = {}
        for index, mb in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with nullcontext() if no_sync is None or last else no_sync():
                log_probs, entropy = forward(mb)
                loss, metrics = prepared.loss(mb, log_probs, entropy)
                (loss * (scale * loss_multiplier)).backward()
            add_scaled(step_metrics, metrics, scale)
            if on_micro_batch is not None:
                on_micro_batch()
        add_scaled(totals, losses.metrics_to_host(finish_step(step_metrics)), 1.0 / len(step_positions))
    return totals

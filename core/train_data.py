"""From rewarded groups to the train data dict shipped to the train actors (slime §2.9, §4.1).

Runs in the rollout manager. Reward post-processors (e.g. ``overlong_penalty``) edit raw rewards
first, then the advantage estimator's ``shape_rewards`` sees them as ``[n_groups, n]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .packing import rollout_mask_sums
from .types import Group, Sample, Status


def shaped_rewards(groups: Sequence[Group], estimator, reward_key: str | None) -> tuple[list[float], list[float]]:
    """(raw, shaped) scalar rewards in sample order; shaping sees the ``[n_groups, n]`` table."""
    import torch

    samples = [s for g in groups for s in g]
    raw = [float(s.get_reward_value(reward_key=reward_key) or 0.0) for s in samples]
    sizes = {len(g) for g in groups}
    if len(sizes) == 1:
        table = torch.tensor(raw, dtype=torch.float32).view(len(groups), sizes.pop())
    else:  # slime's fallback: unequal groups are normalised as one group
        table = torch.tensor(raw, dtype=torch.float32).view(1, -1)
    shaped = estimator.shape_rewards(table).reshape(-1).tolist()
    return raw, shaped


def custom_rewards(fn: Callable, args: Any, samples: list[Sample]) -> tuple[list[float], list[float]]:
    """slime's ``--custom-reward-post-process-path``: ``fn(args, samples) -> (raw_rewards, rewards)``,
    in place of the estimator's shaping (GRPO's group normalisation); checked for one value per sample."""
    result = fn(args, samples)
    flag = f"--custom-reward-post-process-path {getattr(args, 'custom_reward_post_process_path', '')}".rstrip()
    if not (isinstance(result, tuple | list) and len(result) == 2):
        raise TypeError(f"{flag}: must return (raw_rewards, rewards), got {type(result).__name__}")
    raw, shaped = ([float(v) for v in values] for values in result)
    if len(raw) != len(samples) or len(shaped) != len(samples):
        raise ValueError(f"{flag}: returned {len(raw)} raw rewards and {len(shaped)} rewards for {len(samples)} "
                         "samples; give one of each per sample")
    return raw, shaped


def samples_to_train_data(
    groups: Sequence[Group], estimator, *, reward_key: str | None = None,
    post_processors: Sequence[tuple[Callable[[list[Sample], Any], None], Any]] = (), args: Any = None,
    reward_post_process: Callable | None = None,
) -> dict:
    """Flatten groups into per-sample lists; every sample is its own rollout unless it has a rollout_id.
    ``post_processors`` are ``(function, its options object or the run config)`` pairs, applied in order;
    ``reward_post_process`` (``--custom-reward-post-process-path``) replaces the estimator's shaping."""
    samples = [s for g in groups for s in g]
    for post_process, options in post_processors:
        post_process(samples, options)
    if reward_post_process is not None:
        raw, shaped = custom_rewards(reward_post_process, args, samples)
    else:
        raw, shaped = shaped_rewards(groups, estimator, reward_key)
    rollout_ids, next_id, taken = [], 0, {s.rollout_id for s in samples if s.rollout_id is not None}
    for s in samples:
        if s.rollout_id is not None:
            rollout_ids.append(s.rollout_id)
            continue
        while next_id in taken:
            next_id += 1
        rollout_ids.append(next_id)
        taken.add(next_id)
    loss_masks = []
    for s in samples:
        mask = list(s.loss_mask) if s.loss_mask is not None else [1] * s.response_length
        if s.remove_sample:
            mask = [0] * s.response_length
        loss_masks.append(mask)
    return {
        "tokens": [list(s.tokens) for s in samples],
        "response_lengths": [s.response_length for s in samples],
        "rewards": shaped,
        "raw_reward": [float(s.metadata.get("raw_reward", r)) for s, r in zip(samples, raw)],
        "truncated": [1 if s.status == Status.TRUNCATED else 0 for s in samples],
        "loss_masks": loss_masks,
        "rollout_log_probs": [list(s.rollout_log_probs or [0.0] * s.response_length) for s in samples],
        "sample_indices": [s.index for s in samples],
        "rollout_ids": rollout_ids,
        "rollout_mask_sums": rollout_mask_sums(rollout_ids, [sum(mask) for mask in loss_masks]),
    }

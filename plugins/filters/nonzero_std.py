"""Dynamic-sampling filters ``nonzero_std`` and ``nonzero_std_with_fallback`` (DAPO's dynamic sampling).

A group whose rewards are all equal gives every sample a zero advantage under group normalisation,
so it costs a training step and teaches nothing. Called in the rollout manager once per finished
group; semantics follow slime's ``check_reward_nonzero_std`` (float64, unbiased std, threshold 1e-6,
reason ``zero_std_<round(rewards[0], 1)>`` of the reward as given: ``zero_std_1`` for an int 1,
``zero_std_1.0`` for a float).

A group of one sample has no spread, so ``nonzero_std`` would drop every group and the rollout would never
end: the driver refuses it with ``--n-samples-per-prompt 1`` (``group_size_problems``, the filter's declared
``check``). ``nonzero_std_with_fallback`` still finishes (it keeps groups once too few remain), so it is allowed.
"""

from __future__ import annotations

import dataclasses

import statistics

from plugrl.core import FilterDecision, hookimpl
from plugrl.core.types import Sample

STD_THRESHOLD = 1e-6


def group_rewards(group: list[Sample], reward_key: str | None = None) -> list[float]:
    """The scalar rewards of a group as Python floats (IEEE float64)."""
    return [float(sample.get_reward_value(reward_key=reward_key)) for sample in group]


def _unbiased_std(values: list[float]) -> float:
    # torch.std's default (Bessel-corrected); a single sample has no spread, like an all-equal group.
    return statistics.stdev(values) if len(values) > 1 else 0.0


def nonzero_std(group: list[Sample], reward_key: str | None = None) -> FilterDecision:
    """Keep the group iff the unbiased std of its rewards exceeds 1e-6."""
    rewards = group_rewards(group, reward_key)
    if rewards and _unbiased_std(rewards) > STD_THRESHOLD:
        return FilterDecision(keep=True)
    # the reward as the reward function gave it (an int stays an int: zero_std_1, as slime names it)
    first = round(group[0].get_reward_value(reward_key=reward_key), 1) if group else None
    return FilterDecision(keep=False, reason=f"zero_std_{first}")


def nonzero_std_with_fallback(group: list[Sample], reward_key: str | None = None) -> FilterDecision:
    """Like ``nonzero_std``, but a zero-std group is accepted when dropping it would force another
    over-sampling round (``keep_when_insufficient``)."""
    decision = nonzero_std(group, reward_key=reward_key)
    return FilterDecision(keep=decision.keep, reason=decision.reason, keep_when_insufficient=True)


@dataclasses.dataclass
class RewardKeyOptions:
    """``--filter-opt`` options of the ``nonzero_std`` filters (``--reward-key`` fills ``reward_key``)."""

    reward_key: str | None = dataclasses.field(default=None, metadata={"help": "key of a dict reward"})


def group_size_problems(config) -> list[str]:
    """Driver check of ``nonzero_std`` (its ``check`` trait): a group of one has zero std, so every group
    would be dropped and dynamic sampling would generate forever."""
    n = getattr(config, "n_samples_per_prompt", None)
    if n is None or n >= 2:
        return []
    return [f"--dynamic-sampling-filter nonzero_std with --n-samples-per-prompt {n}: a group of one sample has zero "
            "reward std, so every group would be dropped and the rollout would never end; use "
            "--n-samples-per-prompt 2 or more, or drop the filter"]


@hookimpl
def plugrl_register_filters(register):
    register("nonzero_std", nonzero_std, options=RewardKeyOptions, check=group_size_problems,
             description="drop groups whose rewards all agree (std <= 1e-6); option reward_key")
    register("nonzero_std_with_fallback", nonzero_std_with_fallback, options=RewardKeyOptions,
             description="nonzero_std, but keep zero-std groups rather than over-sample again")

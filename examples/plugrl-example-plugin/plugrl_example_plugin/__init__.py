"""An example plugrl plugin: reward ``contains_42``, estimator ``mean_baseline``, filter ``min_reward_spread``.

plugrl finds this module through the ``plugrl`` entry-point group and calls its ``plugrl_register_*``
hooks once per process. Nothing heavy is imported here: torch is imported inside the estimator.

The estimator and the filter declare their options as dataclasses with a check; plugrl fills them
from ``--adv-opt`` / ``--filter-opt KEY=VALUE`` and refuses unknown keys, wrong types and failed
checks on the driver, ``plugrl train --dry-run`` included.
"""

import dataclasses

from plugrl import hookimpl
from plugrl.core.plugin_options import OptionsEstimator


def contains_42(sample, **options) -> float:
    """1.0 if the response mentions 42, else 0.0."""
    return 1.0 if "42" in sample.response else 0.0


@dataclasses.dataclass
class MeanBaselineOptions:
    scale: float = dataclasses.field(default=1.0, metadata={"help": "multiplies every advantage"})


def check_mean_baseline(options: MeanBaselineOptions) -> list[str]:
    return [] if options.scale > 0 else [f"option 'scale' must be > 0, got {options.scale}"]


class MeanBaseline(OptionsEstimator):
    """Advantage = scale x (reward minus the group's mean reward): GRPO without the std division."""

    name = "mean_baseline"
    options_type = MeanBaselineOptions
    check_options = staticmethod(check_mean_baseline)
    normalizes_group_rewards = True

    def shape_rewards(self, rewards):
        return (rewards - rewards.mean(dim=-1, keepdim=True)) * self.options.scale

    def compute(self, inputs):
        import torch

        advantages = [torch.full((n,), float(r)) for r, n in zip(inputs.rewards, inputs.response_lengths)]
        return advantages, [a.clone() for a in advantages]


@dataclasses.dataclass
class SpreadOptions:
    spread: float = dataclasses.field(default=0.5, metadata={"help": "smallest max - min reward kept"})


def check_spread(options: SpreadOptions) -> list[str]:
    return [] if options.spread >= 0 else [f"option 'spread' must be >= 0, got {options.spread}"]


def min_reward_spread(group, spread: float = 0.5, **options) -> bool:
    """Keep a group only if its best and worst rewards differ by at least ``spread``."""
    rewards = [float(sample.reward) for sample in group]
    return max(rewards) - min(rewards) >= float(spread)


@hookimpl
def plugrl_register_rewards(register):
    register("contains_42", contains_42, description="1.0 if the response contains '42'")


@hookimpl
def plugrl_register_advantage_estimators(register):
    # options_type and check_options are class attributes of MeanBaseline
    register("mean_baseline", MeanBaseline, description="scale x (reward minus the group mean)")


@hookimpl
def plugrl_register_filters(register):
    register("min_reward_spread", min_reward_spread, options=SpreadOptions, check_options=check_spread,
             description="keep iff max - min reward >= spread (0.5)")

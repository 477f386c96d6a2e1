"""An example plugrl plugin: reward ``contains_42``, estimator ``mean_baseline``, filter ``min_reward_spread``.

plugrl finds this module through the ``plugrl`` entry-point group and calls its ``plugrl_register_*``
hooks once per process. Nothing heavy is imported here: torch is imported inside the estimator.
"""

from plugrl import AdvantageEstimator, hookimpl


def contains_42(sample, **options) -> float:
    """1.0 if the response mentions 42, else 0.0."""
    return 1.0 if "42" in sample.response else 0.0


class MeanBaseline(AdvantageEstimator):
    """Advantage = reward minus the group's mean reward (GRPO without the std division, like Dr. GRPO)."""

    name = "mean_baseline"
    normalizes_group_rewards = True

    def shape_rewards(self, rewards):
        return rewards - rewards.mean(dim=-1, keepdim=True)

    def compute(self, inputs):
        import torch

        advantages = [torch.full((n,), float(r)) for r, n in zip(inputs.rewards, inputs.response_lengths)]
        return advantages, [a.clone() for a in advantages]


def min_reward_spread(group, spread: float = 0.5, **options) -> bool:
    """Keep a group only if its best and worst rewards differ by at least ``spread``."""
    rewards = [float(sample.reward) for sample in group]
    return max(rewards) - min(rewards) >= float(spread)


@hookimpl
def plugrl_register_rewards(register):
    register("contains_42", contains_42, description="1.0 if the response contains '42'")


@hookimpl
def plugrl_register_advantage_estimators(register):
    register("mean_baseline", MeanBaseline, description="reward minus the group mean")


@hookimpl
def plugrl_register_filters(register):
    register("min_reward_spread", min_reward_spread, description="keep iff max - min reward >= spread (0.5)")

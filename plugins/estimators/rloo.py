"""RLOO (REINFORCE leave-one-out); slime has no equivalent.

Rollout side: each sample's reward minus the mean of the *other* samples of its group,
``r_i − mean_{j≠i} r_j = n/(n−1) · (r_i − mean_j r_j)``; needs ``n ≥ 2``. The baseline *is* the
estimator, so ``--disable-rewards-normalization`` does not switch it off.
Train side: ``A_t = R_t = shaped reward`` for every token (like GRPO; the reward-shaping KL is not
folded in, use ``--use-kl-loss``).
Options (``RLOOOptions``): the run's group size, checked on the driver.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from plugrl.core import hookimpl
from plugrl.core.plugin_options import RUN_SETTING, OptionsEstimator
from plugrl.core.protocols import AdvantageInputs

from .grpo import as_groups, constant_per_token


@dataclasses.dataclass
class RLOOOptions:
    n_samples_per_prompt: int | None = dataclasses.field(default=None, metadata={
        "help": "samples per prompt (--n-samples-per-prompt); at least 2", RUN_SETTING: True})


def check_rloo(options: RLOOOptions) -> list[str]:
    n = options.n_samples_per_prompt
    if n is not None and n < 2:
        return [f"--advantage-estimator rloo needs --n-samples-per-prompt >= 2, got {n}"]
    return []


def leave_one_out(rewards):
    """``rewards[n_groups, n]`` -> ``r_i − mean_{j≠i} r_j`` per row (float32, the input's shape)."""
    import torch

    shape = torch.as_tensor(rewards).shape
    r = as_groups(rewards)
    n = r.shape[-1]
    if n < 2:
        raise ValueError(f"rloo needs at least 2 samples per group (--n-samples-per-prompt), got {n}")
    others_mean = (r.sum(dim=-1, keepdim=True) - r) / (n - 1)
    return (r - others_mean).reshape(shape)


class RLOOEstimator(OptionsEstimator):
    name: ClassVar[str] = "rloo"
    options_type: ClassVar[type] = RLOOOptions
    check_options = staticmethod(check_rloo)
    normalizes_group_rewards: ClassVar[bool] = True
    sequence_level_ratio: ClassVar[bool] = False

    def shape_rewards(self, rewards):
        return leave_one_out(rewards)

    def compute(self, inputs: AdvantageInputs):
        return constant_per_token(inputs)


@hookimpl
def plugrl_register_advantage_estimators(register):
    register(
        "rloo",
        RLOOEstimator,
        description="RLOO: reward minus the mean of the other samples of its group",
    )

"""RLOO (REINFORCE leave-one-out); slime has no equivalent.

Rollout side: each sample's reward minus the mean of the *other* samples of its group,
``r_i − mean_{j≠i} r_j = n/(n−1) · (r_i − mean_j r_j)``; needs ``n ≥ 2``. The baseline *is* the
estimator, so ``--disable-rewards-normalization`` does not switch it off.
Train side: ``A_t = R_t = shaped reward`` for every token (like GRPO; the reward-shaping KL is not
folded in, use ``--use-kl-loss``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from plugrl.core import hookimpl
from plugrl.core.protocols import AdvantageEstimator, AdvantageInputs

from .grpo import as_groups, constant_per_token


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


class RLOOEstimator(AdvantageEstimator):
    name: ClassVar[str] = "rloo"
    normalizes_group_rewards: ClassVar[bool] = True
    sequence_level_ratio: ClassVar[bool] = False

    @classmethod
    def check_config(cls, args: Any) -> None:
        n = getattr(args, "n_samples_per_prompt", None)
        if n is not None and int(n) < 2:
            raise ValueError(f"--advantage-estimator rloo needs --n-samples-per-prompt >= 2, got {n}")

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

"""GSPO: GRPO's group-normalised rewards with a sequence-level importance ratio.

Rollout side: the same shaping as ``grpo``. Train side: ``A_t = R_t = r``; because
``sequence_level_ratio`` is set, the trainer replaces the per-token ``old − logπ`` by each sequence's
masked mean (``plugrl.core.losses.sequence_level_ppo_kl``), so every token of a sample shares the
length-normalised ratio and is clipped together.
"""

from __future__ import annotations

from typing import ClassVar

from plugrl.core import hookimpl

from .grpo import GRPOEstimator


class GSPOEstimator(GRPOEstimator):
    name: ClassVar[str] = "gspo"
    sequence_level_ratio: ClassVar[bool] = True


@hookimpl
def plugrl_register_advantage_estimators(register):
    register(
        "gspo",
        GSPOEstimator,
        description="GSPO: GRPO rewards with a sequence-level (geometric-mean) PPO ratio",
    )

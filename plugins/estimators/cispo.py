"""CISPO (MiniMax-M1, arXiv:2506.13585): clipped importance-sampling weights in a REINFORCE-style
token loss; slime's ``--advantage-estimator cispo``.

Rollout side: GRPO's group normalisation (slime normalises cispo rewards like grpo's, std included
unless ``--disable-grpo-std-normalization``). Train side: ``A_t = R_t = r`` for every token, and the
policy term (``policy_loss``, called by ``core/losses.compute_rl_loss`` instead of PPO's clip) is

    ℓ_t = −sg(clip(ρ_t, 1 − ε_low, 1 + ε_high)) · A_t · log π_θ,t,    ρ_t = π_θ,t / π_old,t

with ``ε_low = --eps-clip`` and ``ε_high = --eps-clip-high`` (slime's flags). The clipped weight is
a constant, so every token keeps a gradient ``−w_t A_t ∇log π_θ,t``: unlike PPO's clip, a token whose
ratio left the band is down-weighted, never dropped. The paper sets no lower bound (``--eps-clip 1``
or more) and tunes only the upper one.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

from plugrl.core import hookimpl
from plugrl.core.plugin_options import RUN_SETTING

from .grpo import GRPOEstimator, GRPOOptions

logger = logging.getLogger(__name__)


def cispo_loss(log_probs, ppo_kl, advantages, eps_clip: float, eps_clip_high: float):
    """Per-token ``(−sg(clip(exp(−ppo_kl), 1 − eps_clip, 1 + eps_clip_high)) · A · logπ, clipfrac)``;
    ``ppo_kl = old − logπ``; ``clipfrac`` is 1 where the clip changed the weight."""
    import torch

    ratio = torch.exp(-ppo_kl.detach())
    weight = ratio.clamp(min=1.0 - eps_clip, max=1.0 + eps_clip_high)
    return -weight * advantages * log_probs, (weight != ratio).float()


@dataclasses.dataclass
class CISPOOptions(GRPOOptions):
    # slime's loss flags: run settings, so the IS-weight band is set where PPO's clip is.
    eps_clip: float = dataclasses.field(default=0.2, metadata={
        "help": "lower bound 1 - eps_clip of the IS weight (--eps-clip)", RUN_SETTING: True})
    eps_clip_high: float | None = dataclasses.field(default=None, metadata={
        "help": "upper bound 1 + eps_clip_high (--eps-clip-high; default --eps-clip)", RUN_SETTING: True})
    eps_clip_c: float | None = dataclasses.field(default=None, metadata={
        "help": "PPO's dual clip (--eps-clip-c): cispo has no clipped surrogate, so it must stay unset",
        RUN_SETTING: True})


def check_cispo(options: CISPOOptions) -> list[str]:
    """Driver check (``--dry-run`` too)."""
    if options.eps_clip_c is not None:
        return ["--eps-clip-c (dual clip) bounds PPO's clipped surrogate; --advantage-estimator cispo has none: "
                "drop it"]
    if options.eps_clip < 1.0:
        # As slime: allowed, but the paper's CISPO has no lower bound on the weight.
        logger.warning("--advantage-estimator cispo with --eps-clip %s bounds the IS weight below by %s; "
                       "the paper sets no lower bound (--eps-clip 1.0) and tunes --eps-clip-high (e.g. 4)",
                       options.eps_clip, 1.0 - options.eps_clip)
    return []


class CISPOEstimator(GRPOEstimator):
    name: ClassVar[str] = "cispo"
    options_type: ClassVar[type] = CISPOOptions

    @classmethod
    def check_options(cls, options: CISPOOptions) -> list[str]:
        return check_cispo(options) + super().check_options(options)

    def policy_loss(self, log_probs, ppo_kl, advantages, args: Any = None):
        """Train actors, per micro-batch (from ``compute_rl_loss``): the CISPO term instead of PPO's."""
        eps_clip = self.options.eps_clip
        eps_clip_high = eps_clip if self.options.eps_clip_high is None else self.options.eps_clip_high
        return cispo_loss(log_probs, ppo_kl, advantages, eps_clip, eps_clip_high)


@hookimpl
def plugrl_register_advantage_estimators(register):
    register(
        "cispo",
        CISPOEstimator,
        description="CISPO (MiniMax-M1): GRPO rewards, REINFORCE token loss with clipped, stop-gradient IS "
                    "weights (--eps-clip, --eps-clip-high)",
    )

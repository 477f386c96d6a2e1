"""REINFORCE++ and REINFORCE++-baseline.

``reinforce_plus_plus`` (no reward shaping on the rollout side). Train side: token rewards
``ρ_t = −kl_coef · kl_t · m_t``, the scalar reward added at the last trainable token, discounted
returns ``G_t = Σ_{k≥t} γ^{k−t} ρ_k`` (``--gamma``), ``A = R = G``.

``reinforce_plus_plus_baseline``. Rollout side: rewards centred on their group mean (no std; skipped
with ``--disable-rewards-normalization``). Train side: ``A_t = R_t = r_centred − kl_coef · kl_t · m_t``.

Both require ``--normalize-advantages`` (the trainer whitens the advantages over the whole batch with
``returns.whiten_advantages``). ``needs_ref_log_probs`` is set on the *instance* when ``--kl-coef`` is
non-zero: only then does ``compute`` need the per-token KL (old vs ref), so only then must the
trainer run the reference model for the estimator.

Options: ``ReinforceOptions`` (``kl_coef``, ``normalize_advantages``, ``gamma``) and
``ReinforceBaselineOptions`` (``kl_coef``, ``normalize_advantages``, ``disable_rewards_normalization``);
``gamma`` and ``disable_rewards_normalization`` may also be given as ``--adv-opt KEY=VALUE``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from plugrl.core import hookimpl
from plugrl.core.plugin_options import RUN_SETTING, OptionsEstimator
from plugrl.core.protocols import AdvantageInputs

from .returns import discounted_returns, kl_shaped_token_rewards

# Field metadata shared by the options classes below and ppo.py's.
KL_COEF = {"help": "reward-shaping KL coefficient (--kl-coef); non-zero needs the reference model",
           RUN_SETTING: True}
NORMALIZE = {"help": "whiten the advantages over the batch (--normalize-advantages); required", RUN_SETTING: True}
GAMMA = {"help": "discount of the token rewards (--gamma), in [0, 1]"}


@dataclasses.dataclass
class ReinforceOptions:
    kl_coef: float = dataclasses.field(default=0.0, metadata=KL_COEF)
    normalize_advantages: bool = dataclasses.field(default=False, metadata=NORMALIZE)
    gamma: float = dataclasses.field(default=1.0, metadata=GAMMA)


@dataclasses.dataclass
class ReinforceBaselineOptions:
    kl_coef: float = dataclasses.field(default=0.0, metadata=KL_COEF)
    normalize_advantages: bool = dataclasses.field(default=False, metadata=NORMALIZE)
    disable_rewards_normalization: bool = dataclasses.field(default=False, metadata={
        "help": "train on the raw rewards (no group-mean centering)"})
    n_samples_per_prompt: int | None = dataclasses.field(default=None, metadata={
        "help": "samples per prompt (--n-samples-per-prompt); at least 2 unless disable_rewards_normalization",
        RUN_SETTING: True})


def check_kl_options(args: Any) -> None:
    """Reward-shaping KL and KL loss are alternatives; slime refuses both at once. A run-config rule that
    core's config check applies to every estimator; kept here for ``check_config`` callers."""
    kl_coef = float(getattr(args, "kl_coef", 0.0) or 0.0)
    kl_loss_coef = float(getattr(args, "kl_loss_coef", 0.0) or 0.0)
    if kl_coef != 0.0 and kl_loss_coef != 0.0:
        raise ValueError("--kl-coef and --kl-loss-coef may not both be non-zero; keep one of them")


def unit_interval_problems(options: Any, *keys: str) -> list[str]:
    """``--<key> must be in [0, 1]`` for each of ``keys`` outside it."""
    return [f"--{key} must be in [0, 1], got {getattr(options, key)}" for key in keys
            if not 0.0 <= getattr(options, key) <= 1.0]


class KLShapedEstimator(OptionsEstimator):
    """Estimators whose token rewards carry ``−kl_coef · kl_t`` (reinforce++ variants, ppo)."""

    sequence_level_ratio: ClassVar[bool] = False

    def __init__(self, options: Any = None):
        super().__init__(options)
        self.kl_coef = float(self.options.kl_coef)
        # Per instance: the reference model is needed for the reward KL only when --kl-coef != 0.
        self.needs_ref_log_probs = self.kl_coef != 0.0

    @classmethod
    def check_config(cls, args: Any) -> None:
        check_kl_options(args)
        super().check_config(args)


class _ReinforceBase(KLShapedEstimator):

    @classmethod
    def check_options(cls, options: Any) -> list[str]:
        return [] if options.normalize_advantages else [f"--advantage-estimator {cls.name} requires --normalize-advantages"]


class ReinforcePlusPlusEstimator(_ReinforceBase):
    name: ClassVar[str] = "reinforce_plus_plus"
    options_type: ClassVar[type] = ReinforceOptions

    @classmethod
    def check_options(cls, options: ReinforceOptions) -> list[str]:
        return super().check_options(options) + unit_interval_problems(options, "gamma")

    def compute(self, inputs: AdvantageInputs):
        token_rewards = kl_shaped_token_rewards(
            inputs.rewards, inputs.kl, inputs.loss_masks, inputs.response_lengths, self.kl_coef
        )
        returns = discounted_returns(token_rewards, float(self.options.gamma))
        return [g.clone() for g in returns], returns


class ReinforcePlusPlusBaselineEstimator(_ReinforceBase):
    name: ClassVar[str] = "reinforce_plus_plus_baseline"
    options_type: ClassVar[type] = ReinforceBaselineOptions
    normalizes_group_rewards: ClassVar[bool] = True

    @classmethod
    def check_options(cls, options: ReinforceBaselineOptions) -> list[str]:
        from .grpo import group_size_problems

        return super().check_options(options) + group_size_problems(cls.name, options)

    def shape_rewards(self, rewards):
        from .grpo import group_normalize

        if self.options.disable_rewards_normalization:
            return rewards
        return group_normalize(rewards, std_normalize=False)

    def compute(self, inputs: AdvantageInputs):
        import torch

        if inputs.kl is None and self.kl_coef != 0.0:
            raise ValueError("--kl-coef is non-zero but no per-token KL was provided (the ref model must run)")
        advantages = []
        for i, (reward, length) in enumerate(zip(inputs.rewards, inputs.response_lengths)):
            mask = torch.as_tensor(inputs.loss_masks[i]).reshape(-1).to(torch.float32)
            adv = torch.full((int(length),), float(reward), dtype=torch.float32, device=mask.device)
            if self.kl_coef != 0.0:
                adv = adv - self.kl_coef * torch.as_tensor(inputs.kl[i]).to(adv) * mask
            advantages.append(adv)
        return advantages, [a.clone() for a in advantages]


@hookimpl
def plugrl_register_advantage_estimators(register):
    register(
        "reinforce_plus_plus",
        ReinforcePlusPlusEstimator,
        description="REINFORCE++: KL-shaped token rewards, discounted returns (needs --normalize-advantages)",
    )
    register(
        "reinforce_plus_plus_baseline",
        ReinforcePlusPlusBaselineEstimator,
        description="REINFORCE++-baseline: group-mean-centred reward minus per-token KL (needs --normalize-advantages)",
    )

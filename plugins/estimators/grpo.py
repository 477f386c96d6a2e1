"""GRPO: group-normalised scalar rewards, the same advantage for every response token.

Rollout side (``shape_rewards``, in the rollout manager): within each group of ``n`` samples of one
prompt, ``r ← r − mean``; then, unless ``--disable-grpo-std-normalization`` (Dr.GRPO) or ``n == 1``,
``r ← r / (std + 1e-6)`` with the unbiased (N−1) std taken after centering.
``--disable-rewards-normalization`` skips all of it. With ``n == 1`` and the centring on, every
advantage is 0 (nothing trains): the driver refuses that (``group_size_problems``).
Train side (``compute``, in the train actors): ``A_t = R_t = r`` for every response token; the
reward-shaping KL (``--kl-coef``) never enters GRPO advantages (use ``--use-kl-loss``).
Options (``GRPOOptions``; also ``gspo``'s and the base of ``cispo``'s): the three flags above, each also
given as ``--adv-opt KEY=VALUE`` except the run's group size.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from plugrl.core import hookimpl
from plugrl.core.plugin_options import RUN_SETTING, OptionsEstimator
from plugrl.core.protocols import AdvantageInputs


STD_EPS = 1e-6


@dataclasses.dataclass
class GRPOOptions:
    n_samples_per_prompt: int | None = dataclasses.field(default=None, metadata={
        "help": "samples per prompt (--n-samples-per-prompt); 1 turns the std division off", RUN_SETTING: True})
    disable_rewards_normalization: bool = dataclasses.field(default=False, metadata={
        "help": "train on the raw rewards (no group normalisation)"})
    disable_grpo_std_normalization: bool = dataclasses.field(default=False, metadata={
        "help": "center on the group mean only, no std division (Dr.GRPO)"})


def group_size_problems(name: str, options) -> list[str]:
    """Driver check of an estimator that centres each reward on its group's mean: a group of one sample
    centres every reward to 0, so the run would train on all-zero advantages (loss 0, grad norm 0).
    ``--disable-rewards-normalization`` (where the estimator has it) skips the centring, so n=1 is fine."""
    n = getattr(options, "n_samples_per_prompt", None)
    if n is None or n >= 2 or getattr(options, "disable_rewards_normalization", False):
        return []
    raw = " (or --disable-rewards-normalization to train on the raw rewards)" if hasattr(
        options, "disable_rewards_normalization") else ""
    return [f"--advantage-estimator {name} with --n-samples-per-prompt {n}: each reward minus its group's mean is "
            f"0, so every advantage would be 0 and nothing would train; use --n-samples-per-prompt 2 or more{raw}"]


def as_groups(rewards):
    """``rewards`` as a float32 ``[n_groups, n]`` tensor; a 1-D input is one group."""
    import torch

    r = torch.as_tensor(rewards, dtype=torch.float32)
    return r.reshape(1, -1) if r.dim() == 1 else r


def group_normalize(rewards, std_normalize: bool):
    """Center each row of ``rewards[n_groups, n]`` on its mean and, if ``std_normalize`` and
    ``n > 1``, divide by its unbiased std + 1e-6. Returns a new float32 tensor of the input's shape
    (a 1-D input is one group)."""
    import torch

    shape = torch.as_tensor(rewards).shape
    r = as_groups(rewards)
    centered = r - r.mean(dim=-1, keepdim=True)
    if std_normalize and r.shape[-1] > 1:
        centered = centered / (centered.std(dim=-1, unbiased=True, keepdim=True) + STD_EPS)
    return centered.reshape(shape)


def constant_per_token(inputs: AdvantageInputs) -> tuple[list, list]:
    """``A_t = R_t = rewards[i]`` over each sample's ``response_lengths[i]`` tokens."""
    import torch

    advantages = []
    for i, (reward, length) in enumerate(zip(inputs.rewards, inputs.response_lengths)):
        device = inputs.loss_masks[i].device if inputs.loss_masks else None
        advantages.append(torch.full((int(length),), float(reward), dtype=torch.float32, device=device))
    return advantages, [a.clone() for a in advantages]


class GRPOEstimator(OptionsEstimator):
    name: ClassVar[str] = "grpo"
    options_type: ClassVar[type] = GRPOOptions
    normalizes_group_rewards: ClassVar[bool] = True
    # The trainer uses ``getattr(estimator, "sequence_level_ratio", False)`` to pick the PPO ratio.
    sequence_level_ratio: ClassVar[bool] = False

    @classmethod
    def check_options(cls, options) -> list[str]:
        return group_size_problems(cls.name, options)

    def std_normalize(self, group_size: int) -> bool:
        if self.options.disable_grpo_std_normalization:
            return False
        n = self.options.n_samples_per_prompt
        return (group_size if n is None else n) > 1 and group_size > 1

    def shape_rewards(self, rewards):
        if self.options.disable_rewards_normalization:
            return rewards
        groups = as_groups(rewards)
        return group_normalize(rewards, self.std_normalize(groups.shape[-1]))

    def compute(self, inputs: AdvantageInputs):
        return constant_per_token(inputs)


@hookimpl
def plugrl_register_advantage_estimators(register):
    register(
        "grpo",
        GRPOEstimator,
        description="GRPO: group mean/std-normalised reward for every token (Dr.GRPO with --disable-grpo-std-normalization)",
    )

"""Dr.GRPO ("Understanding R1-Zero-Like Training", Liu et al., arXiv:2503.20783): GRPO without its
two normalisations, which bias the update towards long wrong answers and easy/hard questions.

* Rollout side: ``r ← r − mean_group(r)``; never divided by the group std (what ``grpo`` does with
  ``--disable-grpo-std-normalization``).
* Train side: ``A_t = R_t = r``; the loss is aggregated ``seq-mean-token-sum-norm``: each response's
  token sum divided by one constant (``--loss-scale-factor``, default the generation budget
  ``--rollout-max-response-len``) instead of its own length, so the step objective is
  ``(1/G) Σ_i Σ_t m_it ℓ_it / C``. Declared as ``loss_agg_mode``; ``--loss-agg-mode`` overrides it.

``grpo --disable-grpo-std-normalization --loss-agg-mode seq-mean-token-sum-norm`` is the same run.
Options (``DrGRPOOptions``): ``disable_rewards_normalization`` (flag or ``--adv-opt``) and the run's group
size (``--n-samples-per-prompt``, at least 2 while the rewards are centred).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from plugrl.core import hookimpl
from plugrl.core.loss_options import SEQ_MEAN_TOKEN_SUM_NORM
from plugrl.core.plugin_options import RUN_SETTING

from .grpo import GRPOEstimator


@dataclasses.dataclass
class DrGRPOOptions:
    n_samples_per_prompt: int | None = dataclasses.field(default=None, metadata={
        "help": "samples per prompt (--n-samples-per-prompt); at least 2 unless disable_rewards_normalization",
        RUN_SETTING: True})
    disable_rewards_normalization: bool = dataclasses.field(default=False, metadata={
        "help": "train on the raw rewards (no centering)"})


class DrGRPOEstimator(GRPOEstimator):
    name: ClassVar[str] = "dr_grpo"
    options_type: ClassVar[type] = DrGRPOOptions
    loss_agg_mode: ClassVar[str] = SEQ_MEAN_TOKEN_SUM_NORM

    def std_normalize(self, group_size: int) -> bool:
        return False


@hookimpl
def plugrl_register_advantage_estimators(register):
    register(
        "dr_grpo",
        DrGRPOEstimator,
        description="Dr.GRPO: group-mean-centred reward (no std), token sums over a constant length "
                    "(seq-mean-token-sum-norm)",
    )

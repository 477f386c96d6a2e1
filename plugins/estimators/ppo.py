"""PPO with a critic: GAE advantages (train side; no reward shaping on the rollout side).

Token rewards ``ρ_t = −kl_coef · kl_t · m_t`` with the scalar reward added at the last trainable
token; ``δ_t = ρ_t + γ V_{t+1} − V_t`` (``V_T = 0``), ``A_t = δ_t + γλ A_{t+1}``, ``R_t = A_t + V_t``
(``--gamma``, ``--lambd``, both default 1.0). ``V`` are the critic's values for the response tokens,
computed before the critic update (``inputs.values``). slime adds the reward at the very last
response token and does not mask the KL; the two agree whenever the response ends with a trainable
token and has no environment tokens (single-turn generation).
Options (``PPOOptions``): ``kl_coef`` (the run's), ``gamma`` and ``lambd`` (flags or ``--adv-opt``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from plugrl.core import hookimpl
from plugrl.core.protocols import AdvantageInputs

from .reinforce import GAMMA, KL_COEF, KLShapedEstimator, unit_interval_problems
from .returns import gae, kl_shaped_token_rewards


@dataclasses.dataclass
class PPOOptions:
    kl_coef: float = dataclasses.field(default=0.0, metadata=KL_COEF)
    gamma: float = dataclasses.field(default=1.0, metadata=GAMMA)
    lambd: float = dataclasses.field(default=1.0, metadata={"help": "GAE's lambda (--lambd), in [0, 1]"})


def check_ppo(options: PPOOptions) -> list[str]:
    return unit_interval_problems(options, "gamma", "lambd")


class PPOEstimator(KLShapedEstimator):
    name: ClassVar[str] = "ppo"
    options_type: ClassVar[type] = PPOOptions
    check_options = staticmethod(check_ppo)
    needs_critic: ClassVar[bool] = True

    def compute(self, inputs: AdvantageInputs):
        if inputs.values is None:
            raise ValueError("ppo needs critic values for every response token (inputs.values)")
        token_rewards = kl_shaped_token_rewards(
            inputs.rewards, inputs.kl, inputs.loss_masks, inputs.response_lengths, self.kl_coef
        )
        values = [v.detach().reshape(-1).float().to(r.device) for v, r in zip(inputs.values, token_rewards)]
        return gae(token_rewards, values, float(self.options.gamma), float(self.options.lambd))


@hookimpl
def plugrl_register_advantage_estimators(register):
    register("ppo", PPOEstimator, description="PPO with a critic: GAE advantages (--gamma, --lambd)")

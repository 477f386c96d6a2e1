"""PPO with a critic: GAE advantages (train side; no reward shaping on the rollout side).

Token rewards ``ρ_t = −kl_coef · kl_t · m_t`` with the scalar reward added at the last trainable
token; ``δ_t = ρ_t + γ V_{t+1} − V_t`` (``V_T = 0``), ``A_t = δ_t + γλ A_{t+1}``, ``R_t = A_t + V_t``
(``--gamma``, ``--lambd``, both default 1.0). ``V`` are the critic's values for the response tokens,
computed before the critic update (``inputs.values``). slime adds the reward at the very last
response token and does not mask the KL; the two agree whenever the response ends with a trainable
token and has no environment tokens (single-turn generation).
"""

from __future__ import annotations

from typing import Any, ClassVar

from plugrl.core import hookimpl
from plugrl.core.protocols import AdvantageInputs

from .reinforce import KLShapedEstimator, check_kl_options, check_unit_interval
from .returns import gae, kl_shaped_token_rewards


class PPOEstimator(KLShapedEstimator):
    name: ClassVar[str] = "ppo"
    needs_critic: ClassVar[bool] = True

    @classmethod
    def check_config(cls, args: Any) -> None:
        check_kl_options(args)
        check_unit_interval(args, "gamma", "--gamma")
        check_unit_interval(args, "lambd", "--lambd")

    def compute(self, inputs: AdvantageInputs):
        if inputs.values is None:
            raise ValueError("ppo needs critic values for every response token (inputs.values)")
        token_rewards = kl_shaped_token_rewards(
            inputs.rewards, inputs.kl, inputs.loss_masks, inputs.response_lengths, self.kl_coef
        )
        values = [v.detach().reshape(-1).float().to(r.device) for v, r in zip(inputs.values, token_rewards)]
        return gae(token_rewards, values, float(self.option("gamma", 1.0)), float(self.option("lambd", 1.0)))


@hookimpl
def plugrl_register_advantage_estimators(register):
    register("ppo", PPOEstimator, description="PPO with a critic: GAE advantages (--gamma, --lambd)")

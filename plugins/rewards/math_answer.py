"""``--rm-type math``: slime's ``grade_answer_verl`` reward, 1 or 0 (per sample, rollout manager).

Unlike ``deepscaler`` it grades the last ``\\boxed{}`` anywhere in the response (no ``</think>``
needed). A falsy label (``""``, ``None``, ``0``) scores 0, as in slime.

Options: ``timeout`` (seconds for the sympy step, default 10; ``0`` runs it unguarded in-process).
"""

from __future__ import annotations

from plugrl.core import hookimpl

from . import math_utils


def math_score(response: str, label, *, timeout: float = math_utils.DEFAULT_TIMEOUT) -> int:
    if not label:
        return 0
    truth = str(label)
    if "\\boxed" in truth:
        truth = math_utils.boxed_answer(truth)
    answer = math_utils.boxed_answer(response)
    if answer is None or truth is None:
        return 0
    return 1 if math_utils.grade(answer, truth, timeout=timeout) else 0


def math_reward(sample, *, timeout=math_utils.DEFAULT_TIMEOUT) -> int:
    return math_score(sample.response, sample.label, timeout=math_utils.timeout_option(timeout))


@hookimpl
def plugrl_register_rewards(register):
    register("math", math_reward, options=math_utils.GraderOptions, check_options=math_utils.check_grader_options,
             description="1/0: last \\boxed{} in the response equals the label")

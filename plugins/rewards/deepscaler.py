"""``--rm-type deepscaler``: slime's rule-based math reward (from agentica-project/deepscaler).

Called per sample wherever rewards are scored (rollout manager, ``plugrl score``). Returns int 1 or
0. Only the text after the last ``</think>`` (or after ``###Response``) is graded, so a response
from a non-thinking chat template always scores 0, exactly as in slime (reference §13.2).

Options: ``timeout`` (seconds for the sympy step, default 10; ``0`` runs it unguarded in-process).
"""

from __future__ import annotations

from plugrl.core import hookimpl

from . import math_utils


def solution_segment(response: str) -> str | None:
    """The part of the response that holds the final answer, or None when no marker is present."""
    if "</think>" in response:
        return response.rsplit("</think>", 1)[1]
    if "###Response" in response:
        return response.split("###Response")[1]  # up to a second marker, as slime does
    return None


def deepscaler_score(response: str, label, *, timeout: float = math_utils.DEFAULT_TIMEOUT) -> int:
    """1 if the last ``\\boxed{}`` after the reasoning matches ``label``, else 0."""
    segment = solution_segment(response)
    if segment is None:
        return 0
    answer = math_utils.boxed_answer(segment)
    if answer is None or label == "":
        return 0
    if not isinstance(label, (str, int, float)):
        raise TypeError(f"deepscaler needs a str, int or float label, got {type(label).__name__}: {label!r}")
    truth = str(label)
    if "\\boxed" in truth:
        truth = math_utils.boxed_answer(truth)
        if truth is None:  # a boxed label whose braces never close matches nothing
            return 0
    return 1 if math_utils.grade(answer, truth, timeout=timeout) else 0


def deepscaler_reward(sample, *, timeout=math_utils.DEFAULT_TIMEOUT) -> int:
    return deepscaler_score(sample.response, sample.label, timeout=math_utils.timeout_option(timeout))


@hookimpl
def plugrl_register_rewards(register):
    register(
        "deepscaler",
        deepscaler_reward,
        options=math_utils.GraderOptions,
        check_options=math_utils.check_grader_options,
        description="1/0: last \\boxed{} after </think> (or ###Response) equals the label (Hendrycks or sympy)",
    )

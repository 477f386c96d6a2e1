"""``--rm-type math_verify``: the gold label vs the response's answer through HuggingFace's
``math_verify`` (parse both into sympy, then ``verify``); 1.0 or 0.0, per sample, in the rollout manager.

math_verify's own timeouts use ``signal.alarm``, which fails off the main thread and in Ray workers,
so they are switched off and the whole grade runs in a guarded grader process instead
(``plugrl.core.timeouts``); a grade cut off at the timeout scores 0.0 and is counted.

Options: ``timeout`` (seconds, default 10; ``0`` grades in-process, unguarded); ``require_boxed``
(default true: the answer is the last ``\\boxed{}``, none scores 0; false: math_verify finds the
answer anywhere in the response).
"""

from __future__ import annotations

import dataclasses

import logging
import re

from plugrl.core import hookimpl

from . import math_utils

GUARDED_IMPORTS = ("math_verify",)

_SPACES = re.compile(r"\s+")


class _DropTimeoutDisabledWarning(logging.Filter):
    # math_verify warns that its timeout is off; here the grader process provides it.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


def _quiet_math_verify() -> None:
    for name in ("math_verify.parser", "math_verify.grader"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTimeoutDisabledWarning) for f in logger.filters):
            logger.addFilter(_DropTimeoutDisabledWarning())


def _parse(text: str) -> list:
    """math_verify's parse of ``text``, retried as inline LaTeX (a bare ``\\frac{1}{2}`` label)."""
    from math_verify import parse

    candidates = [text] if text.startswith("$") and text.endswith("$") else [text, f"${text}$"]
    for candidate in candidates:
        parsed = parse(candidate, parsing_timeout=None)
        if parsed:
            return parsed
    return []


def _plain(text: str) -> str:
    return _SPACES.sub(" ", text.strip()).lower()


def verify_answer(answer: str, gold: str) -> bool:
    """True if ``answer`` is mathematically equal to ``gold`` (falls back to text equality when
    either side does not parse). Runs inside a grader process."""
    from math_verify import verify

    _quiet_math_verify()
    parsed_gold, parsed_answer = _parse(gold), _parse(answer)
    if parsed_gold and parsed_answer:
        try:
            if verify(parsed_gold, parsed_answer, timeout_seconds=None):
                return True
        except Exception:  # an unusual sympy object math_verify cannot compare
            pass
    return _plain(answer) == _plain(gold)


def math_verify_score(response: str, label, *, timeout: float = math_utils.DEFAULT_TIMEOUT,
                      require_boxed: bool = True) -> float:
    if label is None or str(label).strip() == "":
        return 0.0
    gold = str(label).strip()
    if "\\boxed" in gold:
        gold = math_utils.boxed_answer(gold)
        if gold is None:
            return 0.0
    answer = math_utils.boxed_answer(response)
    if answer is None:
        if require_boxed:
            return 0.0
        answer = response
    if timeout <= 0:
        return 1.0 if verify_answer(answer, gold) else 0.0
    from plugrl.core.timeouts import guarded_call

    return 1.0 if guarded_call(verify_answer, answer, gold, timeout=timeout, default=False) else 0.0


def math_verify_reward(sample, *, timeout=math_utils.DEFAULT_TIMEOUT, require_boxed=True) -> float:
    return math_verify_score(sample.response, sample.label, timeout=math_utils.timeout_option(timeout),
                             require_boxed=math_utils.flag_option(require_boxed, "require_boxed"))


@dataclasses.dataclass
class MathVerifyOptions(math_utils.GraderOptions):
    """``--rm-opt`` options of ``math_verify``."""

    require_boxed: bool | str = dataclasses.field(
        default=True, metadata={"help": "grade only a \\boxed{} answer (true/false)"})


def check_math_verify_options(options) -> list[str]:
    problems = math_utils.check_grader_options(options)
    try:
        math_utils.flag_option(options.require_boxed, "require_boxed")
    except ValueError as exc:
        problems.append(str(exc))
    return problems


@hookimpl
def plugrl_register_rewards(register):
    register("math_verify", math_verify_reward, options=MathVerifyOptions, check_options=check_math_verify_options,
             description="1.0/0.0: math_verify parse+verify of the last \\boxed{} against the label")

"""``--rm-type dapo``: the DAPO / Minerva answer check that slime dispatches (per sample, rollout manager).

Returns a dict ``{"score": 1.0 | -1.0, "acc": bool, "pred": str | None}``; select the scalar with
``--reward-key score``. Only the last 300 characters are read, and the answer must be on an
``Answer: ...`` line: a bare ``\\boxed{42}`` scores -1 (reference §13.1). Labels are integers (DAPO-Math);
a non-numeric label raises ``ValueError``.

Options: ``strict_box_verify`` (default false): instead, the last ``\\boxed{}`` in the final 100
characters must equal the label exactly. As in slime, the label is compared as given: an int label
never equals the boxed text, so strict mode needs string labels (a warning says so once per process).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re

from plugrl.core import hookimpl

from . import math_utils

logger = logging.getLogger(__name__)

_ANSWER_LINE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")

# Applied in order, then _REMOVED; both lists are lm-evaluation-harness's Minerva normalisation.
_SUBSTITUTIONS = (
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
)
_REMOVED = (
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue",
    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
    "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
    "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;",
    ",\\!", "{,}", '"', "\\dots", "<|im_end|>", "<|endoftext|>",
)
_UNWRAP = (
    (re.compile(r"(.*?)\$(.*?)\$(.*)"), r"$\2$"),  # keep the first $...$ only
    (re.compile(r"\\text\{(.*?)\}"), r"\1"),
    (re.compile(r"\\textbf\{(.*?)\}"), r"\1"),
    (re.compile(r"\\overline\{(.*?)\}"), r"\1"),
    (re.compile(r"\\boxed\{(.*)\}"), r"\1"),
    (re.compile(r"frac([^{])(.)"), r"frac{\1}{\2}"),  # \frac12 -> \frac{1}{2}
    (re.compile(r"sqrt([^{])"), r"sqrt{\1}"),  # \sqrt2 -> \sqrt{2}
)


def normalize_final_answer(answer: str) -> str:
    """Minerva's normalisation of a final answer (text after the last ``=``, units and markup dropped)."""
    answer = str(answer).split("=")[-1]
    for old, new in _SUBSTITUTIONS:
        answer = answer.replace(old, new)
    for junk in _REMOVED:
        answer = answer.replace(junk, "")
    for pattern, replacement in _UNWRAP:
        answer = pattern.sub(replacement, answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer.strip()


def _integer_label(label) -> str:
    normalized = normalize_final_answer(str(label))
    try:
        return str(int(float(normalized)))
    except (ValueError, OverflowError):
        raise ValueError(f"dapo needs an integer label, got {label!r}") from None


def minerva_check(solution: str, label) -> tuple[bool, str]:
    """(correct, normalised prediction) from the last ``Answer:`` line."""
    found = _ANSWER_LINE.findall(solution)
    pred = normalize_final_answer(found[-1] if found else "[INVALID]")
    return pred == _integer_label(label), pred


def strict_box_check(solution: str, label) -> tuple[bool, str | None]:
    """(correct, boxed text) for the last ``\\boxed{}`` within the final 100 characters."""
    tail = solution[-100:]
    start = tail.rfind("\\boxed{")
    pred = math_utils.unbox(math_utils.balanced_span(tail, start)) if start >= 0 else None
    if not isinstance(label, str):
        _warn_non_string_label(type(label).__name__)
    return pred == label, pred  # the raw label, as slime's strict check: a number never matches


@functools.cache
def _warn_non_string_label(kind: str) -> None:
    logger.warning("dapo strict_box_verify: a label of type %s never equals the boxed text (compared as given, as in "
                   "slime), so every such sample scores -1; store labels as strings", kind)


def dapo_score(response: str, label, *, strict_box_verify: bool = False) -> dict:
    solution = response[-300:]  # MATH-500's longest answer is 159 characters
    check = strict_box_check if strict_box_verify else minerva_check
    correct, pred = check(solution, label)
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred}


def dapo_reward(sample, *, strict_box_verify=False) -> dict:
    strict = math_utils.flag_option(strict_box_verify, "strict_box_verify")
    return dapo_score(sample.response, sample.label, strict_box_verify=strict)


@dataclasses.dataclass
class DapoOptions:
    """``--rm-opt`` options of ``dapo``."""

    strict_box_verify: bool | str = dataclasses.field(
        default=False, metadata={"help": "only the last \\boxed{} counts (slime's strict box check): true/false"})


def check_dapo_options(options) -> list[str]:
    try:
        math_utils.flag_option(options.strict_box_verify, "strict_box_verify")
    except ValueError as exc:
        return [str(exc)]
    return []


@hookimpl
def plugrl_register_rewards(register):
    register("dapo", dapo_reward, options=DapoOptions, check_options=check_dapo_options,
             description='{"score": 1.0|-1.0, "acc", "pred"} from the last "Answer:" line (use --reward-key score)')

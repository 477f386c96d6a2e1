"""Answer extraction and equivalence rules shared by the math rewards (``deepscaler``, ``math``).

Pure functions, run wherever rewards are scored (the rollout manager, ``plugrl score``) and, for the
sympy step, inside a guarded grader process (``plugrl.core.timeouts``). They follow the Hendrycks
MATH / deepscaler grading that slime uses, quirks included, so a (response, label) pair earns the
same reward as under slime. sympy and pylatexenc are imported on first use.
"""

from __future__ import annotations

import dataclasses

import functools
import logging
import re
import threading

# Heavy modules a guarded grader process imports before its first timed job (see core/timeouts.py).
GUARDED_IMPORTS = ("sympy", "sympy.parsing.sympy_parser", "pylatexenc.latex2text")

DEFAULT_TIMEOUT = 10.0

# --------------------------------------------------------------------------------------------------
# \boxed{...} extraction
# --------------------------------------------------------------------------------------------------

_BRACE = re.compile(r"[{}]")


def balanced_span(text: str, start: int) -> str | None:
    """``text[start:end]`` up to the brace that closes the first ``{`` at or after ``start``."""
    depth = 0
    for match in _BRACE.finditer(text, start):
        if match.group() == "{":
            depth += 1
            continue
        depth -= 1
        # Only a closing brace can end the span, so a stray '}' before the first '{' leaves the
        # depth negative for good (the span is then unterminated, as in the reference grader).
        if depth == 0:
            return text[start : match.end()]
    return None


def last_boxed(text: str) -> str | None:
    """The last ``\\boxed...{...}`` span of ``text`` (``\\fbox`` only when there is no ``\\boxed``),
    brace-balanced, or None when its braces never close."""
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    return balanced_span(text, start)


def unbox(span: str | None) -> str | None:
    """The content of a ``\\boxed{...}`` span; None for ``\\fbox{...}`` and malformed spans."""
    if span is None or not span.startswith("\\boxed{") or not span.endswith("}"):
        return None
    return span[len("\\boxed{") : -1]


def boxed_answer(text: str) -> str | None:
    """Content of the last ``\\boxed{}`` in ``text``; None when there is none (``\\fbox`` included)."""
    return unbox(last_boxed(text))


# --------------------------------------------------------------------------------------------------
# Hendrycks (MATH dataset) normalisation: equality after string clean-up
# --------------------------------------------------------------------------------------------------

_WHOLE_TEXT = re.compile(r"^\\text\{(?P<text>.+?)\}$")

# Applied in this order; '\\\\' -> '\\' must come after '\\!' is gone.
_HENDRYCKS_REPLACEMENTS = (
    ("\n", ""),
    ("\\!", ""),
    ("\\\\", "\\"),
    ("tfrac", "frac"),
    ("dfrac", "frac"),
    ("\\left", ""),
    ("\\right", ""),
    ("^{\\circ}", ""),
    ("^\\circ", ""),
    ("\\$", ""),
)


class _GiveUp(Exception):
    """Malformed input on which the Hendrycks clean-up keeps the answer as it was."""


def _drop_units(s: str) -> str:
    # "\text{ " marks a trailing unit in MATH answers; more than one is not an answer it handles.
    if "\\text{ " not in s:
        return s
    parts = s.split("\\text{ ")
    if len(parts) != 2:
        raise _GiveUp
    return parts[0]


def _brace_sqrt(s: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}``."""
    head, *rest = s.split("\\sqrt")
    out = [head]
    for part in rest:
        if not part:
            raise _GiveUp  # "\sqrt" with nothing after it
        out.append("\\sqrt" + part if part[0] == "{" else "\\sqrt{" + part[0] + "}" + part[1:])
    return "".join(out)


def _brace_fracs(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{72}`` -> ``\\frac{1}{72}``."""
    head, *rest = s.split("\\frac")
    out = [head]
    for part in rest:
        if not part:
            raise _GiveUp
        if part[0] == "{":
            out.append("\\frac" + part)
        elif len(part) < 2:
            return s  # "\frac7" at the end: leave the whole string alone
        elif part[1] == "{":
            out.append("\\frac{" + part[0] + "}" + part[1:])
        else:
            out.append("\\frac{" + part[0] + "}{" + part[1] + "}" + part[2:])
    return "".join(out)


def _slash_to_frac(s: str) -> str:
    """``"3/4"`` (two plain integers) -> ``\\frac{3}{4}``."""
    if s.count("/") != 1:
        return s
    num, den = s.split("/")
    try:
        a, b = int(num), int(den)
    except ValueError:
        return s
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def _hendrycks_clean(s: str) -> str:
    for old, new in _HENDRYCKS_REPLACEMENTS:
        s = s.replace(old, new)
    s = _drop_units(s)
    s = s.replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "x = 5", "k=3" -> the value
        s = sides[1]
    s = _brace_sqrt(s)
    s = s.replace(" ", "")
    s = _brace_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _slash_to_frac(s)


def hendrycks_normalize(answer: str | None) -> str | None:
    """The MATH dataset's answer normalisation (``mathd`` style)."""
    if answer is None:
        return None
    answer = answer.strip()
    match = _WHOLE_TEXT.search(answer)
    if match is not None:
        answer = match.group("text").strip()
    try:
        return _hendrycks_clean(answer)
    except _GiveUp:
        return answer


def mathd_equal(given: str | None, truth: str | None) -> bool:
    """Equal after Hendrycks normalisation (the cheap check, tried first)."""
    return hendrycks_normalize(truth) == hendrycks_normalize(given)


# --------------------------------------------------------------------------------------------------
# sympy-side normalisation and comparison
# --------------------------------------------------------------------------------------------------

_UNIT_WORDS = ("degree", "cm", "centimeter", "meter", "mile", "second", "minute", "hour", "day", "week",
               "month", "year", "foot", "feet", "inch", "yard")
# One pattern per word, applied in sequence: removing one word can expose another ("mimeterle").
_UNIT_PATTERNS = tuple(re.compile(word + r"(es)?(s)? *(\^[0-9]+)?") for word in _UNIT_WORDS)
_DEGREE_MARK = re.compile(r"\^ *\\circ")
_LATEX_THIN_SPACE_COMMA = re.compile(r",\\! *")
_MINUS_SPACES = re.compile(r"- *")
_MIXED_NUMBER = re.compile(r"([0-9]) +([0-9])")  # "7 3/4" -> "7+3/4"
_THOUSANDS_COMMA = re.compile(r"(\d)(,)(\d\d\d)($|\D)")
_FRACTION = re.compile(r"^-?[0-9]+.?/0*[1-9][0-9]*.?$")
# Integers sympy parses exactly (no leading zeros, no "-0", far below int-parsing limits).
_CANONICAL_INT = re.compile(r"(0|-?[1-9][0-9]{0,17})\Z")
_TEXT_SYMBOLS = (("√", "sqrt"), ("π", "pi"), ("∞", "inf"), ("∪", "U"), ("·", "*"), ("×", "*"))
_BRACKETS = "()[]"
# Expressions sympy may take forever on: many unknowns or large/nested exponents.
_RISKY_SUBSTRINGS = ("^{", "^(")
_RISKY_EXPONENT = re.compile(r"\^[0-9]+\^|\^[0-9][0-9]+")

_latex_to_text = threading.local()


class _DropMacroArgumentWarning(logging.Filter):
    # pylatexenc warns on every "\frac" without arguments; model output is full of them and the
    # text it falls back to is what the grader wants anyway.
    def filter(self, record: logging.LogRecord) -> bool:
        return "failed its substitution" not in record.getMessage()


def _latex_text(expr: str) -> str:
    """LaTeX -> plain text sympy can parse, via pylatexenc."""
    converter = getattr(_latex_to_text, "converter", None)
    if converter is None:
        from pylatexenc.latex2text import LatexNodes2Text

        latex_logger = logging.getLogger("pylatexenc.latex2text")
        if not any(isinstance(f, _DropMacroArgumentWarning) for f in latex_logger.filters):
            latex_logger.addFilter(_DropMacroArgumentWarning())
        converter = _latex_to_text.converter = LatexNodes2Text()
    expr = expr.replace("\\tfrac", "\\frac").replace("\\dfrac", "\\frac")
    expr = expr.replace("\\frac", " \\frac")  # keeps "7\frac34" a mixed number
    text = converter.latex_to_text(expr)
    for symbol, word in _TEXT_SYMBOLS:
        text = text.replace(symbol, word)
    return text.strip()


def _float_or_none(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def _near_int(x: float) -> bool:
    try:
        return abs(x - int(round(x))) <= 1e-7
    except (OverflowError, ValueError):  # inf, nan
        return False


def _drop_thousands_commas(expr: str) -> str:
    while True:
        shorter = _THOUSANDS_COMMA.sub(r"\1\3\4", expr)
        if shorter == expr:
            return expr
        expr = shorter


def _is_int_string(s: str) -> bool:
    value = _float_or_none(_drop_thousands_commas(s))
    return value is not None and _near_int(value)


def _is_fraction_string(s: str) -> bool:
    return _FRACTION.search(s) is not None


def sympy_normalize(expr: str | None) -> str | None:
    """Normalisation before the sympy comparison: units, words, LaTeX -> text, canonical integers."""
    if expr is None:
        return None
    match = _WHOLE_TEXT.search(expr)
    if match is not None:
        expr = match.group("text")
    expr = expr.replace("\\%", "%").replace("\\$", "$").replace("$", "").replace("%", "")
    expr = expr.replace(" or ", " , ").replace(" and ", " , ")
    expr = expr.replace("million", "*10^6").replace("billion", "*10^9").replace("trillion", "*10^12")
    for pattern in _UNIT_PATTERNS:
        expr = pattern.sub("", expr)
    expr = _DEGREE_MARK.sub("", expr)
    if expr[:1] == "{" and expr[-1:] == "}":
        expr = expr[1:-1]
    expr = _LATEX_THIN_SPACE_COMMA.sub("", expr)
    value = _float_or_none(expr)
    if value is not None and _near_int(value):
        expr = str(int(round(value)))
    if "\\" in expr:
        try:
            expr = _latex_text(expr)
        except Exception:  # pylatexenc rejects some malformed LaTeX: keep the raw string
            pass
    expr = _MINUS_SPACES.sub("-", expr)
    expr = _MIXED_NUMBER.sub(r"\1+\2", expr)
    expr = expr.replace(" ", "").replace("{", "").replace("}", "")
    expr = expr.lower()
    if _is_int_string(expr):
        expr = str(int(float(expr.replace(",", ""))))
    return expr


def _split_elements(expr: str) -> list[str]:
    """Elements of a tuple/interval like ``(1,2]``; a single element otherwise."""
    expr = _drop_thousands_commas(expr)
    if not expr:
        return []
    inner = expr[1:-1]
    if len(expr) > 2 and expr[0] in _BRACKETS and expr[-1] in _BRACKETS and not any(c in inner for c in _BRACKETS):
        return [element.strip() for element in inner.split(",")]
    return [expr]


def safe_for_sympy(expr: str) -> bool:
    """False for inputs sympy is not trusted with (more than two unknown letters, big exponents)."""
    letters = {c for c in expr.replace("sqrt", "").replace("frac", "") if c.isalpha()}
    if len(letters) > 2:
        return False
    if any(bad in expr for bad in _RISKY_SUBSTRINGS):
        return False
    return _RISKY_EXPONENT.search(expr) is None


def sympy_equal(truth: str, given: str) -> bool:
    """``simplify(truth - given) == 0`` on normalised strings; any sympy error counts as unequal.

    Can be slow or hang on hostile input: callers run it through ``guarded_sympy_equal``.
    """
    difference = f"({truth})-({given})"
    if not safe_for_sympy(difference):
        return False
    try:
        import sympy
        from sympy.parsing import sympy_parser

        transformations = sympy_parser.standard_transformations + (sympy_parser.implicit_multiplication_application,)
        parsed = sympy_parser.parse_expr(difference.replace("^", "**"), transformations=transformations)
        known = _known_without_simplify(parsed, sympy)
        if known is not None:
            return known
        return bool(sympy.simplify(parsed) == 0)
    except Exception:
        return False


def _known_without_simplify(parsed, sympy) -> bool | None:
    """The answer ``simplify(parsed) == 0`` must give, where it is certain without simplifying
    (simplify costs ~10 ms and never changes a value): a plain number is its own simplification,
    and a constant that evaluates clearly away from zero cannot simplify to 0. None otherwise."""
    if not isinstance(parsed, sympy.Basic):
        return None
    if parsed.is_Number:
        return bool(parsed == 0)
    if parsed.free_symbols:
        return None
    try:
        # strict: raise rather than return a value whose digits are all lost to cancellation
        value = parsed.evalf(50, strict=True)
    except Exception:
        return None
    if value.is_Float and abs(value) > 1e-20:
        return False
    return None


_cached_sympy_equal = functools.lru_cache(maxsize=1 << 16)(sympy_equal)


class _GraderTimedOut(Exception):
    pass


_TIMED_OUT = object()


@functools.lru_cache(maxsize=1 << 16)
def _guarded_sympy_equal_cached(truth: str, given: str, timeout: float) -> bool:
    from plugrl.core.timeouts import guarded_call

    result = guarded_call(sympy_equal, truth, given, timeout=timeout, default=_TIMED_OUT)
    if result is _TIMED_OUT:
        raise _GraderTimedOut  # not cached: lru_cache keeps only returned values
    return result


def guarded_sympy_equal(truth: str, given: str, *, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """``sympy_equal`` in a grader process, killed after ``timeout`` s (then False, and counted
    in ``plugrl.core.timeouts.grader_stats()``); ``timeout <= 0`` runs it in this process. Results
    are memoised: a group's samples often repeat the same wrong answer."""
    if timeout is None or timeout <= 0:
        return _cached_sympy_equal(truth, given)
    try:
        return _guarded_sympy_equal_cached(truth, given, float(timeout))
    except _GraderTimedOut:
        return False


def sympy_grade(given: str | None, truth: str | None, *, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """deepscaler's sympy-based check: tuples/intervals element-wise with matching brackets,
    unreduced fractions compared as strings, an integer never equal to a non-integer."""
    truth_n, given_n = sympy_normalize(truth), sympy_normalize(given)
    if truth_n is None or given_n is None:
        return False
    if truth_n == given_n:
        return True
    if not given_n:
        return False
    truth_elements, given_elements = _split_elements(truth_n), _split_elements(given_n)
    if len(truth_elements) > 1 and (truth_n[0] != given_n[0] or truth_n[-1] != given_n[-1]):
        return False  # "[1,2)" is not "(1,2)"
    if len(truth_elements) != len(given_elements):
        return False
    for t, g in zip(truth_elements, given_elements):
        if _is_fraction_string(t) and _is_fraction_string(g):
            equal = t == g  # an unreduced "2/4" must not match "1/2"
        elif _is_int_string(t) != _is_int_string(g):
            equal = False
        elif _CANONICAL_INT.match(t) and _CANONICAL_INT.match(g):
            equal = t == g  # what sympy would answer, without a process round trip
        else:
            equal = guarded_sympy_equal(t, g, timeout=timeout)
        if not equal:
            return False
    return True


def grade(given: str | None, truth: str | None, *, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """deepscaler's equivalence: Hendrycks-normalised equality, else the sympy check."""
    return mathd_equal(given, truth) or sympy_grade(given, truth, timeout=timeout)


@dataclasses.dataclass
class GraderOptions:
    """``--rm-opt`` options of the math graders (deepscaler, math)."""

    timeout: float | str | None = dataclasses.field(
        default=DEFAULT_TIMEOUT, metadata={"help": "seconds one grading may take; 0 or none disables the guard"})


def check_grader_options(options) -> list[str]:
    """The ``check_options`` of the math graders: a timeout they can read, >= 0."""
    try:
        seconds = timeout_option(options.timeout)
    except ValueError:
        return [f"option 'timeout' must be seconds or none, got {options.timeout!r}"]
    return [] if seconds >= 0 else [f"option 'timeout' must be >= 0, got {options.timeout!r}"]


def timeout_option(value) -> float:
    """The ``timeout`` reward option (``--rm-opt timeout=5``): seconds; 0 or "none" disables the guard."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return 0.0
    return float(value)


def flag_option(value, name: str) -> bool:
    """A boolean reward option: ``--rm-opt name=true`` arrives as True or as the string "true"."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"reward option {name} must be true or false, got {value!r}")
    return bool(value)

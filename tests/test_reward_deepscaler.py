"""deepscaler reward: slime's rules (reference §3.2), checked against hand-worked expectations."""

import pytest

from plugrl.core import Sample
from plugrl.core.plugins import make_plugin_manager
from plugrl.plugins.rewards.deepscaler import deepscaler_score


@pytest.fixture(scope="module")
def deepscaler():
    return make_plugin_manager(entry_points=False).get("reward", "deepscaler")


def score(response, label, **options):
    options.setdefault("timeout", 0)  # in-process sympy; the guarded path has its own tests
    return deepscaler_score(response, label, **options)


def think(answer):
    return f"<think>scratch work \\boxed{{999}}</think> The answer is \\boxed{{{answer}}}."


# ---- where the answer is read from ---------------------------------------------------------------


def test_answer_after_think_marker_counts(deepscaler):
    assert deepscaler(Sample(response=think("5"), label="5"), timeout=0) == 1


def test_no_marker_scores_zero_even_with_a_correct_boxed_answer():
    assert score("The answer is \\boxed{5}.", "5") == 0


def test_response_marker_is_accepted():
    assert score("###Response\nSo \\boxed{5}", "5") == 1


def test_only_the_first_response_section_is_read():
    response = "###Response \\boxed{5} ###Response \\boxed{6}"
    assert score(response, "5") == 1
    assert score(response, "6") == 0


def test_last_think_marker_wins():
    response = "<think>a</think> \\boxed{5} </think> final: \\boxed{6}"
    assert score(response, "6") == 1
    assert score(response, "5") == 0


def test_boxed_answer_only_inside_the_thinking_scores_zero():
    assert score("<think>\\boxed{5}</think> I am not sure.", "5") == 0


def test_last_boxed_in_the_solution_is_graded():
    assert score("</think> first \\boxed{4}, then \\boxed{5}", "5") == 1
    assert score("</think> first \\boxed{4}, then \\boxed{5}", "4") == 0


def test_fbox_answer_scores_zero():
    assert score("</think> \\fbox{5}", "5") == 0


def test_nested_braces_in_boxed():
    assert score(think("\\frac{\\sqrt{2}}{2}"), "\\frac{\\sqrt{2}}{2}") == 1
    assert score(think("\\frac{\\sqrt{2}}{2}"), "\\frac{\\sqrt{3}}{2}") == 0


def test_unclosed_boxed_scores_zero():
    assert score("</think> \\boxed{\\frac{1}{2}", "\\frac{1}{2}") == 0


# ---- labels ---------------------------------------------------------------------------------------


def test_empty_label_scores_zero():
    assert score("</think> \\boxed{}", "") == 0


def test_int_and_float_labels():
    assert score(think("5"), 5) == 1
    assert score(think("6"), 5) == 0
    assert score(think("\\frac{1}{2}"), 0.5) == 1
    assert score(think("2"), 2.0) == 1


def test_boxed_label_is_unwrapped():
    assert score(think("7"), "\\boxed{7}") == 1
    assert score(think("7"), "The answer is \\boxed{8}") == 0


def test_label_of_another_type_is_an_error():
    with pytest.raises(TypeError, match="label"):
        score(think("1"), [1])


# ---- equivalence ---------------------------------------------------------------------------------


@pytest.mark.parametrize("given", ["1/2", "0.5", "\\dfrac{1}{2}", "\\frac12", "\\tfrac{1}{2}", "\\frac{1}{2}"])
@pytest.mark.parametrize("label", ["\\frac{1}{2}", "0.5", "1/2"])
def test_forms_of_one_half(given, label):
    assert score(think(given), label) == 1


def test_unreduced_fraction_is_wrong():
    assert score(think("2/4"), "1/2") == 0
    assert score(think("\\frac{2}{4}"), "\\frac{1}{2}") == 0


def test_text_and_units():
    assert score(think("5 \\text{ cm}"), "5") == 1
    assert score(think("\\text{5}"), "5") == 1
    assert score(think("5 \\text{ cm}"), "6") == 0


def test_degrees():
    assert score(think("30^\\circ"), "30") == 1
    assert score(think("30^{\\circ}"), "30") == 1
    assert score(think("60^\\circ"), "30") == 0


def test_tuples_and_intervals():
    assert score(think("(1,2)"), "(1, 2)") == 1
    assert score(think("(2,1)"), "(1, 2)") == 0
    assert score(think("[1,2)"), "(1,2)") == 0
    assert score(think("[1, 2)"), "[1,2)") == 1
    assert score(think("(1,2,3)"), "(1,2)") == 0
    assert score(think("(0.5, 3)"), "(\\frac{1}{2}, 3)") == 1


def test_sympy_equivalence():
    assert score(think("\\sqrt{2}/2"), "\\frac{\\sqrt{2}}{2}") == 1
    assert score(think("\\frac{1}{\\sqrt{2}}"), "\\frac{\\sqrt{2}}{2}") == 1
    assert score(think("2.5"), "5/2") == 1
    assert score(think("b+a"), "a+b") == 1
    assert score(think("x^2+1"), "1+x^2") == 1


def test_integer_label_never_matches_a_non_integer_expression():
    assert score(think("\\sqrt{4}"), "2") == 0
    assert score(think("4/2"), "2") == 0


def test_sympy_skipped_for_many_unknowns_and_parenthesised_exponents():
    assert score(think("c+b+a"), "a+b+c") == 0  # three letters: sympy is not consulted
    assert score(think("x^(2)"), "x*x") == 0
    assert score(think("x^2"), "x*x") == 1


def test_wrong_answers():
    assert score(think("6"), "5") == 0
    assert score(think("\\frac{1}{3}"), "0.5") == 0
    assert score(think("\\sqrt{3}/2"), "\\frac{\\sqrt{2}}{2}") == 0
    assert score(think("x^2-1"), "x^2+1") == 0


def test_thousands_separator_and_trailing_zeroes():
    assert score(think("1,000"), "1000") == 1
    assert score(think("42.0"), "42") == 1


def test_returns_plain_ints(deepscaler):
    for response, label in [(think("5"), "5"), (think("6"), "5"), ("no marker", "5")]:
        value = deepscaler(Sample(response=response, label=label), timeout=0)
        assert type(value) is int


def test_guarded_path_gives_the_same_answers(deepscaler):
    cases = [(think("\\sqrt{5}/5"), "\\frac{1}{\\sqrt{5}}", 1), (think("\\sqrt{5}/4"), "\\frac{1}{\\sqrt{5}}", 0)]
    for response, label, expected in cases:
        assert deepscaler(Sample(response=response, label=label)) == expected  # default: guarded, 10 s
        assert deepscaler(Sample(response=response, label=label), timeout="3") == expected

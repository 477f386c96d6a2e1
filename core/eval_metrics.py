"""Eval summaries: mean reward, unbiased pass@k, response length and truncation per eval dataset.

Runs where eval results are gathered — the rollout manager after ``eval_rollout`` (reference §2.10),
or the driver if it receives raw per-sample rewards — and produces the ``eval/{dataset}/...`` metrics
the driver logs.

Correctness: a sample counts as correct when ``reward > correct_above`` (default 0). That one rule
fits the built-in graders: ``deepscaler`` and ``math`` give 1 (right) / 0 (wrong), and ``dapo`` gives
1 / −1, where a ``>= 0.5`` threshold would also work for the first two but a ``>= 0`` one would count
every deepscaler answer as correct. Rewards of a graded continuous scale need their own
``correct_above``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate from ``n`` samples of which ``c`` are correct: ``1 − C(n−c, k)/C(n, k)``.

    The probability that a uniformly drawn size-``k`` subset of the ``n`` samples holds at least one
    correct sample (Chen et al., 2021). Exact integer binomials, so no overflow for large ``n``.
    """
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0  # every size-k subset contains a correct sample
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def group_per_prompt(values: Sequence, n_samples_per_prompt: int) -> list[list]:
    """Regroup a flat eval result (each prompt's ``n`` copies consecutive, as eval produces them)."""
    if n_samples_per_prompt < 1 or len(values) % n_samples_per_prompt:
        raise ValueError(
            f"{len(values)} eval samples are not a whole number of groups of "
            f"--n-samples-per-eval-prompt {n_samples_per_prompt}"
        )
    return [list(values[i : i + n_samples_per_prompt]) for i in range(0, len(values), n_samples_per_prompt)]


def summarize_eval(
    rewards_per_prompt: Sequence[Sequence[float]],
    truncated_per_prompt: Sequence[Sequence[bool]],
    response_lengths_per_prompt: Sequence[Sequence[int]],
    *,
    correct_above: float = 0.0,
) -> dict[str, float]:
    """Summarise one eval dataset; each argument holds one list per prompt (its samples).

    Returns ``mean_reward`` (over all samples), ``pass@1`` (mean over prompts of c/n), ``pass@k``
    for k = 2, 4, 8, ... up to the smallest per-prompt sample count (prompt-mean of the unbiased
    estimator), ``response_len`` (mean tokens), ``truncated_ratio``, ``num_prompts`` and
    ``num_samples``. A sample is correct when ``reward > correct_above``.
    """
    if not (len(rewards_per_prompt) == len(truncated_per_prompt) == len(response_lengths_per_prompt)):
        raise ValueError(
            f"per-prompt lists differ in length: {len(rewards_per_prompt)} rewards, "
            f"{len(truncated_per_prompt)} truncated, {len(response_lengths_per_prompt)} response lengths"
        )
    if not rewards_per_prompt:
        raise ValueError("no eval prompts to summarise")
    for index, (rewards, truncated, lengths) in enumerate(
        zip(rewards_per_prompt, truncated_per_prompt, response_lengths_per_prompt)
    ):
        if not rewards:
            raise ValueError(f"eval prompt {index} has no samples")
        if not len(rewards) == len(truncated) == len(lengths):
            raise ValueError(
                f"eval prompt {index}: {len(rewards)} rewards, {len(truncated)} truncated flags, "
                f"{len(lengths)} response lengths"
            )

    all_rewards = [float(r) for rewards in rewards_per_prompt for r in rewards]
    all_truncated = [bool(t) for flags in truncated_per_prompt for t in flags]
    all_lengths = [int(x) for lengths in response_lengths_per_prompt for x in lengths]
    counts = [(len(rewards), sum(1 for r in rewards if r > correct_above)) for rewards in rewards_per_prompt]
    num_prompts = len(counts)

    summary: dict[str, float] = {
        "mean_reward": sum(all_rewards) / len(all_rewards),
        "pass@1": sum(c / n for n, c in counts) / num_prompts,
    }
    min_n = min(n for n, _ in counts)
    k = 2
    while k <= min_n:
        summary[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c in counts) / num_prompts
        k *= 2
    summary["response_len"] = sum(all_lengths) / len(all_lengths)
    summary["truncated_ratio"] = sum(all_truncated) / len(all_truncated)
    summary["num_prompts"] = num_prompts
    summary["num_samples"] = len(all_rewards)
    return summary


def eval_metrics(
    name: str,
    rewards_per_prompt: Sequence[Sequence[float]],
    truncated_per_prompt: Sequence[Sequence[bool]],
    response_lengths_per_prompt: Sequence[Sequence[int]],
    *,
    correct_above: float = 0.0,
) -> dict[str, float]:
    """:func:`summarize_eval` keyed for logging: ``eval/{name}/pass@1``, ``eval/{name}/mean_reward``, ..."""
    summary = summarize_eval(
        rewards_per_prompt, truncated_per_prompt, response_lengths_per_prompt, correct_above=correct_above
    )
    return {f"eval/{name}/{key}": value for key, value in summary.items()}

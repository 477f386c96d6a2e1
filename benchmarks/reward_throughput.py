"""deepscaler grading throughput: (response, label) pairs per second, in-process vs guarded.

Run: ``python benchmarks/reward_throughput.py [--pairs 600] [--threads 4]``; prints one table.
"in-process" runs sympy in the calling process (``timeout=0``, unsafe on hostile input); "guarded"
sends each sympy comparison to a grader process under a timeout (the default), from one calling
thread or several (as ``plugrl score`` and the rollout manager do). The pairs are all different and
memoised sympy results are cleared before each pass, so every pass pays for its sympy calls; the
last row repeats a pass with them kept (a rollout group often repeats an answer). slime's grader
was measured at ~2,200 pairs/s/core.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import time


def _answer_forms(rng: random.Random) -> tuple[str, list[str], list[str]]:
    """(label, equivalent forms a model might box, wrong answers) of one MATH-style answer."""
    a, b = rng.randint(1, 97), rng.randint(2, 99)
    kind = rng.randrange(7)
    if kind == 0:
        return str(a * b), [f"{a * b}.0", f"\\text{{{a * b}}}"], [str(a * b + 1), str(a + b)]
    if kind == 1:
        return f"\\frac{{{a}}}{{{b}}}", [f"\\dfrac{{{a}}}{{{b}}}", f"{a}/{b}"], [f"\\frac{{{a + 1}}}{{{b}}}", f"{a}/{b + 1}"]
    if kind == 2:
        return (f"\\frac{{\\sqrt{{{b}}}}}{{{a}}}", [f"\\sqrt{{{b}}}/{a}", f"\\frac{{1}}{{{a}}}\\sqrt{{{b}}}"],
                [f"\\sqrt{{{b + 1}}}/{a}", f"\\frac{{\\sqrt{{{b}}}}}{{{a + 1}}}"])
    if kind == 3:
        return f"({a}, {b})", [f"({a},{b})", f"\\left({a}, {b}\\right)"], [f"({b}, {a + b})", f"[{a}, {b})"]
    if kind == 4:
        return f"x^2+{a}", [f"{a}+x^2", f"x^2 + {a}"], [f"x^2-{a}", f"x+{a}"]
    if kind == 5:
        return f"{a}^\\circ", [str(a), f"{a}^{{\\circ}}"], [str(a + 10), str(180 - a)]
    return f"{a}\\pi", [f"{a} \\pi", f"\\pi {a}"], [f"{a + 1}\\pi", f"\\frac{{\\pi}}{{{a}}}"]


def make_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """40% boxed exactly as labelled, 25% an equivalent form, 35% wrong."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        label, same, wrong = _answer_forms(rng)
        roll = rng.random()
        answer = label if roll < 0.4 else rng.choice(same) if roll < 0.65 else rng.choice(wrong)
        thinking = "Let me work this out step by step. " * rng.randint(5, 40)
        response = f"<think>{thinking}</think>\nSo the answer is $\\boxed{{{answer}}}$."
        pairs.append((response, label))
    return pairs


def rate(pairs, timeout: float, *, threads: int = 1, clear_cache: bool = True) -> tuple[float, float]:
    from plugrl.plugins.rewards import math_utils
    from plugrl.plugins.rewards.deepscaler import deepscaler_score

    if clear_cache:
        math_utils._cached_sympy_equal.cache_clear()
        math_utils._guarded_sympy_equal_cached.cache_clear()
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        rewards = list(pool.map(lambda pair: deepscaler_score(*pair, timeout=timeout), pairs))
    elapsed = time.perf_counter() - start
    return len(pairs) / elapsed, sum(rewards) / len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=600)
    parser.add_argument("--threads", type=int, default=4, help="calling threads of the concurrent row")
    args = parser.parse_args()
    pairs = make_pairs(args.pairs)

    from plugrl.core.timeouts import default_pool, grader_stats

    # Warm up on other pairs: sympy imports parts of itself on first use, in each process.
    warmup = make_pairs(200, seed=1)
    rate(warmup, 0)
    rate(warmup, 10, threads=default_pool().size)

    workers = default_pool().size
    rows = [
        ("in-process (timeout=0)", 1, *rate(pairs, 0)),
        ("guarded (timeout=10 s)", 1, *rate(pairs, 10)),
        (f"guarded, {workers} workers", args.threads, *rate(pairs, 10, threads=args.threads)),
        ("guarded, memoised sympy", 1, *rate(pairs, 10, clear_cache=False)),
    ]
    print(f"deepscaler on {len(pairs)} different (response, label) pairs, {os.cpu_count()} CPUs")
    print(f"{'path':<28}{'threads':>8}{'pairs/s':>10}{'mean reward':>14}")
    for name, threads, per_second, mean in rows:
        print(f"{name:<28}{threads:>8}{per_second:>10.0f}{mean:>14.3f}")
    print(f"guarded grades: {grader_stats()}")


if __name__ == "__main__":
    main()

"""Guarded graders: a hung grade is cut off at its timeout, scores 0 and is counted, from the main
thread, from another thread and inside a real Ray worker; the killed worker is replaced."""

import os
import threading
import time

import pytest

from plugrl.core import timeouts
from plugrl.core.timeouts import GuardedPool
from plugrl.plugins.rewards import math_utils
from plugrl.plugins.rewards.deepscaler import deepscaler_score

# sympy evaluates 9**(9**(9**9)) exactly: it never finishes. "**" slips past the grader's
# big-exponent check (which looks for "^"), so only the timeout stops it.
HOSTILE = "</think> \\boxed{9**9**9**9}"


@pytest.fixture
def pool():
    pool = GuardedPool(1)
    yield pool
    pool.close()


def test_hung_call_returns_default_and_is_counted(pool):
    start = time.monotonic()
    assert pool.call(time.sleep, 60, timeout=0.5, default="cut") == "cut"
    assert time.monotonic() - start < 10
    assert pool.stats()["timeouts"] == 1
    assert pool.stats()["calls"] == 1


def test_worker_is_replaced_after_a_timeout(pool):
    first_pid = pool.call(os.getpid, timeout=30)
    assert pool.call(time.sleep, 60, timeout=0.3, default=None) is None
    second_pid = pool.call(os.getpid, timeout=30)
    assert second_pid != first_pid
    assert pool.call(pow, 2, 10, timeout=30) == 1024
    assert pool.stats()["workers"] == 1


def test_errors_in_the_grader_are_raised_not_swallowed(pool):
    with pytest.raises(ValueError, match="invalid literal"):
        pool.call(int, "x", timeout=30)
    assert pool.call(int, "7", timeout=30) == 7


def test_timeout_from_a_non_main_thread(pool):
    results = {}

    def work():
        start = time.monotonic()
        results["cut"] = pool.call(time.sleep, 60, timeout=0.5, default="cut")
        results["elapsed"] = time.monotonic() - start
        results["after"] = pool.call(abs, -3, timeout=30)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(60)
    assert results["cut"] == "cut"
    assert results["elapsed"] < 10
    assert results["after"] == 3
    assert pool.stats()["timeouts"] == 1


def test_concurrent_callers_share_the_pool():
    pool = GuardedPool(2)
    try:
        out = {}
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, pool.call(pow, i, 2, timeout=30)))
                   for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert out == {i: i * i for i in range(6)}
        assert pool.stats()["workers"] <= 2
    finally:
        pool.close()


def test_hostile_answer_scores_zero_and_counts_in_a_reward_thread():
    before = timeouts.timeout_count()
    results = {}

    def grade():
        start = time.monotonic()
        results["hostile"] = deepscaler_score(HOSTILE, "\\frac{1}{3}", timeout=1)
        results["elapsed"] = time.monotonic() - start
        # A different pair, so it is not answered from the memo: the replacement worker grades it.
        results["normal"] = deepscaler_score("</think> \\boxed{\\sqrt{7}/7}", "\\frac{1}{\\sqrt{7}}", timeout=30)

    thread = threading.Thread(target=grade)
    thread.start()
    thread.join(120)
    assert results["hostile"] == 0
    assert results["elapsed"] < 15
    assert results["normal"] == 1
    assert timeouts.timeout_count() == before + 1


def test_timed_out_grades_are_not_memoised():
    before = timeouts.timeout_count()
    assert not math_utils.guarded_sympy_equal("1/7", "9**9**9**8", timeout=0.5)
    assert not math_utils.guarded_sympy_equal("1/7", "9**9**9**8", timeout=0.5)
    assert timeouts.timeout_count() == before + 2


def test_timeout_inside_a_ray_worker():
    ray = pytest.importorskip("ray")

    def grade_in_worker():
        import time as _time

        from plugrl.core import timeouts as _timeouts
        from plugrl.plugins.rewards.deepscaler import deepscaler_score as _score

        start = _time.monotonic()
        hostile = _score("</think> \\boxed{9**9**9**9}", "\\frac{1}{9}", timeout=1)
        elapsed = _time.monotonic() - start
        normal = _score("</think> \\boxed{\\sqrt{11}/11}", "\\frac{1}{\\sqrt{11}}", timeout=30)
        return hostile, elapsed, normal, _timeouts.grader_stats()

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        hostile, elapsed, normal, stats = ray.get(ray.remote(grade_in_worker).remote(), timeout=180)
    finally:
        ray.shutdown()
    assert hostile == 0
    assert elapsed < 60  # a hang check, not a speed test: unguarded, this power tower never finishes
    assert normal == 1
    assert stats["timeouts"] == 1
    assert stats["calls"] == 2

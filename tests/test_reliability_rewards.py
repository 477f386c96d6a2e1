"""Rewards that hang, raise, or hang only sometimes: every call is bounded, a hung call never takes a
slot from later calls, healthy calls still score exactly, failures are counted per rollout and past
--reward-error-threshold the run stops naming the reward and its first failure."""

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from plugrl.core.metrics import console_line
from plugrl.core.reward_call import (
    DEFAULT_REWARD_TIMEOUT,
    Reward,
    RewardError,
    RewardTimeout,
    resolve_reward,
    rollout_reward_metrics,
)
from plugrl.core.types import Sample


def samples(n):
    return [Sample(prompt="p", response=str(i), label=str(i), index=i) for i in range(n)]


@pytest.fixture
def release():
    """An event the hanging graders wait on; set at teardown so no thread outlives the test."""
    event = threading.Event()
    yield event
    event.set()


def test_a_reward_that_hangs_on_its_first_two_calls_does_not_starve_the_rest(release):
    """The issue's case: two hung calls on a 2-wide pool used to score every later sample 0."""
    calls = []
    lock = threading.Lock()

    def grader(sample):
        with lock:
            calls.append(sample.index)
            first_two = len(calls) <= 2
        if first_two:
            release.wait(3600)
        return 10.0 + sample.index

    reward = Reward(grader, {}, timeout=0.5, concurrency=2)
    batch = samples(10)
    started = time.monotonic()
    values = asyncio.run(reward.score(batch))
    elapsed = time.monotonic() - started
    hung = [i for i, v in enumerate(values) if v == 0.0]
    assert len(hung) == 2
    assert all(values[i] == 10.0 + i for i in range(10) if i not in hung)
    assert (reward.total.failed, reward.total.timeouts, reward.total.samples) == (2, 2, 10)
    assert reward.stuck_threads() == 2  # still blocked: they cannot be killed, but hold no slot
    assert elapsed < 5, f"healthy calls waited behind the hung ones ({elapsed:.1f} s)"
    # A later batch on the same reward runs at full width again.
    assert asyncio.run(reward.score(samples(4))) == [10.0, 11.0, 12.0, 13.0]
    release.set()
    deadline = time.monotonic() + 5
    while reward.stuck_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reward.stuck_threads() == 0


def test_a_reward_that_hangs_only_sometimes(release):
    def grader(sample):
        if sample.index % 3 == 0:
            release.wait(3600)
        return sample.index * 2.0

    reward = Reward(grader, {}, timeout=0.3, concurrency=2)
    values = asyncio.run(reward.score(samples(9)))
    assert values == [0.0 if i % 3 == 0 else i * 2.0 for i in range(9)]
    assert (reward.total.failed, reward.total.timeouts) == (3, 3)


def test_a_reward_that_raises_on_every_call_is_counted_and_named():
    def grader(sample):
        raise ZeroDivisionError("division by zero in the grader")

    reward = Reward(grader, {}, name="--custom-rm-path mod.grader")
    assert asyncio.run(reward.score(samples(4))) == [0.0] * 4
    assert (reward.total.failed, reward.total.timeouts) == (4, 0)
    assert reward.total.first_failure.startswith("reward --custom-rm-path mod.grader failed on sample ")
    assert "ZeroDivisionError: division by zero in the grader" in reward.total.first_failure
    with pytest.raises(RewardError, match="ZeroDivisionError: division by zero in the grader"):
        asyncio.run(reward.score(samples(2), on_error="raise"))


def test_a_reward_that_raises_sometimes_keeps_the_others():
    def grader(sample):
        if sample.index == 1:
            raise ValueError("bad answer format")
        return 1.0

    reward = Reward(grader, {})
    assert asyncio.run(reward.score(samples(3))) == [1.0, 0.0, 1.0]
    assert reward.total.failed == 1


def test_async_rewards_are_bounded_and_their_own_timeout_errors_are_errors():
    async def hangs(sample):
        await asyncio.sleep(3600)

    async def client_timeout(sample):
        raise TimeoutError("upstream HTTP timeout")

    reward = Reward(hangs, {}, timeout=0.3)
    started = time.monotonic()
    assert asyncio.run(reward.score(samples(3))) == [0.0] * 3
    assert time.monotonic() - started < 5
    assert reward.total.timeouts == 3
    other = Reward(client_timeout, {}, timeout=5)
    asyncio.run(other.score(samples(2)))
    assert (other.total.failed, other.total.timeouts) == (2, 0)
    assert "TimeoutError: upstream HTTP timeout" in other.total.first_failure


def test_the_timeout_message_names_the_timeout(release):
    reward = Reward(lambda s: release.wait(3600), {}, timeout=0.25)
    (value,) = asyncio.run(reward.outcomes(samples(1)))
    assert isinstance(value, RewardTimeout)
    assert str(value) == "timed out after 0.25 s (--reward-timeout 0.25)"
    with pytest.raises(RewardError, match=r"failed on sample 0: timed out after 0.25 s \(--reward-timeout 0.25\)"):
        asyncio.run(reward.score(samples(1), on_error="raise"))


def test_a_failing_batched_reward_fails_every_sample_of_its_batch():
    def batched(batch):
        raise RuntimeError("batch grader down")

    reward = Reward(batched, {}, batched=True)
    assert asyncio.run(reward.score(samples(5))) == [0.0] * 5
    assert reward.total.failed == 5


def test_default_timeout_and_the_flag_reach_the_reward():
    args = SimpleNamespace(custom_rm_path="plugrl.plugins.rewards.deepscaler:deepscaler_reward", rm_type=None,
                           reward_timeout=None)
    assert DEFAULT_REWARD_TIMEOUT == 60.0
    assert resolve_reward(args, {}).timeout == 60.0
    args.reward_timeout = 5.0
    reward = resolve_reward(args, {})
    assert reward.timeout == 5.0 and reward.name == "--custom-rm-path plugrl.plugins.rewards.deepscaler:deepscaler_reward"


def test_threshold_stops_the_rollout_naming_the_reward_and_first_failure():
    def grader(sample):
        if sample.index < 5:
            raise KeyError("answer")
        return 1.0

    reward = Reward(grader, {}, name="--rm-type mine")
    reward.new_window()
    asyncio.run(reward.score(samples(8)))  # 5 of 8 failed: more than half
    with pytest.raises(RewardError) as info:
        rollout_reward_metrics(reward, 3, 0.5)
    message = str(info.value)
    assert "failed on 5 of 8 samples of rollout 3" in message
    assert "--reward-error-threshold 0.5" in message
    assert "first failure: reward --rm-type mine failed on sample 0: KeyError: 'answer'" in message
    # The same counts under a higher threshold: metrics, no stop.
    assert rollout_reward_metrics(reward, 3, 0.75) == {
        "rollout/reward_errors": 5, "rollout/reward_timeouts": 0, "rollout/reward_samples": 8,
        "rollout/reward_stuck_threads": 0}
    # A new rollout starts from zero.
    reward.new_window()
    asyncio.run(reward.score(samples(8)[5:]))
    assert rollout_reward_metrics(reward, 4, 0.5)["rollout/reward_errors"] == 0


def test_exactly_half_failing_does_not_stop_the_run():
    reward = Reward(lambda s: 1.0 if s.index % 2 else 1 / 0, {})
    asyncio.run(reward.score(samples(8)))
    assert rollout_reward_metrics(reward, 0, None)["rollout/reward_errors"] == 4


def test_console_line_shows_reward_failures_only_when_there_are_some():
    quiet = console_line(2, {"rollout/raw_reward": 0.5, "rollout/reward_errors": 0, "rollout/reward_timeouts": 0})
    assert "reward_errors" not in quiet
    loud = console_line(2, {"rollout/raw_reward": 0.5, "rollout/reward_errors": 6, "rollout/reward_timeouts": 2})
    assert "| reward_errors 6 (2 timed out)" in loud


def test_plugrl_score_reports_a_hanging_row_and_scores_the_rest(tmp_path, monkeypatch, capsys):
    from plugrl.core.score import main as score_main

    (tmp_path / "slow_rm.py").write_text(
        "import time\n"
        "def rm(sample):\n"
        "    if sample.label == 'hang':\n"
        "        time.sleep(30)\n"
        "    return float(sample.response == sample.label)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"response": "4", "label": "4"}\n{"response": "x", "label": "hang"}\n'
                    '{"response": "5", "label": "6"}\n')
    code = score_main(["--custom-rm-path", "slow_rm:rm", "--input", str(rows), "--reward-timeout", "0.5"])
    out, err = capsys.readouterr()
    assert code == 1
    assert f"{rows}:2: reward failed: timed out after 0.5 s (--reward-timeout 0.5)" in err
    assert "count: 2" in out and "mean: 0.5" in out and "errors: 1" in out
    assert score_main(["--custom-rm-path", "slow_rm:rm", "--input", str(rows), "--reward-timeout", "-5"]) == 2

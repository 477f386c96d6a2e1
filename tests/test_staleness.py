"""Buffered partial-rollout groups against --max-staleness (core/staleness.py)."""

import pytest

from plugrl.core.staleness import handle_stale, oldest_version
from plugrl.core.types import Sample, Status


def partial(prompt_len: int, response: list[int], versions: list[str]) -> Sample:
    sample = Sample(tokens=list(range(100, 100 + prompt_len)) + response, response="xyz",
                    response_length=len(response), loss_mask=[1] * len(response),
                    rollout_log_probs=[-0.5] * len(response), weight_versions=versions, status=Status.ABORTED,
                    metadata={"start_rollout_id": 2, "keep": True})
    return sample


def test_oldest_version_is_the_first_of_any_sample():
    assert oldest_version([partial(3, [1, 2], ["4", "5"]), partial(3, [1], ["3"])]) == 3
    assert oldest_version([partial(3, [], [])]) is None


def test_fresh_groups_and_no_bound_pass_untouched():
    groups = [[partial(3, [1, 2], ["5"])], [partial(2, [], [])]]
    kept, counts = handle_stale(groups, 5, "drop")
    assert kept == groups and sum(counts.values()) == 0
    assert handle_stale(groups, None, "drop")[0] is groups


def test_drop_counts_and_discards():
    old, new = [partial(3, [1, 2], ["2", "3"])], [partial(3, [7], ["4"])]
    kept, counts = handle_stale([old, new], 4, "drop")
    assert kept == [new] and counts["rollout/stale_dropped_groups"] == 1


def test_regenerate_restarts_from_the_prompt():
    sample = partial(3, [1, 2], ["2"])
    kept, counts = handle_stale([[sample]], 3, "regenerate")
    assert kept == [[sample]] and counts["rollout/stale_regenerated_groups"] == 1
    assert sample.tokens == [100, 101, 102] and sample.response_length == 0 and sample.response == ""
    assert sample.loss_mask is None and sample.rollout_log_probs is None and sample.weight_versions == []
    assert sample.status == Status.PENDING and sample.metadata == {"keep": True}


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="--stale-partial-rollout"):
        handle_stale([], 1, "keep")

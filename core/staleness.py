"""Partial-rollout groups older than ``--max-staleness`` allows, when the rollout manager takes them back
from the buffer policy (async loop).

A group aborted in rollout ``r`` is continued in a later rollout; its first tokens came from the
weights of ``Sample.weight_versions[0]``. Trained at step ``t`` they are ``t - version`` steps old.
``--stale-partial-rollout regenerate`` (default) restarts such a group from its prompt (the prompt is
not lost, its stale tokens are); ``drop`` discards it. Counted as ``rollout/stale_regenerated_groups``
and ``rollout/stale_dropped_groups``.
"""

from __future__ import annotations

from .types import Group, Sample, Status

POLICIES = ("regenerate", "drop")
STALE_METRICS = ("rollout/stale_regenerated_groups", "rollout/stale_dropped_groups")


def oldest_version(group: Group) -> int | None:
    """The oldest weight version that generated any token of the group (None: nothing generated yet)."""
    versions = [int(s.weight_versions[0]) for s in group
                if s.weight_versions and str(s.weight_versions[0]).lstrip("-").isdigit()]
    return min(versions) if versions else None


def restart_from_prompt(sample: Sample) -> None:
    """Forget the response: the sample is generated again from its prompt."""
    del sample.tokens[sample.prompt_length:]
    sample.response, sample.response_length, sample.reward = "", 0, None
    sample.loss_mask = sample.rollout_log_probs = None
    sample.weight_versions = []
    sample.status = Status.PENDING
    sample.metadata.pop("start_rollout_id", None)


def handle_stale(groups: list[Group], min_version: int | None, policy: str) -> tuple[list[Group], dict[str, int]]:
    """``groups`` minus the dropped ones, stale ones restarted in place when regenerating; the counts."""
    if policy not in POLICIES:
        raise ValueError(f"--stale-partial-rollout {policy!r}: choose one of {', '.join(POLICIES)}")
    counts = dict.fromkeys(STALE_METRICS, 0)
    if min_version is None:
        return groups, counts
    kept = []
    for group in groups:
        version = oldest_version(group)
        if version is None or version >= min_version:
            kept.append(group)
        elif policy == "drop":
            counts["rollout/stale_dropped_groups"] += 1
        else:
            for sample in group:
                restart_from_prompt(sample)
            counts["rollout/stale_regenerated_groups"] += 1
            kept.append(group)
    return kept, counts

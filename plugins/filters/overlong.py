"""Reward post-processor ``overlong_penalty``: DAPO's soft overlong punishment.

DAPO (Yu et al. 2025, arXiv:2503.14476, "Soft Overlong Punishment") adds a length-aware penalty to the rule reward, with
``L_max = --rollout-max-response-len`` and a buffer ``L_cache = --overlong-buffer-len``:

    R_length(y) = 0                                  if |y| <= L_max - L_cache
                = ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
                = -1                                 if |y| > L_max

scaled by ``--overlong-penalty-factor`` (verl's ``overlong_buffer.penalty_factor``, default 1.0).
verl's DAPO reward manager computes the middle branch for every length as
``min(-(|y| - (L_max - L_cache)) / L_cache * factor, 0)``; a response cannot exceed ``L_max`` there,
so the two agree. Here the overshoot is capped at ``L_cache`` so the paper's ``-1`` (times the factor)
also holds for a response longer than ``L_max`` (possible after a partial-rollout continuation).
``|y|`` is ``sample.response_length``. Default buffer: ``L_max // 4``.

Runs in the rollout manager after the reward function and before the estimator's ``shape_rewards``.
Options (``OverlongOptions``, from the flags above): checked on the driver (``--dry-run`` too).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from plugrl.core import hookimpl
from plugrl.core.plugin_options import RUN_SETTING, options_from_config


@dataclasses.dataclass
class OverlongOptions:
    rollout_max_response_len: int | None = dataclasses.field(default=None, metadata={
        "help": "L_max, the generation budget (--rollout-max-response-len); required", RUN_SETTING: True})
    overlong_buffer_len: int | None = dataclasses.field(default=None, metadata={
        "help": "L_cache, the length band before L_max that is penalised (--overlong-buffer-len; default L_max // 4)"})
    overlong_penalty_factor: float | None = dataclasses.field(default=None, metadata={
        "help": "scale of the penalty (--overlong-penalty-factor; default 1.0)"})
    reward_key: str | None = dataclasses.field(default=None, metadata={
        "help": "the key of a dict reward that gets the penalty (--reward-key)", RUN_SETTING: True})

    def buffer_len(self) -> int:
        return self.rollout_max_response_len // 4 if self.overlong_buffer_len is None else self.overlong_buffer_len


def overlong_penalty_value(response_length: int, max_len: int, buffer_len: int, factor: float = 1.0) -> float:
    """The (non-positive) penalty DAPO adds for a response of ``response_length`` tokens."""
    if buffer_len <= 0 or buffer_len > max_len:
        raise ValueError(f"--overlong-buffer-len must be in 1..{max_len} (--rollout-max-response-len), got {buffer_len}")
    expected_len = max_len - buffer_len
    exceed_len = min(response_length - expected_len, buffer_len)
    return min(-exceed_len / buffer_len * factor, 0.0)


def overlong_penalty(samples, options: OverlongOptions | Any) -> None:
    """Add the soft overlong penalty to each sample's scalar reward, in place.

    Dict rewards get it on ``reward[options.reward_key]``. Samples without a reward (aborted) are left
    alone. ``options`` is what core hands it (an ``OverlongOptions``); a run config, for callers that hold
    one, is filled into the same object.
    """
    options = options_from_config("reward_post_processor", "overlong_penalty", overlong_penalty, OverlongOptions,
                                  options)
    max_len = options.rollout_max_response_len
    if not max_len:
        raise ValueError("overlong_penalty needs --rollout-max-response-len")
    buffer_len = options.buffer_len()
    factor = 1.0 if options.overlong_penalty_factor is None else float(options.overlong_penalty_factor)
    reward_key = options.reward_key
    for sample in samples:
        if sample.reward is None:
            continue
        penalty = overlong_penalty_value(sample.response_length, max_len, buffer_len, factor)
        if isinstance(sample.reward, dict):
            if not reward_key:
                raise ValueError(f"reward is a dict with keys {sorted(sample.reward)}; pass --reward-key")
            sample.reward[reward_key] = sample.reward[reward_key] + penalty
        else:
            sample.reward = sample.reward + penalty


def check_overlong(options: OverlongOptions) -> list[str]:
    """Driver check (``--dry-run`` too)."""
    max_len = options.rollout_max_response_len
    if not max_len:
        return ["--reward-post-process overlong_penalty needs --rollout-max-response-len"]
    if not 1 <= options.buffer_len() <= max_len:
        return [f"--overlong-buffer-len must be in 1..{max_len} (--rollout-max-response-len), got {options.buffer_len()}"]
    factor = options.overlong_penalty_factor
    if factor is not None and not 0 <= float(factor) < float("inf"):
        return [f"--overlong-penalty-factor must be >= 0 (a negative one would reward overlong responses), got {factor}"]
    return []


@hookimpl
def plugrl_register_reward_post_processors(register):
    register("overlong_penalty", overlong_penalty, options=OverlongOptions, check_options=check_overlong,
             idle_flags=("overlong_buffer_len",),
             description="DAPO soft overlong punishment (--overlong-buffer-len, --overlong-penalty-factor)")

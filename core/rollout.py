"""The rollout manager: turns prompts into rewarded, filtered groups and then into train data.

Runs inside one Ray actor (``RolloutManagerActor`` in ``actors.py``), which owns the data source, the
partial-rollout buffer, the rollout engine, the reward, the filters and the estimator's reward
shaping. All generation runs on one asyncio event loop living in a background thread, so the engine's
batching sees every in-flight request and sync rewards can run in a thread pool beside it.

Rules (slime reference §2.4-§2.7): one semaphore permit per sample; a rollout keeps exactly
``--rollout-batch-size`` groups; when drops make that target unreachable another
``--over-sampling-batch-size`` prompts are submitted; the rest is aborted at the end, and with
``--partial-rollout`` the groups still in flight go back to the buffer policy.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .reward_call import RewardError  # noqa: F401 - defined here before; importers keep the name
from .types import FilterDecision, Group, Sample, Status
from .staleness import STALE_METRICS, handle_stale

logger = logging.getLogger(__name__)


@dataclass
class RolloutResult:
    groups: list[Group]
    metrics: dict = field(default_factory=dict)


class EventLoopThread:
    """A private asyncio loop in a daemon thread; ``run(coro)`` blocks the caller until it finishes."""

    def __init__(self, name: str = "plugrl-rollout-loop"):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def sampling_params_from_args(args: Any, *, evaluation: bool = False) -> dict:
    """SGLang-style sampling params (slime §2.4); eval values fall back to the rollout ones."""
    def pick(name):
        value = getattr(args, f"eval_{name}", None) if evaluation else None
        return getattr(args, f"rollout_{name}") if value is None else value

    return {
        "temperature": pick("temperature"),
        "top_p": pick("top_p"),
        "top_k": pick("top_k"),
        "max_new_tokens": pick("max_response_len"),
        "stop": getattr(args, "rollout_stop", None) or None,
        "stop_token_ids": getattr(args, "rollout_stop_token_ids", None) or None,
        "skip_special_tokens": bool(getattr(args, "rollout_skip_special_tokens", False)),
        "no_stop_trim": True,
    }


def _rollout_seed(args) -> int:
    """``--rollout-seed`` (0 is a seed like any other), slime's 42 when the namespace lacks it."""
    seed = getattr(args, "rollout_seed", None)
    return 42 if seed is None else int(seed)


def sample_seed(rollout_seed: int, index: int, tokens_so_far: int, evaluation: bool) -> int:
    value = ((rollout_seed * 1_000_003 + index) * 65_537 + tokens_so_far) * 2 + int(evaluation)
    return value % (2**31 - 1)



class SampleGenerator:
    """Generates and rewards single samples and groups; shared by training rollouts and eval."""

    def __init__(self, args, engine, tokenizer, reward, *, concurrency: int):
        self.args = args
        self.engine = engine
        self.tokenizer = tokenizer
        self.reward = reward
        self.semaphore = asyncio.Semaphore(concurrency)
        self.aborted = False
        self.reward_errors = 0
        self.generated = 0  # progress counters, read by the driver while a rollout runs
        self.rewarded = 0
        self.reward_error_policy = getattr(args, "reward_error", "zero") or "zero"
        self.reward_timeout = getattr(args, "reward_timeout", None)
        from .registry import import_object

        self.custom_generate_path = getattr(args, "custom_generate_function_path", None)
        self.default_generate = import_object(self.custom_generate_path) if self.custom_generate_path else None
        self.sample_hooks = [import_object(path) for path in (getattr(args, "rollout_sample_hook_path", None) or [])]

    def custom_generate(self, sample: Sample):
        """slime's ``--custom-generate-function-path`` (or the sample's ``generate_function_path``):
        ``async fn(args, sample, sampling_params[, evaluation=...])`` fills in the response and returns
        the sample; a function whose signature names ``engine`` also gets this rollout's engine
        (``await engine.generate(token_ids, params)``), since plugrl's embedded engine has no HTTP
        router for slime-style functions to call."""
        if sample.generate_function_path:
            from .registry import import_object

            return import_object(sample.generate_function_path)
        return self.default_generate

    async def _run_custom_generate(self, fn, sample: Sample, sampling_params: dict, evaluation: bool) -> Sample:
        accepted = inspect.signature(fn).parameters
        kwargs = {name: value for name, value in (("evaluation", evaluation), ("engine", self.engine))
                  if name in accepted}
        result = await fn(self.args, sample, dict(sampling_params), **kwargs)
        where = f"--custom-generate-function-path {sample.generate_function_path or self.custom_generate_path}"
        if isinstance(result, list):
            raise TypeError(f"{where} returned {len(result)} samples: plugrl keeps one sample per generation "
                            "(return the sample you were given, with its response filled in)")
        if not isinstance(result, Sample):
            raise TypeError(f"{where} must return the Sample, got {type(result).__name__}")
        if result.status == Status.PENDING:
            raise ValueError(f"{where} returned sample {result.index} still pending: set its status "
                             "(completed, truncated or aborted), e.g. through sample.append_response_tokens")
        return result

    def prompt_ids(self, sample: Sample) -> list[int]:
        if sample.tokens:  # a partial rollout continues from prompt + partial response
            return list(sample.tokens)
        if isinstance(sample.prompt, list):
            from .data import chat_prompt_ids

            return chat_prompt_ids(self.tokenizer, sample.prompt)
        return self.tokenizer.encode(sample.prompt, add_special_tokens=False)

    async def generate_sample(self, sample: Sample, sampling_params: dict, *, evaluation: bool = False,
                              rollout_id: int | None = None) -> Sample:
        args = self.args
        if (not evaluation and getattr(args, "partial_rollout", False)
                and getattr(args, "mask_offpolicy_in_partial_rollout", False) and sample.response_length > 0):
            sample.loss_mask = [0] * sample.response_length  # the old-policy part is not trained
        if sample.status in (Status.COMPLETED, Status.TRUNCATED):
            return sample  # finished in an earlier rollout (from the buffer): keep its reward
        async with self.semaphore:
            if self.aborted:
                sample.status = Status.ABORTED
                return sample
            custom = self.custom_generate(sample)
            if custom is not None:
                started = time.perf_counter()
                sample = await self._run_custom_generate(custom, sample, sampling_params, evaluation)
                sample.metadata["generation_time"] = sample.metadata.get("generation_time", 0.0) + (
                    time.perf_counter() - started)
                self.generated += 1
                return await self._finish(sample, rollout_id, evaluation)
            ids = self.prompt_ids(sample)
            if not sample.tokens:
                sample.tokens = list(ids)
            params = dict(sampling_params)
            params["max_new_tokens"] = params["max_new_tokens"] - sample.response_length
            if "sampling_seed" not in params:
                # Every sample draws from its own stream (seed, sample index, tokens so far): its tokens
                # do not depend on which other requests share its batch, so runs and resumed runs
                # reproduce exactly; eval (evaluation=True) uses streams of its own.
                params["sampling_seed"] = sample_seed(_rollout_seed(args),
                                                      int(sample.index or 0), sample.response_length, evaluation)
            if params["max_new_tokens"] <= 0:
                sample.status = Status.TRUNCATED
            else:
                started = time.perf_counter()
                out = await self.engine.generate(ids, params)
                sample.metadata.setdefault("generation_time", 0.0)
                sample.metadata["generation_time"] += time.perf_counter() - started
                finish = out["finish_reason"]
                sample.append_response_tokens(
                    out["tokens"], out["log_probs"], text=out.get("text", ""),
                    finish_reason=finish["type"] if isinstance(finish, dict) else finish,
                    weight_version=out.get("weight_version"),
                )
                self.generated += 1
        return await self._finish(sample, rollout_id, evaluation)

    async def _finish(self, sample: Sample, rollout_id: int | None, evaluation: bool) -> Sample:
        """After generation: slime's ``--rollout-sample-hook-path`` hooks (in order; ``hook(args, sample,
        *, rollout_id, evaluation)``, sync or async, returning a replacement Sample or None), then the
        reward unless the sample has one (or group rewards come later)."""
        for hook in self.sample_hooks:
            result = hook(self.args, sample, rollout_id=rollout_id, evaluation=evaluation)
            if inspect.isawaitable(result):
                result = await result
            if result is not None:
                if not isinstance(result, Sample):
                    raise TypeError(f"--rollout-sample-hook-path {hook.__module__}.{hook.__qualname__} must return "
                                    f"a Sample or None, got {type(result).__name__}")
                sample = result
        if sample.status != Status.ABORTED and sample.reward is None and not getattr(self.args, "group_rm", False):
            sample.reward = (await self.score([sample]))[0]
            self.rewarded += 1
        return sample

    async def score(self, samples: list[Sample]) -> list:
        """Rewards for ``samples`` under ``--reward-error`` and ``--reward-timeout`` (``Reward.score``:
        each call bounded, failures scored 0 and counted, or the run stopped)."""
        try:
            return await self.reward.score(samples, on_error=self.reward_error_policy, timeout=self.reward_timeout)
        finally:
            self.reward_errors = self.reward.total.failed  # the reward's own count: calls overlap

    async def generate_group(self, group: Group, sampling_params: dict, *, evaluation: bool = False,
                             rollout_id: int | None = None) -> Group:
        if self.aborted:
            return group
        done = await asyncio.gather(*(self.generate_sample(s, sampling_params, evaluation=evaluation,
                                                           rollout_id=rollout_id) for s in group))
        group[:] = done  # a custom generate function or a sample hook may return a new Sample
        if getattr(self.args, "group_rm", False) and not self.aborted and not evaluation:
            rewards = await self.score(group)
            for sample, reward in zip(group, rewards):
                sample.reward = reward
        return group


def scalar_reward(sample: Sample, reward_key: str | None) -> float:
    value = sample.get_reward_value(reward_key=reward_key)
    return 0.0 if value is None else float(value)


async def generate_rollout(
    generator: SampleGenerator, data_source, buffer, *, rollout_id: int, rollout_batch_size: int,
    over_sampling_batch_size: int, sampling_params: dict, sample_filter=None, filter_name: str = "dynamic_filter",
    partial_rollout: bool = False, min_weight_version: int | None = None, stale_policy: str = "regenerate",
) -> RolloutResult:
    """One training rollout with dynamic sampling (slime §2.6): exactly ``rollout_batch_size`` kept groups.
    ``min_weight_version`` (async with ``--max-staleness``): buffered partial groups begun with older
    weights are restarted or dropped (``core/staleness.py``)."""
    target = rollout_batch_size
    kept: list[Group] = []
    drops: Counter = Counter()
    remaining = 0  # submitted - dropped: kept groups stay counted
    pending: set[asyncio.Task] = set()
    submitted_groups = 0
    stale: Counter = Counter()
    started = time.perf_counter()
    warn_at = OVER_SAMPLING_WARNING * target  # then every further factor of 10
    while len(kept) < target:
        if submitted_groups >= warn_at:
            warn_at *= 10
            _warn_over_sampling(rollout_id, submitted_groups, len(kept), target, drops)
        while remaining < target:
            groups = buffer.take(over_sampling_batch_size, rollout_id=rollout_id) if len(buffer) else []
            groups, counts = handle_stale(groups, min_weight_version, stale_policy)
            stale.update(counts)
            if len(groups) < over_sampling_batch_size:
                groups += data_source.next_groups(over_sampling_batch_size - len(groups))
            for group in groups:
                pending.add(asyncio.ensure_future(generator.generate_group(group, sampling_params,
                                                                           rollout_id=rollout_id)))
            remaining += len(groups)
            submitted_groups += len(groups)
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        failed = [t for t in done if t.exception() is not None]
        if failed:  # e.g. --reward-error raise: stop everything else before reporting
            await cancel_all(generator, pending)
            raise failed[0].exception()
        for task in done:
            group = task.result()
            if sample_filter is None:
                decision = FilterDecision(True)
            else:
                decision = FilterDecision.coerce(sample_filter(group))
            drop = not decision.keep and not (decision.keep_when_insufficient and remaining <= target)
            if drop:
                drops[decision.reason or "dropped"] += 1  # slime reports no reason-less drops; plugrl counts them
                remaining -= 1
            elif len(kept) < target:
                kept.append(group)
    leftovers = await abort_and_drain(generator, pending)
    if partial_rollout:
        for group in leftovers:
            for sample in group:
                if sample.response_length > 0 and "start_rollout_id" not in sample.metadata:
                    sample.metadata["start_rollout_id"] = rollout_id
        if leftovers:
            buffer.add(leftovers)
    kept.sort(key=lambda g: g[0].index if g[0].index is not None else 0)
    metrics = {
        "rollout/submitted_groups": submitted_groups,
        "rollout/aborted_groups": len(leftovers),
        "rollout/buffer_size": len(buffer),
        "perf/generate_time": time.perf_counter() - started,
    }
    for reason, count in drops.items():
        metrics[f"rollout/{filter_name}/drop_{reason}"] = count
    if min_weight_version is not None:
        metrics.update({key: stale.get(key, 0) for key in STALE_METRICS})
    return RolloutResult(kept, metrics)


# Groups generated per group a rollout needs before the filter's drops are reported as a likely stall
OVER_SAMPLING_WARNING = 10


def _warn_over_sampling(rollout_id: int, submitted: int, kept: int, target: int, drops: Counter) -> None:
    """The filter drops nearly everything: a filter no group can pass (every reward equal, a reward that
    never scores) makes dynamic sampling run forever, as in slime; say so instead of spinning silently."""
    reasons = ", ".join(f"{reason} {count}" for reason, count in drops.most_common()) or "none"
    logger.warning(
        "rollout %d: %d groups generated for %d needed, %d kept so far (dropped by the dynamic-sampling filter: %s). "
        "If no group can pass (e.g. the reward gives every sample the same score) the rollout never ends: check "
        "the reward on a few samples (`plugrl score`), or let the filter keep a group when too few pass "
        "(FilterDecision(keep_when_insufficient=True), as --dynamic-sampling-filter nonzero_std_with_fallback does)",
        rollout_id, submitted, target, kept, reasons)


async def abort_and_drain(generator: SampleGenerator, pending: set) -> list[Group]:
    """Abort in-flight generation and collect the groups it returns (partial outputs included)."""
    if not pending:
        return []
    generator.aborted = True
    try:
        await generator.engine.abort_all()
        results = await asyncio.gather(*pending, return_exceptions=True)
    finally:
        generator.aborted = False
    groups = []
    for result in results:
        if isinstance(result, BaseException):
            raise result
        groups.append(result)
    return groups


async def cancel_all(generator: SampleGenerator, pending: set) -> None:
    generator.aborted = True
    try:
        await generator.engine.abort_all()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    finally:
        generator.aborted = False

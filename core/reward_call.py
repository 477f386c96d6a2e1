"""Calling a reward plugin uniformly: sync or async, per-sample or batched, plugrl or slime signature.

Used by ``plugrl score`` and by the rollout manager (inside its Ray actor, on its event loop): async
rewards are awaited, sync ones run in threads so graders never block the event loop. Every call is
bounded by a timeout (``--reward-timeout``, default ``DEFAULT_REWARD_TIMEOUT`` s).

Why threads that are given up rather than a fixed pool: a Python thread cannot be killed, so a pool
whose worker hangs stays one worker short for the rest of the run (two hung calls starve a 2-wide pool
and every later reward scores 0). Here a call holds one of ``concurrency`` slots only until it returns
or times out; a timed-out call's thread is left to finish on its own (counted in ``stuck_threads()``),
and its slot goes to the next call. CPU-heavy graders that can hang for ever should run their risky
step through ``plugrl.core.timeouts.guarded_call`` (a process that is killed), as the math rewards do.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import inspect
import logging
import os
import threading
from typing import Any, Callable

logger = logging.getLogger(__name__)

DEFAULT_REWARD_TIMEOUT = 60.0  # seconds per reward call (per sample, or per batch for batched rewards)
DEFAULT_ERROR_THRESHOLD = 0.5  # fraction of a rollout's samples whose reward may fail before the run stops


class RewardError(RuntimeError):
    """The run stops because of its reward (``--reward-error raise``, or past ``--reward-error-threshold``)."""


class RewardTimeout(TimeoutError):
    """A reward call ran past its timeout; the message names the timeout."""


@dataclasses.dataclass
class RewardCounts:
    """Samples scored, and of them how many failed (raised or timed out), with the first failure."""

    samples: int = 0
    failed: int = 0
    timeouts: int = 0
    first_failure: str | None = None


def describe_failure(exc: BaseException) -> str:
    """``TypeName: message`` (just the type name when the message is empty)."""
    text = str(exc)
    if isinstance(exc, RewardTimeout):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Reward:
    """A reward function with its calling convention made uniform: ``await reward(samples)``."""

    def __init__(self, fn: Callable, options: dict, *, batched: bool = False, slime_args: Any = None,
                 timeout: float | None = None, name: str | None = None, concurrency: int | None = None):
        self.fn, self.options, self.batched, self.slime_args = fn, options, batched, slime_args
        self.timeout = float(timeout) if timeout else DEFAULT_REWARD_TIMEOUT
        self.name = name or f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
        self.concurrency = concurrency or max(2, os.cpu_count() or 2)
        self.total = RewardCounts()  # the whole run
        self.window = RewardCounts()  # since ``new_window()`` (the running rollout)
        self._stuck: list[threading.Thread] = []
        self._slots: tuple[Any, asyncio.Semaphore] | None = None
        self._warned: set[str] = set()

    # ---- one call -------------------------------------------------------------------------------
    def _call(self, arg):
        if self.slime_args is not None:
            return self.fn(self.slime_args, arg)
        return self.fn(arg, **self.options)

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots[0] is not loop:  # a semaphore belongs to one loop
            self._slots = (loop, asyncio.Semaphore(self.concurrency))
        return self._slots[1]

    async def _in_thread(self, arg, timeout: float):
        """``self._call(arg)`` in a fresh daemon thread holding one slot for at most ``timeout`` s."""
        async with self._semaphore():  # waiting for a slot is not timed, only the call
            loop = asyncio.get_running_loop()
            done = loop.create_future()

            def settle(outcome):
                if not done.done():
                    done.set_result(outcome)

            def target():
                try:
                    outcome = (True, self._call(arg))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    outcome = (False, exc)
                try:
                    loop.call_soon_threadsafe(settle, outcome)
                except RuntimeError:  # the loop closed while this call hung: nobody waits any more
                    pass

            thread = threading.Thread(target=target, name="plugrl-reward", daemon=True)
            thread.start()
            try:
                ok, value = await asyncio.wait_for(done, timeout)
            except asyncio.TimeoutError:
                self._stuck.append(thread)
                raise self._timeout_error(timeout) from None
        if not ok:
            raise value
        return value

    def _timeout_error(self, timeout: float) -> RewardTimeout:
        return RewardTimeout(f"timed out after {timeout:g} s (--reward-timeout {timeout:g})")

    async def call_one(self, arg, timeout: float | None = None):
        """One call of the function on ``arg`` (a sample, or the list for a batched reward), bounded
        by ``timeout`` (default ``self.timeout``); raises what it raised, or ``RewardTimeout``."""
        timeout = float(timeout or self.timeout)
        if inspect.iscoroutinefunction(self.fn):
            return await self._bounded(self._call(arg), timeout, timeout)
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await self._in_thread(arg, timeout)
        if inspect.isawaitable(result):  # a sync function that returned a coroutine
            result = await self._bounded(result, max(0.0, timeout - (loop.time() - started)), timeout)
        return result

    async def _bounded(self, awaitable, budget: float, timeout: float):
        """Await ``awaitable`` for ``budget`` s, then cancel it; a ``TimeoutError`` the reward raises
        itself (an HTTP client's, say) stays its own error, not ours."""
        task = asyncio.ensure_future(awaitable)
        try:
            done, _ = await asyncio.wait({task}, timeout=budget)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done:
            task.cancel()
            raise self._timeout_error(timeout)
        return task.result()

    async def outcomes(self, samples: list, timeout: float | None = None) -> list:
        """Per sample: its reward, or the exception its call raised (a batched reward's failure is
        every sample's)."""
        if self.batched:
            try:
                values = list(await self.call_one(list(samples), timeout))
                if len(values) != len(samples):
                    raise ValueError(f"batched reward returned {len(values)} values for {len(samples)} samples")
            except Exception as exc:  # noqa: BLE001 - reported per sample
                return [exc] * len(samples)
            return values
        return list(await asyncio.gather(*(self.call_one(s, timeout) for s in samples), return_exceptions=True))

    async def __call__(self, samples: list) -> list:
        """Rewards of ``samples`` in order (one batched call, or one call per sample concurrently);
        raises the first failure."""
        values = await self.outcomes(samples)
        for value in values:
            if isinstance(value, BaseException):
                raise value
        return values

    # ---- scoring under a policy -------------------------------------------------------------------
    async def score(self, samples: list, *, on_error: str = "zero", timeout: float | None = None) -> list:
        """Rewards of ``samples``; a failed call (raised or timed out) scores 0 and is counted
        (``on_error="zero"``) or stops with ``RewardError`` (``"raise"``)."""
        values = await self.outcomes(samples, timeout)
        failures = [(s, v) for s, v in zip(samples, values) if isinstance(v, BaseException)]
        for counts in (self.total, self.window):
            counts.samples += len(samples)
            counts.failed += len(failures)
            counts.timeouts += sum(isinstance(v, RewardTimeout) for _, v in failures)
        if not failures:
            return values
        sample, exc = failures[0]
        where = f"reward {self.name} failed on sample {getattr(sample, 'index', None)}: {describe_failure(exc)}"
        for counts in (self.total, self.window):
            counts.first_failure = counts.first_failure or where
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise exc
        if on_error == "raise":
            raise RewardError(f"{where} (--reward-error raise stops the run; --reward-error zero scores it 0)") from exc
        kind = "timeout" if isinstance(exc, RewardTimeout) else "error"
        if kind not in self._warned:  # once per kind and run: the counts go into every rollout's metrics
            self._warned.add(kind)
            counted = "rollout/reward_timeouts" if kind == "timeout" else "rollout/reward_errors"
            logger.warning("%s; scoring 0 under --reward-error zero (counted in %s; the run stops when more "
                           "than --reward-error-threshold of a rollout's samples fail)", where, counted)
        return [0.0 if isinstance(v, BaseException) else v for v in values]

    def new_window(self) -> None:
        """Start counting a new rollout (``self.window``)."""
        self.window = RewardCounts()

    def stuck_threads(self) -> int:
        """Timed-out sync calls whose threads are still running (they cannot be killed)."""
        self._stuck = [t for t in self._stuck if t.is_alive()]
        return len(self._stuck)

    async def close(self) -> None:
        closer = getattr(self.fn, "aclose", None)
        if closer is not None:
            await closer()


def rollout_reward_metrics(reward: Reward, rollout_id: int, threshold: float | None) -> dict:
    """The running rollout's reward counts as metrics; ``RewardError`` when more than ``threshold``
    (a fraction) of its samples failed, naming the reward and its first failure."""
    counts = reward.window
    metrics = {"rollout/reward_errors": counts.failed, "rollout/reward_timeouts": counts.timeouts,
               "rollout/reward_samples": counts.samples, "rollout/reward_stuck_threads": reward.stuck_threads()}
    threshold = DEFAULT_ERROR_THRESHOLD if threshold is None else float(threshold)
    if counts.samples and counts.failed > threshold * counts.samples:
        raise RewardError(
            f"the reward failed on {counts.failed} of {counts.samples} samples of rollout {rollout_id} "
            f"({counts.timeouts} timed out), more than --reward-error-threshold {threshold:g}; first failure: "
            f"{counts.first_failure}. Try the reward on a few rows with `plugrl score`, then fix it or raise "
            "--reward-timeout / --reward-error-threshold; checkpoints and metrics so far are kept")
    return metrics


def _is_slime_signature(fn: Callable) -> bool:
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0] == "args"


def needs_reward(args) -> bool:
    """Whether the run scores its samples: the policy loss learns from rewards; ``--loss-type sft_loss`` /
    ``custom_loss`` without ``--rm-type`` or ``--custom-rm-path`` do not (the config check allows it)."""
    return bool(getattr(args, "rm_type", None) or getattr(args, "custom_rm_path", None)
                or getattr(args, "loss_type", "policy_loss") == "policy_loss")


def _no_reward(sample) -> float:
    return 0.0


def no_reward(args) -> Reward:
    """The reward of a run that names none (``needs_reward`` is false): every sample scores 0, so the
    rollout metrics keep their shape and nothing resolves a reward plugin."""
    return Reward(_no_reward, {}, name=f"no reward (--loss-type {getattr(args, 'loss_type', None)} without --rm-type)")


def resolve_reward(args: argparse.Namespace, options: dict) -> Reward:
    """The reward named by ``--custom-rm-path`` or ``--rm-type``; raises ``PluginError``/``ImportError``."""
    timeout = getattr(args, "reward_timeout", None)
    if args.custom_rm_path:
        from .registry import import_object

        fn = import_object(args.custom_rm_path)
        if not callable(fn):
            raise ImportError(f"--custom-rm-path {args.custom_rm_path} is not callable")
        name = f"--custom-rm-path {args.custom_rm_path}"
        if _is_slime_signature(fn):
            # slime functions read their settings from args: expose the CLI flags and --rm-opt there.
            slime_args = argparse.Namespace(**{**vars(args), **options})
            return Reward(fn, options, slime_args=slime_args, timeout=timeout, name=name)
        return Reward(fn, options, timeout=timeout, name=name)
    from .plugins import load_plugins

    plugin_set = load_plugins()
    entry = plugin_set.entry("reward", args.rm_type)
    from .plugin_options import as_kwargs, build_options

    options = as_kwargs(build_options(entry, args, options))  # the reward's declared options, checked
    return Reward(entry.load(), options, batched=bool(entry.metadata.get("batched")), timeout=timeout,
                  name=f"--rm-type {args.rm_type}")

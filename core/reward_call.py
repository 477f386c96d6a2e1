"""Calling a reward plugin uniformly: sync or async, per-sample or batched, plugrl or slime signature.

Used by ``plugrl score`` and by the rollout manager (inside its Ray actor, on its event loop): async
rewards are awaited, sync ones run in a thread pool so graders never block the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
from typing import Any, Callable


class Reward:
    """A reward function with its calling convention made uniform: ``await reward(samples)``."""

    def __init__(self, fn: Callable, options: dict, *, batched: bool = False, slime_args: Any = None):
        self.fn, self.options, self.batched, self.slime_args = fn, options, batched, slime_args

    def _call(self, arg):
        if self.slime_args is not None:
            return self.fn(self.slime_args, arg)
        return self.fn(arg, **self.options)

    async def _run(self, arg, executor):
        if inspect.iscoroutinefunction(self.fn):
            result = await self._call(arg)
        else:
            result = await asyncio.get_running_loop().run_in_executor(executor, self._call, arg)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def __call__(self, samples: list) -> list:
        """Rewards of ``samples`` in order: one batched call, or one call per sample concurrently."""
        if self.batched:
            values = list(await self._run(list(samples), self._executor()))
            if len(values) != len(samples):
                raise ValueError(f"batched reward returned {len(values)} values for {len(samples)} samples")
            return values
        executor = self._executor()
        return list(await asyncio.gather(*(self._run(sample, executor) for sample in samples)))

    def _executor(self):
        # One pool per reward object, shared by every call: graders are CPU-bound and short.
        if getattr(self, "_pool", None) is None:
            import concurrent.futures
            import os

            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="reward")
        return self._pool

    async def close(self) -> None:
        closer = getattr(self.fn, "aclose", None)
        if closer is not None:
            await closer()


def _is_slime_signature(fn: Callable) -> bool:
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0] == "args"


def resolve_reward(args: argparse.Namespace, options: dict) -> Reward:
    """The reward named by ``--custom-rm-path`` or ``--rm-type``; raises ``PluginError``/``ImportError``."""
    if args.custom_rm_path:
        from .registry import import_object

        fn = import_object(args.custom_rm_path)
        if not callable(fn):
            raise ImportError(f"--custom-rm-path {args.custom_rm_path} is not callable")
        if _is_slime_signature(fn):
            # slime functions read their settings from args: expose the CLI flags and --rm-opt there.
            slime_args = argparse.Namespace(**{**vars(args), **options})
            return Reward(fn, options, slime_args=slime_args)
        return Reward(fn, options)
    from .plugins import load_plugins

    plugin_set = load_plugins()
    entry = plugin_set.entry("reward", args.rm_type)
    return Reward(entry.load(), options, batched=bool(entry.metadata.get("batched")))



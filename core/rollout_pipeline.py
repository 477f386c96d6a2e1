"""The async loop's generation ahead of training, bounded by ``--max-staleness K``.

A driver thread generates rollouts in order, each with the weights pushed last. Rollout ``r`` may
start once the engines hold weight version ``r - K`` or newer (version ``v`` = the weights after
``v`` optimizer steps), so every sample trained at step ``r`` comes from weights at most ``K`` steps
old. A weight push (and the eval after it) holds the engine: it waits for the generation running at
that moment and the next one waits for it, so weights never change mid-generation. ``K = 1`` is
slime's one-step-off ``train_async.py``: rollout ``k + 1`` generates while ``k`` trains, and the push
after step ``k`` waits for it.

Partial rollouts carry their weight versions across rollouts (``Sample.weight_versions``); the
rollout manager drops buffered groups older than ``K`` (``rollout/stale_dropped_groups``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any


class RolloutPipeline:
    """``launch(rollout_id, version)`` starts a generation and returns a handle, ``wait(handle)`` its
    result (the loop passes Ray's ``generate.remote`` and ``ray.get``). ``version`` is the engines'
    weight version when the generation starts."""

    def __init__(self, launch: Callable[[int, int], Any], wait: Callable[[Any], Any], *, start: int,
                 num_rollout: int, max_staleness: int, version: int):
        if max_staleness < 1:
            raise ValueError(f"max_staleness must be >= 1, got {max_staleness}")
        self._launch, self._wait = launch, wait
        self.max_staleness = max_staleness
        self.version = version
        self._next, self._end = start, num_rollout
        self._results: dict[int, tuple[Any, int]] = {}  # rollout id -> (result, version it started with)
        self._error: BaseException | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._engine = threading.Lock()  # held by a generation, a weight push or an eval
        self._thread = threading.Thread(target=self._run, name="plugrl-rollout-pipeline", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    rollout_id = self._next
                    self._cond.wait_for(lambda: self._closed or rollout_id >= self._end
                                        or self.version >= rollout_id - self.max_staleness)
                    if self._closed or rollout_id >= self._end:
                        return
                with self._engine:
                    version = self.version
                    result = self._wait(self._launch(rollout_id, version))
                with self._cond:
                    self._results[rollout_id] = (result, version)
                    self._next = rollout_id + 1
                    self._cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to take() in the loop's thread
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def take(self, rollout_id: int) -> tuple[Any, int]:
        """Rollout ``rollout_id``'s result and the weight version it was generated with (blocks)."""
        with self._cond:
            self._cond.wait_for(lambda: rollout_id in self._results or self._error is not None)
            if rollout_id not in self._results:
                raise self._error
            return self._results.pop(rollout_id)

    @contextlib.contextmanager
    def engine(self):
        """Hold the engines between two generations (a weight push, an eval)."""
        with self._engine:
            yield

    def set_version(self, version: int) -> None:
        """After a push: generations waiting for newer weights may start."""
        with self._cond:
            self.version = version
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=1.0)  # a generation in flight ends with the run's actors

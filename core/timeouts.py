"""Run a CPU-bound function in a persistent worker process under a wall-clock timeout.

Graders (sympy, math_verify) can hang on hostile model output. ``signal.alarm`` timeouts only work
on the main thread of the main interpreter, so they silently do nothing in reward threads and in
Ray workers; a separate process can always be killed. Used wherever rewards are scored: the
rollout manager actor, ``plugrl score``, benchmarks and tests.

Workers are started with ``spawn`` (no forked copies of the caller's threads, locks or CUDA
state), reused across calls, and replaced when killed. A job's function must be picklable
(defined at module level of an importable module); its module is imported in the worker before
the first timed job, together with the names in that module's ``GUARDED_IMPORTS``, so import
time never counts against a timeout.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib
import multiprocessing
import os
import queue
import signal
import threading
import time
from typing import Any, Callable

STARTUP_TIMEOUT = 120.0  # seconds a fresh worker may take to start and import a grader module


class GraderWorkerError(RuntimeError):
    """A worker could not start or import the job's module (not a timeout: nothing to score)."""


def _worker_main(conn, parent_pid: int) -> None:
    """Worker process loop: ``("import", module)`` and ``("run", fn, args, kwargs)`` messages."""
    # Ctrl-C in the terminal reaches the whole process group; the parent decides what to do.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def exit_when_orphaned():
        # EOF on the pipe covers a parent that exits while we wait; this covers one that dies
        # while we are busy on a job.
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=exit_when_orphaned, daemon=True).start()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        try:
            if message[0] == "import":
                module = importlib.import_module(message[1])
                for name in getattr(module, "GUARDED_IMPORTS", ()):
                    importlib.import_module(name)
                reply = ("ok", None)
            else:
                _, fn, args, kwargs = message
                reply = ("ok", fn(*args, **kwargs))
        except BaseException as exc:  # the caller re-raises it
            reply = ("error", exc)
        try:
            conn.send(reply)
        except Exception as exc:  # unpicklable result or exception
            conn.send(("error", RuntimeError(f"grader result could not be sent back: {exc!r}")))


class _Worker:
    def __init__(self, ctx):
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child_conn, os.getpid()), daemon=True,
                                   name="plugrl-grader")
        self.process.start()
        child_conn.close()
        self.modules: set[str] = set()

    def request(self, message, timeout: float | None):
        """Send a message and wait for the reply; ``TimeoutError`` if none comes in time,
        ``EOFError`` if the worker died."""
        self.conn.send(message)
        if not self.conn.poll(timeout):
            raise TimeoutError
        return self.conn.recv()

    def kill(self) -> None:
        try:
            self.process.kill()
            self.process.join(5)
        finally:
            self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
            self.process.join(1)
        except (OSError, ValueError):
            pass
        if self.process.is_alive():
            self.kill()
        else:
            self.conn.close()


class GuardedPool:
    """Up to ``size`` worker processes; ``call`` runs ``fn(*args, **kwargs)`` in one of them and
    returns ``default`` if it takes longer than ``timeout`` s (the worker is killed and replaced).

    Thread-safe: concurrent callers use different workers and wait when all are busy (waiting is
    not timed, only the job itself).
    """

    def __init__(self, size: int | None = None, *, start_method: str = "spawn",
                 startup_timeout: float = STARTUP_TIMEOUT):
        self.size = max(1, size or _default_size())
        self.startup_timeout = startup_timeout
        self._ctx = multiprocessing.get_context(start_method)
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()  # LIFO keeps warm workers busy
        self._lock = threading.Lock()
        self._workers = 0
        self._closed = False
        self._pid = os.getpid()
        self.calls = 0
        self.timeouts = 0
        self.crashes = 0

    # ---- public ---------------------------------------------------------------------------------
    def call(self, fn: Callable, *args, timeout: float, default: Any = None, **kwargs) -> Any:
        if self._closed:
            raise RuntimeError("GuardedPool is closed")
        module = getattr(fn, "__module__", None)
        worker = self._acquire()
        healthy = False
        try:
            if module and module not in worker.modules:
                self._warm(worker, module)
            with self._lock:
                self.calls += 1
            try:
                status, value = worker.request(("run", fn, args, kwargs), timeout)
            except TimeoutError:
                with self._lock:
                    self.timeouts += 1
                return default
            except (EOFError, OSError):  # killed by the OOM killer, a segfault in a C extension, ...
                with self._lock:
                    self.crashes += 1
                return default
            except Exception:
                # Pickling the job or unpickling the reply failed: whole messages only, so the
                # worker is still in step with us.
                healthy = True
                raise
            healthy = True
            if status == "error":
                raise value
            return value
        finally:
            self._release(worker, healthy)

    async def acall(self, fn: Callable, *args, timeout: float, default: Any = None, **kwargs) -> Any:
        """``call`` from a coroutine, without blocking the event loop."""
        return await asyncio.to_thread(self.call, fn, *args, timeout=timeout, default=default, **kwargs)

    def stats(self) -> dict[str, int]:
        """Counters for metrics: jobs run, jobs cut off at their timeout, workers that died."""
        with self._lock:
            return {"calls": self.calls, "timeouts": self.timeouts, "crashes": self.crashes,
                    "workers": self._workers}

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                break
            worker.stop()
            with self._lock:
                self._workers -= 1

    # ---- workers --------------------------------------------------------------------------------
    def _acquire(self) -> _Worker:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            start_one = self._workers < self.size
            if start_one:
                self._workers += 1
        if not start_one:
            return self._idle.get()
        try:
            return _Worker(self._ctx)
        except BaseException:
            with self._lock:
                self._workers -= 1
            raise

    def _release(self, worker: _Worker, healthy: bool) -> None:
        if healthy and not self._closed:
            self._idle.put(worker)
            return
        if healthy:
            worker.stop()
        else:
            worker.kill()
        with self._lock:
            self._workers -= 1
            replace = not self._closed
            if replace:
                self._workers += 1
        if replace:
            # Start the replacement now so that it has booted by the time it is needed.
            try:
                self._idle.put(_Worker(self._ctx))
            except BaseException:
                with self._lock:
                    self._workers -= 1
                raise

    def _warm(self, worker: _Worker, module: str) -> None:
        try:
            status, value = worker.request(("import", module), self.startup_timeout)
        except (TimeoutError, EOFError, OSError) as exc:
            raise GraderWorkerError(f"grader worker could not start or import '{module}' "
                                    f"within {self.startup_timeout:.0f} s: {type(exc).__name__}") from exc
        if status == "error":
            raise GraderWorkerError(f"grader worker cannot import '{module}': {value!r}") from value
        worker.modules.add(module)


def _default_size() -> int:
    configured = os.environ.get("PLUGRL_GRADER_WORKERS")
    if configured:
        return int(configured)
    return max(1, min(4, os.cpu_count() or 1))


_default_lock = threading.Lock()
_default: GuardedPool | None = None


def default_pool() -> GuardedPool:
    """The process-wide pool (``PLUGRL_GRADER_WORKERS`` workers, default min(4, CPUs)); a forked
    child gets its own, since the parent's pipes are not its to use."""
    global _default
    with _default_lock:
        if _default is None or _default._pid != os.getpid():
            _default = GuardedPool()
        return _default


def guarded_call(fn: Callable, *args, timeout: float, default: Any = None, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` in the default pool; ``default`` when it runs past ``timeout`` s."""
    return default_pool().call(fn, *args, timeout=timeout, default=default, **kwargs)


def grader_stats() -> dict[str, int]:
    """The default pool's counters (all zero when no guarded grade has run in this process)."""
    with _default_lock:
        pool = _default if _default is not None and _default._pid == os.getpid() else None
    return pool.stats() if pool is not None else {"calls": 0, "timeouts": 0, "crashes": 0, "workers": 0}


def timeout_count() -> int:
    """How many guarded grades in this process were cut off at their timeout (for metrics)."""
    return grader_stats()["timeouts"]


@atexit.register
def _close_default_pool() -> None:
    with _default_lock:
        pool = _default
    if pool is not None and pool._pid == os.getpid():
        pool.close()

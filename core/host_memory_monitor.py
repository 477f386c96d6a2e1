"""Samples this machine's memory in use while a run goes (driver thread), so the run logs the host
peak next to ``core/memory_plan.py``'s estimate (``perf/host_mem_peak_gib``, ``perf/host_mem_plan_gib``).

The sample is what Ray's memory monitor acts on (MemTotal - MemAvailable, whole machine), taken every
``interval`` seconds: a peak shorter than that can be missed, and other jobs on the machine count too.
"""

from __future__ import annotations

import threading

from .memory_plan import GIB, host_used_bytes


class HostMemoryMonitor:
    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.baseline = host_used_bytes()  # before the run's actors start
        self.peak = self.baseline or 0
        self._stop = threading.Event()
        self._thread = None
        if self.baseline is not None:
            self._thread = threading.Thread(target=self._run, name="plugrl-host-memory", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            used = host_used_bytes()
            if used is not None and used > self.peak:
                self.peak = used

    @property
    def available(self) -> bool:
        return self._thread is not None

    def peak_gib(self) -> float:
        return self.peak / GIB

    def peak_above_baseline_gib(self) -> float:
        return (self.peak - (self.baseline or 0)) / GIB

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

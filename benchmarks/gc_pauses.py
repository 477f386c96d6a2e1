"""Time the Python garbage collector spends while a benchmark's timed steps run.

A collection of the oldest generation walks every live container object; in a train process
(megatron-core modules, dynamo caches, autograd graphs) that can take long enough to leave the GPU
idle with no CUDA op on the host at the start of the gap (``kernel_profile.device_idle`` names the
host op at each end of a gap). ``train_throughput.py`` wraps its timed steps in ``GcPauses`` and
prints the time per step under each row, so such gaps can be told from other host work.
"""

from __future__ import annotations

import gc
import time


class GcPauses:
    """Context manager: ``seconds`` spent in collections while inside, and ``collections`` by
    generation (0, 1, 2). Uses ``gc.callbacks``, so collections from any thread count."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = [0, 0, 0]
        self._started: float | None = None

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self.collections[info["generation"]] += 1
            self._started = None

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    def per_step(self, steps: int) -> dict[str, float]:
        """The result fields a benchmark row carries: collector seconds and full (generation 2)
        collections per timed step."""
        return {"gc_s_per_step": self.seconds / steps, "gc_full_collections_per_step": self.collections[2] / steps}

"""benchmarks/gc_pauses.py: collections inside the block are counted by generation and timed;
collections before or after it are not."""

import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from gc_pauses import GcPauses  # noqa: E402


def test_counts_and_times_only_the_collections_inside():
    gc.collect()  # before: not counted
    with GcPauses() as pauses:
        garbage = [[i] for i in range(200_000)]  # something for the full collections to walk
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
        del garbage
    gc.collect()  # after: not counted
    assert pauses.collections[0] >= 1 and pauses.collections[2] >= 2
    assert sum(pauses.collections) >= 3
    assert pauses.seconds > 0
    assert pauses._callback not in gc.callbacks
    assert pauses.per_step(2) == {"gc_s_per_step": pauses.seconds / 2,
                                  "gc_full_collections_per_step": pauses.collections[2] / 2}

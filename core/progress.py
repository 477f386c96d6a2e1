"""Progress of long phases (SFT warm-up, checkpoint conversion, model build) that stays readable in a
log file: on a terminal a tqdm bar; anywhere else (a file, a pipe, a Ray actor's forwarded output) a
plain line every ``every`` seconds and at the end, never a carriage-return redraw.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TextIO


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


class Progress:
    """``update(n)`` after each unit of work; ``close()`` at the end (prints the final line)."""

    def __init__(self, total: int | None, desc: str, *, unit: str = "step", stream: TextIO | None = None,
                 every: float = 30.0, bar: bool | None = None):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.stream = stream or sys.stderr
        self.done = 0
        self.started = self._last = time.monotonic()
        self._bar = None
        if bar if bar is not None else is_terminal(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True, leave=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._line()

    def _line(self, final: bool = False) -> None:
        elapsed = time.monotonic() - self.started
        of = f"/{self.total}" if self.total else ""
        text = f"{self.desc}: {self.done}{of} {self.unit}s, {elapsed:.0f} s"
        if not final and self.total and self.done:
            text += f", about {elapsed / self.done * (self.total - self.done):.0f} s left"
        print(text + (" (done)" if final else ""), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._line(final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_iter(items: Iterable, desc: str, *, total: int | None = None, enabled: bool = True,
                  **kwargs) -> Iterator:
    """``items``, reporting each one taken as done (the consumer has finished the previous one)."""
    if not enabled:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with Progress(total, desc, **kwargs) as progress:
        first = True
        for item in items:
            if not first:
                progress.update()
            first = False
            yield item
        if not first:
            progress.update()

"""``torch.compile`` for small fused kernels with an eager fallback (used by the torch backend's slice
kernels and the ``hf`` engine's fused decode ops, in whichever process runs them).

Compiling needs Triton on CUDA or a C++ compiler on CPU, and inductor can fail on an unusual
torch build. A failure must not stop training or generation: the first one is logged once, naming
the option that skips the attempt, and every function of the same group runs eagerly from then on
in this process. Out-of-memory is not a compile failure and is re-raised.

Dynamo and inductor raise many exception types, and a compiled call may also fail for the caller's
own reasons (a wrong shape or dtype). So an exception of the compiled call is judged by running the
eager function on the same arguments (the functions here are pure): if eager fails too, eager's
error is the caller's and is raised, and the group keeps compiling; if eager succeeds, compiling
is what failed.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

logger = logging.getLogger(__name__)


class CompileGroup:
    """Functions compiled together and given up on together (``failed`` holds the first error)."""

    def __init__(self, what: str, skip_hint: str):
        self.what = what  # e.g. "fused log-probs: compiling the slice kernels"
        self.skip_hint = skip_hint  # e.g. "--compile-log-prob-slices off skips the attempt"
        self.failed: list[str] = []

    def compile(self, eager_fn: Callable, **compile_kwargs) -> Callable:
        """``torch.compile(eager_fn, **compile_kwargs)`` that falls back to ``eager_fn`` for good."""
        compiled_fn = torch.compile(eager_fn, **compile_kwargs)

        def call(*args, **kwargs):
            if self.failed:
                return eager_fn(*args, **kwargs)
            try:
                return compiled_fn(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:
                result = eager_fn(*args, **kwargs)  # raises when the arguments are at fault, not the compile
                self.failed.append(f"{type(exc).__name__}: {exc}")
                logger.warning("%s failed (%s); running them eagerly (%s)", self.what,
                               self.failed[0].splitlines()[0], self.skip_hint)
                return result

        call.__name__ = getattr(eager_fn, "__name__", "compiled")
        return call

"""Run a slime user's filter functions unchanged (``--dynamic-sampling-filter-path``,
``--buffer-filter-path``), adapted to plugrl's filter and buffer-policy contracts.

slime's contracts (reference §10):
  dynamic-sampling filter  ``fn(args, samples, **kw) -> DynamicFilterOutput | bool``
  buffer filter            ``fn(args, rollout_id, buffer, num_samples) -> list[group]``; it pops
                           what it returns from ``buffer`` itself
Used in the rollout manager; ``args`` is the run config namespace the slime function expects.
"""

from __future__ import annotations

from typing import Any, Callable

from plugrl.core.slime_compat import (  # noqa: F401 - public names stay importable here
    BUFFER,
    DYNAMIC_SAMPLING,
    _guess_kind,
    _resolve,
    slime_dynamic_sampling_filter,
)

from .fifo import FifoBuffer


class SlimeBufferPolicy(FifoBuffer):
    """A buffer policy whose ``take`` is a slime buffer filter; storage and state are FIFO's list."""

    name = "slime_buffer_filter"

    def __init__(self, fn: Callable, args: Any, n_samples_per_prompt: int | None = None, **options):
        super().__init__(n_samples_per_prompt, **options)
        self.fn = fn
        self.args = args

    def take(self, n: int, rollout_id: int | None = None) -> list:
        before = len(self._groups)
        groups = list(self.fn(self.args, rollout_id, self._groups, n))
        if len(self._groups) != before - len(groups):
            # slime's contract: the function pops what it returns; otherwise groups would repeat.
            raise RuntimeError(
                f"buffer filter {getattr(self.fn, '__qualname__', self.fn)!r} returned {len(groups)} groups "
                f"but removed {before - len(self._groups)} from the buffer; it must pop what it returns"
            )
        return groups


def slime_buffer_policy(fn_or_path: Callable | str, args: Any, n_samples_per_prompt: int | None = None,
                        **options) -> SlimeBufferPolicy:
    """A buffer policy object whose ``take`` calls slime's ``fn(args, rollout_id, buffer, num_samples)``."""
    return SlimeBufferPolicy(_resolve(fn_or_path), args, n_samples_per_prompt, **options)


def slime_filter_adapter(fn_or_path: Callable | str, args: Any, kind: str | None = None, **options):
    """Adapt a slime filter given as a function or a ``module:attr`` / ``module.attr`` path.

    ``kind`` is ``"dynamic_sampling"`` (returns a filter function) or ``"buffer"`` (returns a buffer
    policy object); when omitted it is read from the signature (four positional parameters = buffer).
    ``options`` go to the buffer policy's constructor (``n_samples_per_prompt``).
    """
    fn = _resolve(fn_or_path)
    kind = kind or _guess_kind(fn)
    if kind == BUFFER:
        return slime_buffer_policy(fn, args, **options)
    if kind == DYNAMIC_SAMPLING:
        if options:
            raise TypeError(f"a dynamic-sampling filter takes no constructor options, got {sorted(options)}")
        return slime_dynamic_sampling_filter(fn, args)
    raise ValueError(f"unknown slime filter kind {kind!r}; use '{DYNAMIC_SAMPLING}' or '{BUFFER}'")

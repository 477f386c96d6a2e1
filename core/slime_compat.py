"""slime's ``--dynamic-sampling-filter-path``: run a slime user's filter function unchanged.

slime's contract (reference §10): ``fn(args, samples, **kw) -> DynamicFilterOutput | bool``; ``args``
is the run config namespace the slime function expects. Used in the rollout manager. A slime
``--buffer-filter-path`` runs on a buffer policy that declares ``slime_adapter`` at registration (the
bundled ``fifo`` does).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from .plugin_call import calling
from .registry import import_object
from .types import FilterDecision

DYNAMIC_SAMPLING = "dynamic_sampling"
BUFFER = "buffer"


def _resolve(fn_or_path: Callable | str) -> Callable:
    # slime writes paths as module.attr; plugrl also accepts module:attr.
    return import_object(fn_or_path) if isinstance(fn_or_path, str) else fn_or_path


def _guess_kind(fn: Callable) -> str:
    """A buffer filter takes four positional parameters, a dynamic-sampling filter two."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return DYNAMIC_SAMPLING
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                  and p.default is p.empty]
    return BUFFER if len(positional) == 4 else DYNAMIC_SAMPLING


def slime_dynamic_sampling_filter(fn_or_path: Callable | str, args: Any) -> Callable:
    """Our filter ``fn(group, **options) -> FilterDecision`` around slime's ``fn(args, samples, **kw)``."""
    fn = _resolve(fn_or_path)
    label = fn_or_path if isinstance(fn_or_path, str) else getattr(fn, "__qualname__", repr(fn))

    @functools.wraps(fn)
    def plugrl_filter(group, **options):
        with calling(f"--dynamic-sampling-filter-path {label} (on a group of {len(group)} samples)"):
            return FilterDecision.coerce(fn(args, group, **options))

    return plugrl_filter

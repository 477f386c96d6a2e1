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


# slime's own functions that its guide and flag defaults name in ``--*-path`` flags, and the plugrl
# built-in that does the same: (flag dest, slime path) -> (plugrl flag dest, plugrl name). A name of
# None means "plugrl's default": the path is dropped and the flag's usual selection decides (slime's
# ``async_rm`` / ``batched_async_rm`` score with ``--rm-type``; ``generate`` is the default generation).
_HUB = "slime.rollout.filter_hub.dynamic_sampling_filters."
SLIME_BUILTINS: dict[tuple[str, str], tuple[str, str | None]] = {
    ("dynamic_sampling_filter_path", _HUB + "check_reward_nonzero_std"): ("dynamic_sampling_filter", "nonzero_std"),
    ("dynamic_sampling_filter_path", _HUB + "check_reward_nonzero_std_with_fallback"):
        ("dynamic_sampling_filter", "nonzero_std_with_fallback"),
    ("buffer_filter_path", "slime.rollout.data_source.pop_first"): ("buffer_filter", "fifo"),
    ("custom_rm_path", "slime.rollout.rm_hub.async_rm"): ("rm_type", None),
    ("custom_rm_path", "slime.rollout.rm_hub.batched_async_rm"): ("rm_type", None),
    ("custom_generate_function_path", "slime.rollout.sglang_rollout.generate"): ("custom_generate_function_path", None),
}

# What to use instead of an unknown ``slime.`` path, per flag.
_INSTEAD = {
    "dynamic_sampling_filter_path": "--dynamic-sampling-filter NAME (`plugrl plugins list --kind filter`)",
    "buffer_filter_path": "--buffer-filter NAME (`plugrl plugins list --kind buffer_policy`)",
    "custom_rm_path": "--rm-type NAME (`plugrl plugins list --kind reward`)",
}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def missing_slime_path(value: Any) -> bool:
    """Whether ``value`` is a ``slime.`` import path while slime itself is not importable."""
    import importlib.util

    return (isinstance(value, str) and value.split(":")[0].split(".")[0] == "slime"
            and importlib.util.find_spec("slime") is None)


def map_slime_builtins(args: Any) -> None:
    """Replace a known slime built-in path by plugrl's own selection (driver, while resolving defaults;
    idempotent). A path whose flag already selects something else is left for ``slime_path_problems``."""
    for (dest, path), (target, name) in SLIME_BUILTINS.items():
        value = getattr(args, dest, None)
        if not isinstance(value, str) or value.replace(":", ".") != path:
            continue
        if name is not None and getattr(args, target, None) not in (None, name):
            continue  # a contradiction: reported by slime_path_problems
        setattr(args, dest, None)
        if name is not None:
            setattr(args, target, name)


def slime_path_problems(args: Any, dests: Any) -> list[str]:
    """``slime.`` paths left in ``dests`` after ``map_slime_builtins``, when slime is not importable: an
    unknown one says what plugrl flag to use; a known one names the selection it contradicts."""
    problems = []
    for dest in dests:
        values = getattr(args, dest, None)
        for value in values if isinstance(values, list) else [values]:
            if not missing_slime_path(value):
                continue
            known = SLIME_BUILTINS.get((dest, value.replace(":", ".")))
            if known:
                target, name = known
                problems.append(f"{_flag(dest)} {value} is plugrl's {_flag(target)} {name}, but "
                                f"{_flag(target)} {getattr(args, target)} is given; keep one")
            else:
                instead = _INSTEAD.get(dest, "a function of your own (module.attr)")
                problems.append(f"{_flag(dest)} {value}: slime is not installed and plugrl has no equivalent "
                                f"of this slime function; use {instead}")
    return problems

"""A plugin's own options: the dataclass it declares at registration, filled and checked on the driver.

``register(name, obj, options=MyOptions, check_options=my_check)``: ``MyOptions`` is a dataclass whose
fields (name, type, default, ``metadata={"help": ...}``) are the plugin's options. Core fills it from
the plugin's ``--*-opt key=value`` pairs (``--rm-opt`` for rewards, ``--filter-opt`` for filters, also
YAML's ``rm_opt: {key: value}``) and, for a field with no such pair, from the run-config value of the
same name (a flag the plugin owns, e.g. ``--reward-key``). Unknown keys, wrong types and failed checks
are errors naming the plugin, the key and the allowed values; ``config_problems`` runs this on the
driver, ``--dry-run`` included, and every process builds the same object again where the plugin is
called. ``check_options(options) -> list[str]`` (or raising ``ValueError``) adds the plugin's own rules.

Rewards and filters then receive the object's fields as keyword arguments (their calling convention),
the other kinds the object itself. A plugin that declares no options type keeps the old behaviour: its
pairs are passed through unchecked, unless its function takes no such keyword (then it is an error too).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from typing import Any

# kind -> (config attribute holding the key=value pairs, the flag that gives them)
PAIR_SOURCES = {"reward": ("rm_opt", "--rm-opt"), "filter": ("filter_opt", "--filter-opt")}


class OptionsError(ValueError):
    """A plugin's options are wrong; ``problems`` lists each one (plugin, key, allowed values)."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def _describe(entry) -> str:
    return f"{entry.kind.replace('_', ' ')} '{entry.name}' (plugin {entry.plugin})"


def _type_problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit the annotation ``hint`` (None when it fits or cannot be checked)."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        return None if value in allowed else f"choose one of {', '.join(map(repr, allowed))}"
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(hint)
        if any(_type_problem(value, arm) is None for arm in arms):
            return None
        return "expected " + " or ".join(getattr(a, "__name__", str(a)) for a in arms)
    if hint is type(None):
        return None if value is None else "expected None"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else "expected a number"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "expected an integer"
    if hint in (bool, str):
        return None if isinstance(value, hint) else f"expected {'true/false' if hint is bool else 'a string'}"
    return None


def _declared(entry) -> tuple[type | None, Any]:
    from .plugin_traits import entry_trait

    return entry_trait(entry, "options"), entry_trait(entry, "check_options")


def _pairs(entry, args) -> tuple[dict, str]:
    attr, flag = PAIR_SOURCES.get(entry.kind, (None, None))
    return (dict(getattr(args, attr, None) or {}) if attr and args is not None else {}), flag or "options"


def build_options(entry, args, pairs: dict | None = None) -> Any:
    """The plugin's options object (its declared dataclass), or the plain ``pairs`` dict when it declares
    none; raises ``OptionsError`` naming the plugin, the key and what is allowed."""
    given, flag = _pairs(entry, args) if pairs is None else (dict(pairs), _pairs(entry, None)[1])
    cls, check = _declared(entry)
    if cls is None:
        return _undeclared(entry, given, flag)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    problems, values = [], {}
    for key, value in given.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"{flag} {key}={value!r}: {_describe(entry)} has no option '{key}'; allowed: "
                            f"{', '.join(fields) or '(none)'}{hint}")
            continue
        values[key] = value
    for name in fields:
        if name not in values and getattr(args, name, None) is not None:
            values[name] = getattr(args, name)  # a flag of the run config with the field's name
    for key, value in values.items():
        why = _type_problem(value, hints.get(key))
        if why:
            source = f"{flag} {key}={value!r}" if key in given else f"--{key.replace('_', '-')} {value!r}"
            problems.append(f"{source}: option '{key}' of {_describe(entry)}: {why}")
    if problems:
        raise OptionsError(problems)
    options = cls(**values)
    if check is not None:
        try:
            found = list(check(options) or [])
        except ValueError as exc:
            found = [str(exc)]
        if found:
            raise OptionsError([f"{_describe(entry)}: {p}" for p in found])
    return options


def _undeclared(entry, given: dict, flag: str) -> dict:
    """No options type: refuse keys a function cannot take (no matching keyword, no ``**kwargs``)."""
    obj = entry.obj
    if given and callable(obj) and not isinstance(obj, str):
        try:
            params = inspect.signature(obj).parameters.values()
        except (TypeError, ValueError):
            return given
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            names = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]
            bad = [k for k in given if k not in names]
            if bad:
                raise OptionsError([f"{flag} {k}={given[k]!r}: {_describe(entry)} has no option '{k}'; allowed: "
                                    f"{', '.join(names) or '(none)'}" for k in bad])
    return given


def as_kwargs(options: Any) -> dict:
    """Keyword arguments for a reward or filter function: the dataclass's fields, or the plain dict."""
    if dataclasses.is_dataclass(options):
        return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    return dict(options)


def option_problems(args, selected, plugin_set) -> list[str]:
    """Driver check (``--dry-run`` too): every selected plugin's options, as problem lines."""
    problems: list[str] = []
    for kind, _flag, name in selected:
        if name not in plugin_set.registries[kind]:
            continue  # an unknown name is reported by the name check
        try:
            build_options(plugin_set.entry(kind, name), args)
        except OptionsError as exc:
            problems.extend(exc.problems)
        except ImportError as exc:  # an options type given as "module:attr" that does not import
            problems.append(f"{kind} '{name}': its options type does not import: {exc}")
    return problems

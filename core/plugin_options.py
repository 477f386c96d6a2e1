"""A plugin's own options: the dataclass it declares at registration, filled and checked on the driver.

``register(name, obj, options=MyOptions, check_options=my_check)``: ``MyOptions`` is a dataclass whose
fields (name, type, default, ``metadata={"help": ...}``) are the plugin's options. Core fills it from
the plugin's ``--*-opt key=value`` pairs (``--rm-opt`` for rewards, ``--filter-opt`` for filters,
``--adv-opt`` for advantage estimators, ``--buffer-opt`` for buffer policies, ``--placement-opt`` for
placements, also YAML's ``rm_opt: {key: value}``) and, for a field with no
such pair, from the run-config value of the same name (a flag the plugin owns, e.g. ``--reward-key``,
or one it reads, e.g. ``--gamma``). A field whose metadata says ``RUN_SETTING: True`` is a setting core
reads too (``--kl-coef``, ``--n-samples-per-prompt``): it comes from its flag only, and a pair for it is
refused, so the plugin and core never disagree about it. Unknown keys, wrong types and failed checks
are errors naming the plugin, the key and the allowed values; ``config_problems`` runs this on the
driver, ``--dry-run`` included, and every process builds the same object again where the plugin is
called. ``check_options(options) -> list[str]`` (or raising ``ValueError``) adds the plugin's own rules.

Rewards, filters and buffer policies then receive the object's fields as keyword arguments (their
calling convention), an advantage estimator class the object itself (``build_estimator``), a placement
the object as ``request.options`` (``core/dry_run.placement_plan``). A plugin that declares no options
type keeps the old behaviour: its pairs are passed through unchecked, unless its function takes no such
keyword (then it is an error too), and an estimator class is called with the run config.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from typing import Any, ClassVar

from .protocols import AdvantageEstimator

# kind -> (config attribute holding the key=value pairs, the flag that gives them)
PAIR_SOURCES = {"reward": ("rm_opt", "--rm-opt"), "filter": ("filter_opt", "--filter-opt"),
                "advantage_estimator": ("adv_opt", "--adv-opt"), "buffer_policy": ("buffer_opt", "--buffer-opt"),
                "placement": ("placement_opt", "--placement-opt")}

# Field metadata key: the field mirrors a run setting core reads too; filled from its flag only.
RUN_SETTING = "run_setting"


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
    """(options type, check) from the registration; an estimator class may instead carry them as the
    class attributes ``options_type`` and ``check_options`` (like ``needs_critic``)."""
    from .plugin_traits import entry_trait

    cls, check = entry_trait(entry, "options"), entry_trait(entry, "check_options")
    if entry.kind == "advantage_estimator" and isinstance(entry.obj, type):
        cls = cls or getattr(entry.obj, "options_type", None)
        check = check or getattr(entry.obj, "check_options", None)
    return cls, check


def _pairs(entry, args) -> tuple[dict, str]:
    attr, flag = PAIR_SOURCES.get(entry.kind, (None, None))
    return (dict(getattr(args, attr, None) or {}) if attr and args is not None else {}), flag or "options"


def build_options(entry, args, pairs: dict | None = None, *, check: bool = True) -> Any:
    """The plugin's options object (its declared dataclass), or the plain ``pairs`` dict when it declares
    none; raises ``OptionsError`` naming the plugin, the key and what is allowed. ``check=False`` skips
    ``check_options`` (a process rebuilding options the driver checked)."""
    given, flag = _pairs(entry, args) if pairs is None else (dict(pairs), _pairs(entry, None)[1])
    cls, check_fn = _declared(entry)
    if cls is None:
        return _undeclared(entry, given, flag)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    problems, values = [], {}
    for key, value in given.items():
        if key not in fields:
            problems.append(f"{flag} {key}={value!r}: {_describe(entry)} has no option '{key}'; allowed: "
                            f"{', '.join(k for k in fields if not _run_setting(fields[k])) or '(none)'}"
                            f"{_did_you_mean(key, list(fields))}")
            continue
        if _run_setting(fields[key]):
            dashed = "--" + key.replace("_", "-")
            problems.append(f"{flag} {key}={value!r}: option '{key}' of {_describe(entry)} is the run's {dashed}, "
                            f"which core reads too: set {dashed} instead")
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
    try:
        options = cls(**values)
    except TypeError as exc:  # a field without a default that nothing filled, or a dataclass __init__ bug
        missing = [f.name for f in fields.values() if f.name not in values and f.init
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        why = (f"option(s) {', '.join(missing)} have no default and were not given; the plugin must give every "
               "field of its options dataclass a default" if missing else f"its options dataclass raised {exc}")
        raise OptionsError([f"{_describe(entry)}: {why}"]) from exc
    if check and check_fn is not None:
        try:
            found = list(check_fn(options) or [])
        except ValueError as exc:
            found = [str(exc)]
        if found:
            raise OptionsError([f"{_describe(entry)}: {p}" for p in found])
    return options


def _run_setting(field: dataclasses.Field) -> bool:
    return bool(field.metadata.get(RUN_SETTING, False))


def _did_you_mean(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


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
                                    f"{', '.join(names) or '(none)'}{_did_you_mean(k, names)}" for k in bad])
    return given


def takes_keyword(fn: Any, name: str) -> bool:
    """Whether calling ``fn(..., name=value)`` binds (True when the signature cannot be read)."""
    if isinstance(fn, str) or not callable(fn):
        return True
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is p.VAR_KEYWORD or (p.name == name and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
               for p in params)


def as_kwargs(options: Any) -> dict:
    """Keyword arguments for a reward or filter function: the dataclass's fields, or the plain dict."""
    if dataclasses.is_dataclass(options):
        return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    return dict(options)


# a kind's ``--*-path`` function, which may take the pairs in place of a selected plugin
PATH_ALTERNATIVES = {"reward": "custom_rm_path", "filter": "dynamic_sampling_filter_path",
                     "buffer_policy": "buffer_filter_path"}


def option_problems(args, selected, plugin_set) -> list[str]:
    """Driver check (``--dry-run`` too): every selected plugin's options, as problem lines; pairs for a
    kind with nothing selected (they would go nowhere, silently) are a problem too."""
    from .registry import SELECTING_FLAG

    problems: list[str] = []
    picked = {kind for kind, _flag, _name in selected}
    for kind, (attr, flag) in PAIR_SOURCES.items():
        pairs = getattr(args, attr, None)
        if pairs and kind not in picked and not getattr(args, PATH_ALTERNATIVES.get(kind, ""), None):
            shown = " ".join(f"{k}={v}" for k, v in pairs.items())
            problems.append(f"{flag} {shown}: no {kind.replace('_', ' ')} is selected, so nothing reads these "
                            f"pairs; select one with {SELECTING_FLAG[kind]} NAME or drop them")
    for kind, _flag, name in selected:
        if name not in plugin_set.registries[kind]:
            continue  # an unknown name is reported by the name check
        if kind == "filter" and getattr(args, "reward_key", None) and not takes_keyword(
                plugin_set.entry(kind, name).obj, "reward_key"):
            problems.append(f"--reward-key {args.reward_key}: filter '{name}' is called with reward_key= when "
                            "--reward-key is set, but its function takes no such keyword (nor **kwargs); add a "
                            "reward_key=None parameter to it, or drop --reward-key")
        try:
            build_options(plugin_set.entry(kind, name), args)
        except OptionsError as exc:
            problems.extend(exc.problems)
        except ImportError as exc:  # an options type given as "module:attr" that does not import
            problems.append(f"{kind} '{name}': its options type does not import: {exc}")
    return problems


def declares_options(entry) -> bool:
    """Whether the plugin declared an options type (at registration or, estimators, as a class attribute)."""
    return _declared(entry)[0] is not None


def build_plugin_input(entry, args) -> Any:
    """What a plugin called as ``fn(inputs, options)`` (a reward post-processor) receives as ``options``:
    its declared options object, filled from the run config without re-running the checks (the driver
    ran them), or the run config itself when it declares none (the older convention)."""
    return args if not declares_options(entry) else build_options(entry, args, check=False)


def build_estimator(entry, args) -> Any:
    """The advantage estimator of ``entry`` built for a run: its class called with its options object
    (filled from ``--adv-opt`` pairs and same-named flags, checked), or with the run config ``args`` when
    it declares no options type (the older convention, kept for third-party estimators)."""
    cls = entry.load()
    options_type, _check = _declared(entry)
    return cls(args if options_type is None else build_options(entry, args))


def options_from_config(kind: str, name: str, obj: Any, options_type: type, given: Any) -> Any:
    """``given`` when it already is an ``options_type`` object, else the options filled from ``given`` (a
    run config, or None) as on the driver, without the checks (the driver ran them). For a plugin that a
    caller (a test, ``plugrl.core.testing``) hands the run config (``cls(args)``, ``fn(samples, args)``)."""
    from .registry import Entry

    if isinstance(given, options_type):
        return given
    module = getattr(obj, "__module__", "") or ""
    entry = Entry(kind, name, obj, plugin=module, builtin=module.startswith("plugrl."),
                  metadata={"options": options_type})
    return build_options(entry, given, check=False)


def estimator_options(cls: type, given: Any) -> Any:
    """What an estimator class that declares ``options_type`` keeps as its options: ``given`` itself when
    it is one (``build_estimator``), else the options filled from the run config ``given``
    (``options_from_config``). Called from the estimator's ``__init__``, so code that builds
    estimators as ``cls(args)`` itself (``plugrl.core.testing``, tests) gets the same object as core's
    ``build_estimator``."""
    options_type = getattr(cls, "options_type", None)
    if options_type is None:
        return given
    return options_from_config("advantage_estimator", getattr(cls, "name", "") or cls.__name__, cls,
                               options_type, given)


class OptionsEstimator(AdvantageEstimator):
    """Base of an advantage estimator that declares options: set the class attributes ``options_type`` (a
    dataclass of the options, run-config fields it reads included) and, optionally, ``check_options``
    (a static or class method, ``options -> list[str]``), and read ``self.options.<field>``: a misspelled
    field is an ``AttributeError``, never a silent default.

    Core builds it with its options object (``build_estimator``, in the rollout manager and the train
    actors); given a run config instead (``cls(args)``, as ``plugrl.core.testing.check_estimator`` calls
    it) it fills the same object from it. ``check_config(args)`` runs ``check_options`` for callers that hold a
    run config; core's config check runs ``check_options`` itself, on the driver."""

    options_type: ClassVar[type]

    def __init__(self, options: Any = None):
        if getattr(type(self), "options_type", None) is None:
            raise TypeError(f"{type(self).__name__} subclasses OptionsEstimator but sets no options_type")
        self.options = estimator_options(type(self), options)
        super().__init__(self.options)

    @staticmethod
    def check_options(options: Any) -> list[str]:
        return []

    @classmethod
    def check_config(cls, args: Any) -> None:
        problems = cls.check_options(estimator_options(cls, args))
        if problems:
            raise ValueError("; ".join(problems))

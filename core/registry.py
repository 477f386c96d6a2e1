"""Typed name -> object registries, filled once per process by the ``plugrl_register_*`` hooks.

The loop never goes through pluggy to call a plugin: it resolves a name here and calls the object.
Unknown and duplicate names are loud errors that say what to do.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Iterable

# kind -> the hook that fills it; the kind is also the word used in messages and `--kind`.
KINDS = {
    "reward": "plugrl_register_rewards",
    "advantage_estimator": "plugrl_register_advantage_estimators",
    "filter": "plugrl_register_filters",
    "buffer_policy": "plugrl_register_buffer_policies",
    "placement": "plugrl_register_placements",
    "train_backend": "plugrl_register_train_backends",
    "rollout_backend": "plugrl_register_rollout_backends",
    "reward_post_processor": "plugrl_register_reward_post_processors",
}

# The config flag that selects each kind, for error messages.
SELECTING_FLAG = {
    "reward": "--rm-type",
    "advantage_estimator": "--advantage-estimator",
    "filter": "--dynamic-sampling-filter",
    "buffer_policy": "--buffer-filter",
    "placement": "--placement",
    "train_backend": "--train-backend",
    "rollout_backend": "--rollout-backend",
    "reward_post_processor": "--reward-post-process",
}


class PluginError(Exception):
    """Base class of plugin loading and selection errors."""


class UnknownPluginError(PluginError, LookupError):
    pass


class DuplicatePluginError(PluginError):
    pass


class UnavailablePluginError(PluginError):
    pass


class AmbiguousPluginError(DuplicatePluginError, UnknownPluginError):
    """A bare name that two plugins register: it selects nothing until qualified (``plugin:name``)."""


@dataclass(frozen=True)
class LoadFailure:
    """A plugin (entry point or built-in module) that could not be imported or registered."""

    plugin: str
    distribution: str | None
    error: str

    def describe(self) -> str:
        dist = f" (distribution {self.distribution})" if self.distribution else ""
        return f"plugin '{self.plugin}'{dist} failed to load: {self.error}"


def plugin_origin(plugin: str, builtin: bool, distribution: str | None, version: str | None) -> str:
    """Where a plugin comes from: ``plugrl built-in (module)``, ``DIST VERSION (entry point 'NAME')``, or
    ``plugin 'NAME'`` (registered in process, e.g. by a test)."""
    if builtin:
        return f"plugrl built-in ({plugin})"
    if distribution:
        return f"{distribution}{f' {version}' if version else ''} (entry point '{plugin}')"
    return f"plugin '{plugin}'"


@dataclass
class Entry:
    kind: str
    name: str
    obj: Any  # the callable/class, or a "module:attr" factory string for lazy backends
    plugin: str
    builtin: bool
    metadata: dict = field(default_factory=dict)
    distribution: str | None = None  # the installed distribution of an entry-point plugin
    version: str | None = None

    @property
    def qualifier(self) -> str:
        """What selects this entry explicitly as ``qualifier:name``: ``plugrl`` for built-ins, else the
        plugin's entry-point name (its distribution name works too)."""
        return "plugrl" if self.builtin else self.plugin

    @property
    def qualified_name(self) -> str:
        return f"{self.qualifier}:{self.name}"

    @property
    def origin(self) -> str:
        """Where the name comes from, for ``plugins list`` and duplicate errors."""
        return plugin_origin(self.plugin, self.builtin, self.distribution, self.version)

    def answers_to(self, qualifier: str) -> bool:
        norm = _normalise_dist
        return qualifier in (self.qualifier, self.plugin) or (
            self.distribution is not None and norm(qualifier) == norm(self.distribution))

    @property
    def requires(self) -> tuple[str, ...]:
        return tuple(self.metadata.get("requires", ()))

    def missing_requirements(self) -> list[str]:
        missing = _unimportable(self.requires)
        if not missing and isinstance(self.obj, str):  # then the lazy factory's own module must exist
            missing = _unimportable([self.obj.partition(":")[0]])
        return missing

    def install_hint(self, missing: list[str]) -> str:
        """The pip command that brings ``missing`` in: the extra of the distribution that registered this
        entry (plugrl's own for built-ins), else the missing packages themselves."""
        extra = self.metadata.get("extra")
        owner = "plugrl" if self.builtin else self.distribution
        return f"pip install {owner}[{extra}]" if extra and owner else f"pip install {' '.join(missing)}"

    @property
    def status(self) -> str:
        missing = self.missing_requirements()
        if missing:
            return f"unavailable: {', '.join(missing)} not importable ({self.install_hint(missing)})"
        return "ok"

    def load(self) -> Any:
        """The registered object; a ``"module:attr"`` string is imported now (lazy backends)."""
        if isinstance(self.obj, str):
            missing = self.missing_requirements()
            if missing:
                raise UnavailablePluginError(
                    f"{self.kind} '{self.name}' needs {', '.join(missing)}, which is not importable. {self.status}"
                )
            return import_object(self.obj)
        return self.obj


def _normalise_dist(name: str) -> str:
    # PEP 503: distribution names compare case-insensitively, with runs of -_. equal
    return "-".join(name.replace("_", "-").replace(".", "-").lower().split("-"))


def _unimportable(modules) -> list[str]:
    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(module)
    return missing


def import_object(path: str) -> Any:
    """Import ``module:attr`` or ``module.attr`` (slime's ``--*-path`` form)."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"'{path}' is not an import path; write it as module:attr or module.attr")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"cannot import module '{module_name}' of '{path}': {exc}") from exc
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ImportError(f"module '{module_name}' has no attribute '{attr}' (from '{path}')") from exc
    return obj


class Registry:
    """Names of one kind. ``failures`` and ``blocked`` are shared so that an unknown name can mention
    plugins that failed to load or were blocked. A name registered twice keeps both entries: the bare
    name is then ambiguous (an error naming both origins) and ``qualifier:name`` picks one."""

    def __init__(self, kind: str, failures: list[LoadFailure] | None = None, blocked: list[str] | None = None):
        self.kind = kind
        self._entries: dict[str, list[Entry]] = {}
        self.duplicates: list[str] = []
        self.failures = failures if failures is not None else []
        self.blocked = blocked if blocked is not None else []

    def add(self, name: str, obj: Any, *, plugin: str, builtin: bool, replace: bool = False,
            distribution: str | None = None, version: str | None = None, **metadata) -> None:
        """Record ``name``; ``replace=True`` replaces the same plugin's earlier registration only."""
        self.check_name(name, plugin)
        entry = Entry(self.kind, name, obj, plugin, builtin, dict(metadata), distribution, version)
        candidates = self._entries.setdefault(name, [])
        if replace:
            candidates[:] = [e for e in candidates if e.plugin != plugin]
        if candidates:
            self.duplicates.append(self._ambiguity(name, [*candidates, entry]))
        candidates.append(entry)

    def check_name(self, name: Any, plugin: str) -> None:
        """Raise ``PluginError`` unless ``name`` is a non-empty string without ':'."""
        if not isinstance(name, str) or not name or ":" in name:
            raise PluginError(f"plugin '{plugin}' registered a {self.kind} with an invalid name {name!r} "
                              "(a non-empty string without ':')")

    def _ambiguity(self, name: str, candidates: list[Entry]) -> str:
        candidates = sorted(candidates, key=lambda e: not e.builtin)  # the built-in first
        flag = SELECTING_FLAG.get(self.kind, "the selecting flag")
        origins = " and ".join(e.origin for e in candidates)
        choices = " or ".join(f"{flag} {e.qualified_name}" for e in candidates)
        blockable = [e.plugin for e in candidates if not e.builtin]
        block = f", or block one with PLUGRL_DISABLE_PLUGINS={blockable[-1]}" if blockable else ""
        return f"{self.kind} '{name}' is registered by both {origins}: select one explicitly ({choices}){block}"

    def _candidates(self, name: str) -> list[Entry]:
        if name in self._entries:
            return self._entries[name]
        qualifier, sep, bare = name.rpartition(":")
        if not sep:
            return []
        return [e for e in self._entries.get(bare, []) if e.answers_to(qualifier)]

    def __contains__(self, name: str) -> bool:
        """True when ``name`` selects exactly one entry (an ambiguous bare name does not)."""
        return len(self._candidates(name)) == 1

    def __iter__(self):
        return (e for candidates in self._entries.values() for e in candidates)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entry(self, name: str) -> Entry:
        candidates = self._candidates(name)
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            raise AmbiguousPluginError(self._ambiguity(name.rpartition(":")[2], candidates))
        raise UnknownPluginError(self.unknown_message(name))

    def get(self, name: str) -> Any:
        """Resolve a name to its object (imports lazy factories)."""
        return self.entry(name).load()

    def unknown_message(self, name: str) -> str:
        """Why ``name`` selects nothing: ambiguous (both origins named), or unknown (choices, a close
        match, plugins that failed to load or are blocked)."""
        candidates = self._candidates(name)
        if len(candidates) > 1:
            return self._ambiguity(name.rpartition(":")[2], candidates)
        names = self.names()
        parts = [f"unknown {self.kind} '{name}'."]
        parts.append(f"Available: {', '.join(names) if names else '(none)'}.")
        qualifier, sep, bare = name.rpartition(":")
        if sep and bare in self._entries:
            given = ", ".join(e.qualified_name for e in self._entries[bare])
            parts.append(f"No plugin '{qualifier}' registers '{bare}' (registered as {given}).")
        close = difflib.get_close_matches(name, names, n=1)
        if close:
            parts.append(f"Did you mean '{close[0]}'?")
        for failure in self.failures:
            parts.append(f"Note: {failure.describe()}.")
        if self.blocked:
            parts.append(f"Note: PLUGRL_DISABLE_PLUGINS blocks {', '.join(self.blocked)}; "
                         "a blocked plugin may provide it.")
        parts.append("Run `plugrl plugins list` to see every plugin.")
        return " ".join(parts)


class Registries:
    """All kinds of one plugin manager."""

    def __init__(self, failures: list[LoadFailure] | None = None, blocked: list[str] | None = None):
        self.failures: list[LoadFailure] = failures if failures is not None else []
        self.blocked: list[str] = blocked if blocked is not None else []
        self.by_kind = {kind: Registry(kind, self.failures, self.blocked) for kind in KINDS}

    def __getitem__(self, kind: str) -> Registry:
        return self.by_kind[kind]

    def all_entries(self) -> Iterable[Entry]:
        for registry in self.by_kind.values():
            yield from registry

    @property
    def duplicates(self) -> list[str]:
        return [d for r in self.by_kind.values() for d in r.duplicates]

    # Convenience accessors used by the loop.
    def resolve(self, kind: str, name: str) -> Any:
        return self.by_kind[kind].get(name)

"""Plugin manager factory and ``load_plugins()``: built-ins, entry points, failures, env controls.

Environment (forwarded to every Ray worker so all processes load the same set):
  PLUGRL_DISABLE_PLUGINS  comma-separated plugins to block: entry-point names, distribution names or
                          built-in module names (``example``, ``plugrl-example-plugin``, or a module
                          of the built-in manifest, ``builtin_plugin_modules()``); a name that matches
                          nothing is warned about
  PLUGRL_LOAD_PLUGINS     allow-list of entry-point or distribution names; empty string = none
  PLUGRL_STRICT_PLUGINS   ``1``: any load failure or duplicate name is fatal
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import os
import threading
from dataclasses import dataclass, field

import pluggy

from . import hookspecs
from .hookimpl import PROJECT
from .plugin_traits import unknown_keyword_warnings
from .registry import KINDS, LoadFailure, PluginError, Registries, _normalise_dist

ENV_VARS = ("PLUGRL_DISABLE_PLUGINS", "PLUGRL_LOAD_PLUGINS", "PLUGRL_STRICT_PLUGINS")

class PluginLoadError(PluginError):
    pass


BUILTIN_GROUP = "plugrl_builtins"


@functools.cache
def builtin_plugin_modules() -> tuple[str, ...]:
    """The built-in plugin modules, in registration order: the manifest that plugrl's own distribution
    declares as its ``plugrl_builtins`` entry point (core names no plugin module itself). Another
    distribution cannot add built-ins this way; it registers ordinary plugins (group ``plugrl``)."""
    modules: list[str] = []
    for ep in importlib.metadata.entry_points(group=BUILTIN_GROUP):
        if ep.dist is not None and _normalise_dist(ep.dist.name) != "plugrl":
            continue
        modules.extend(str(name) for name in ep.load())
    if not modules:
        raise PluginLoadError(
            f"plugrl's built-in plugins are not declared: no '{BUILTIN_GROUP}' entry point of the plugrl "
            "distribution was found (its install metadata is missing or stale); reinstall plugrl, e.g. "
            "`pip install -e .` in its checkout")
    return tuple(dict.fromkeys(modules))


def __getattr__(name: str):
    if name == "BUILTIN_PLUGINS":  # the manifest's former name, kept for importers
        return builtin_plugin_modules()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class PluginSet:
    """A plugin manager plus the registries it filled; one per process (see ``load_plugins``)."""

    pm: pluggy.PluginManager
    registries: Registries
    failures: list[LoadFailure]
    builtin_names: set[str] = field(default_factory=set)
    distributions: dict[str, str] = field(default_factory=dict)  # plugin name -> distribution
    versions: dict[str, str] = field(default_factory=dict)  # plugin name -> distribution version
    warnings: list[str] = field(default_factory=list)  # e.g. a PLUGRL_DISABLE_PLUGINS name matching nothing

    def get(self, kind: str, name: str):
        return self.registries.resolve(kind, name)

    def entry(self, kind: str, name: str):
        return self.registries[kind].entry(name)

    @property
    def problems(self) -> list[str]:
        return [f.describe() for f in self.failures] + self.registries.duplicates

    def raise_if_strict(self, strict: bool | None = None) -> None:
        if strict is None:
            strict = strict_from_env()
        if strict and self.problems:
            raise PluginLoadError("plugin problems (PLUGRL_STRICT_PLUGINS=1):\n  " + "\n  ".join(self.problems)
                                  + "\nFix or uninstall them, block them with PLUGRL_DISABLE_PLUGINS=NAME, "
                                  "or unset PLUGRL_STRICT_PLUGINS to only warn")


def strict_from_env() -> bool:
    return os.environ.get("PLUGRL_STRICT_PLUGINS", "") not in ("", "0")


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


class _Blocklist:
    """PLUGRL_DISABLE_PLUGINS: matches entry-point, distribution and built-in module names, and
    remembers what it blocked (for "unknown name" hints) and which of its names matched nothing."""

    def __init__(self, names: list[str]):
        self.names = names
        self.used: set[str] = set()
        self.blocked: list[str] = []  # descriptions of blocked plugins

    def blocks(self, *candidates: str | None) -> bool:
        for name in self.names:
            if any(c is not None and (name == c or _normalise_dist(name) == _normalise_dist(c)) for c in candidates):
                self.used.add(name)
                return True
        return False

    def warnings(self, known: list[str], registries: Registries) -> list[str]:
        out = []
        for name in self.names:
            if name in self.used:
                continue
            hint = ""
            providers = [e for r in registries.by_kind.values() for e in r if e.name == name]
            close = difflib.get_close_matches(name, known, n=1)
            if providers:
                hint = f"; '{name}' is a {providers[0].kind} name: block its plugin '{providers[0].plugin}'"
            elif close:
                hint = f"; did you mean '{close[0]}'?"
            out.append(f"PLUGRL_DISABLE_PLUGINS: '{name}' matches no plugin (entry point, distribution or "
                       f"built-in module){hint}")
        return out


def _allow_list_warnings(allow: list[str] | None, installed: list[str]) -> list[str]:
    """PLUGRL_LOAD_PLUGINS names that match no installed entry point or distribution: a typo there
    silently leaves a plugin out, so each one is warned about with the closest installed name."""
    out = []
    for name in allow or []:
        if any(name == n or _normalise_dist(name) == _normalise_dist(n) for n in installed):
            continue
        close = difflib.get_close_matches(name, installed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        out.append(f"PLUGRL_LOAD_PLUGINS: '{name}' matches no installed plugin (entry-point or distribution "
                   f"name; `plugrl plugins list` shows them){hint}")
    return out


def _load_entry_points(pm, failures: list[LoadFailure], distributions: dict, versions: dict,
                       blocklist: _Blocklist, known: list[str]) -> list[str]:
    """Register the ``plugrl`` entry points the environment lets in; returns warnings about the allow-list."""
    allow = _env_list("PLUGRL_LOAD_PLUGINS")
    seen: dict[str, str] = {}
    installed: list[str] = []
    for ep in importlib.metadata.entry_points(group=PROJECT):
        dist = ep.dist.name if ep.dist is not None else None
        known.extend(n for n in (ep.name, dist) if n)
        installed.extend(n for n in (ep.name, dist) if n)
        if allow is not None and ep.name not in allow and not any(
                dist and _normalise_dist(a) == _normalise_dist(dist) for a in allow):
            continue
        if blocklist.blocks(ep.name, dist):
            blocklist.blocked.append(f"{ep.name} ({dist})" if dist else ep.name)
            continue
        if ep.name in seen:
            failures.append(LoadFailure(ep.name, dist, f"entry-point name also used by distribution '{seen[ep.name]}'"))
            continue
        seen[ep.name] = dist or "?"
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # a broken plugin must never take the others down
            failures.append(LoadFailure(ep.name, dist, f"{type(exc).__name__}: {exc}"))
            continue
        unknown = _unknown_hooks(pm, plugin)
        if unknown:  # a misspelled hook in one package must not make check_pending() fail for all
            pm.unregister(plugin)
            failures.append(LoadFailure(ep.name, dist, f"unknown hook(s) {', '.join(unknown)} (misspelled?)"))
            continue
        distributions[ep.name] = dist or ""
        if ep.dist is not None and ep.dist.version:
            versions[ep.name] = ep.dist.version
    return _allow_list_warnings(allow, installed)


def _unknown_hooks(pm: pluggy.PluginManager, plugin) -> list[str]:
    names = []
    for caller in pm.get_hookcallers(plugin) or []:
        if caller.has_spec():
            continue
        impls = [i for i in caller.get_hookimpls() if i.plugin is plugin]
        if not any(i.optionalhook for i in impls):  # pluggy's HookImpl attribute (its opts dict also holds it)
            names.append(caller.name)
    return names


def _register_builtins(pm: pluggy.PluginManager, modules, failures: list[LoadFailure],
                       blocklist: _Blocklist) -> set[str]:
    names = set()
    for module_name in modules:
        if blocklist.blocks(module_name):
            blocklist.blocked.append(module_name)
            continue
        try:
            module = importlib.import_module(module_name)
            pm.register(module, name=module_name)
        except Exception as exc:
            failures.append(LoadFailure(module_name, "plugrl", f"{type(exc).__name__}: {exc}"))
            continue
        names.add(module_name)
    return names


def _register_callback(registry, plugin_set: PluginSet, plugin_name: str, calls: list):
    """The ``register`` callback a plugin receives: it records each call in ``calls``, to be added to the
    registry (with the plugin's origin) once every registration hook of that plugin ran without raising."""
    builtin = plugin_name in plugin_set.builtin_names

    def register(name, obj, *, replace: bool = False, **metadata):
        registry.check_name(name, plugin_name)  # raises inside the plugin's hook: a load failure of that plugin

        def add():
            registry.add(name, obj, plugin=plugin_name, builtin=builtin, replace=replace,
                         distribution=plugin_set.distributions.get(plugin_name) or None,
                         version=plugin_set.versions.get(plugin_name), **metadata)
            plugin_set.warnings.extend(unknown_keyword_warnings(registry.kind, name, plugin_name, metadata))

        calls.append((plugin_name, add))

    return register


def _fill_registries(plugin_set: PluginSet) -> None:
    """Call every registration hook implementation separately, so each entry records its plugin. A plugin
    whose registration hook raises is a load failure, and none of its names are registered (half of a
    plugin, e.g. its rewards without its filters, would otherwise stay selectable and shadow others).
    A duplicate name is kept and reported (``plugins check``), never a silent replacement."""
    pm = plugin_set.pm
    calls: list = []  # (plugin name, add), in hook order
    failed: set[str] = set()
    for kind, hook_name in KINDS.items():
        registry = plugin_set.registries[kind]
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            plugin_name = impl.plugin_name
            try:
                impl.function(register=_register_callback(registry, plugin_set, plugin_name, calls))
            except Exception as exc:
                failed.add(plugin_name)
                plugin_set.failures.append(
                    LoadFailure(plugin_name, plugin_set.distributions.get(plugin_name),
                                f"{hook_name} raised {type(exc).__name__}: {exc}; none of its names are registered")
                )
    for plugin_name, add in calls:
        if plugin_name not in failed:
            add()


def make_plugin_manager(
    *, entry_points: bool = True, builtins: bool = True, extra_plugins: dict | None = None
) -> PluginSet:
    """A fresh manager with registries filled. Tests pass ``entry_points=False`` for isolation and
    ``extra_plugins={name: module_or_object}`` to add plugins without installing them."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    blocklist = _Blocklist(_env_list("PLUGRL_DISABLE_PLUGINS") or [])
    failures: list[LoadFailure] = []
    distributions: dict[str, str] = {}
    versions: dict[str, str] = {}
    builtin_modules = builtin_plugin_modules() if builtins else ()
    known: list[str] = list(builtin_modules)
    allow_warnings = _load_entry_points(pm, failures, distributions, versions, blocklist, known) if entry_points else []
    builtin_names = _register_builtins(pm, builtin_modules, failures, blocklist) if builtins else set()
    for name, plugin in (extra_plugins or {}).items():
        known.append(name)
        if blocklist.blocks(name):
            blocklist.blocked.append(name)
        else:
            pm.register(plugin, name=name)
    pm.check_pending()  # a misspelled hook name in a plugin is an error, not a silent no-op
    if os.environ.get("PLUGRL_TRACE_PLUGINS"):
        pm.trace.root.setwriter(print)
        pm.enable_tracing()
    registries = Registries(failures, blocklist.blocked)
    plugin_set = PluginSet(pm, registries, failures, builtin_names, distributions, versions)
    _fill_registries(plugin_set)
    plugin_set.warnings.extend(allow_warnings + blocklist.warnings(known, registries))
    return plugin_set


_lock = threading.Lock()
_loaded: PluginSet | None = None


def load_plugins(*, strict: bool | None = None) -> PluginSet:
    """The process-wide plugin set (idempotent; every Ray actor calls it first)."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = make_plugin_manager()
        _loaded.raise_if_strict(strict)
        return _loaded


def reset_plugins() -> None:
    """Forget the cached plugin set (tests that change the environment)."""
    global _loaded
    with _lock:
        _loaded = None


def forwarded_env() -> dict[str, str]:
    """The plugin-loading environment to pass to Ray workers' ``runtime_env``."""
    return {k: os.environ[k] for k in ENV_VARS if k in os.environ}

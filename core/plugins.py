"""Plugin manager factory and ``load_plugins()``: built-ins, entry points, failures, env controls.

Environment (forwarded to every Ray worker so all processes load the same set):
  PLUGRL_DISABLE_PLUGINS  comma-separated plugin names to block (entry-point names or built-in
                          module names, e.g. ``example`` or ``plugrl.plugins.rewards.dapo``)
  PLUGRL_LOAD_PLUGINS     allow-list of entry-point or distribution names; empty string = none
  PLUGRL_STRICT_PLUGINS   ``1``: any load failure or duplicate name is fatal
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import threading
from dataclasses import dataclass, field

import pluggy

from . import hookspecs
from .hookimpl import PROJECT
from .registry import KINDS, DuplicatePluginError, LoadFailure, PluginError, Registries

ENV_VARS = ("PLUGRL_DISABLE_PLUGINS", "PLUGRL_LOAD_PLUGINS", "PLUGRL_STRICT_PLUGINS")

BUILTIN_PLUGINS = (
    "plugrl.plugins.rewards.deepscaler",
    "plugrl.plugins.rewards.math_answer",
    "plugrl.plugins.rewards.dapo",
    "plugrl.plugins.rewards.remote_rm",
    "plugrl.plugins.rewards.math_verify_reward",
    "plugrl.plugins.estimators.grpo",
    "plugrl.plugins.estimators.gspo",
    "plugrl.plugins.estimators.reinforce",
    "plugrl.plugins.estimators.rloo",
    "plugrl.plugins.estimators.ppo",
    "plugrl.plugins.estimators.cispo",
    "plugrl.plugins.estimators.dr_grpo",
    "plugrl.plugins.filters.nonzero_std",
    "plugrl.plugins.filters.fifo",
    "plugrl.plugins.filters.overlong",
    "plugrl.plugins.backends.placement",
    "plugrl.plugins.backends.registrations",
    "plugrl.plugins.backends.megatron_options",
    "plugrl.plugins.backends.megatron.bridge",
    "plugrl.plugins.backends.sglang_options",
)


class PluginLoadError(PluginError):
    pass


@dataclass
class PluginSet:
    """A plugin manager plus the registries it filled; one per process (see ``load_plugins``)."""

    pm: pluggy.PluginManager
    registries: Registries
    failures: list[LoadFailure]
    builtin_names: set[str] = field(default_factory=set)
    distributions: dict[str, str] = field(default_factory=dict)  # plugin name -> distribution

    def get(self, kind: str, name: str):
        return self.registries.resolve(kind, name)

    def entry(self, kind: str, name: str):
        return self.registries[kind].entry(name)

    @property
    def problems(self) -> list[str]:
        return [f.describe() for f in self.failures] + self.registries.duplicates

    def raise_if_strict(self, strict: bool | None = None) -> None:
        if strict is None:
            strict = os.environ.get("PLUGRL_STRICT_PLUGINS", "") not in ("", "0")
        if strict and self.problems:
            raise PluginLoadError("plugin problems (PLUGRL_STRICT_PLUGINS=1):\n  " + "\n  ".join(self.problems))


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def _load_entry_points(pm: pluggy.PluginManager, failures: list[LoadFailure], distributions: dict) -> None:
    allow = _env_list("PLUGRL_LOAD_PLUGINS")
    seen: dict[str, str] = {}
    for ep in importlib.metadata.entry_points(group=PROJECT):
        dist = ep.dist.name if ep.dist is not None else None
        if allow is not None and ep.name not in allow and dist not in allow:
            continue
        if pm.is_blocked(ep.name):
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


def _unknown_hooks(pm: pluggy.PluginManager, plugin) -> list[str]:
    names = []
    for caller in pm.get_hookcallers(plugin) or []:
        if caller.has_spec():
            continue
        impls = [i for i in caller.get_hookimpls() if i.plugin is plugin]
        if not any(i.hookimpl_opts.get("optionalhook") for i in impls):
            names.append(caller.name)
    return names


def _register_builtins(pm: pluggy.PluginManager, modules, failures: list[LoadFailure]) -> set[str]:
    names = set()
    for module_name in modules:
        if pm.is_blocked(module_name):
            continue
        try:
            module = importlib.import_module(module_name)
            pm.register(module, name=module_name)
        except Exception as exc:
            failures.append(LoadFailure(module_name, "plugrl", f"{type(exc).__name__}: {exc}"))
            continue
        names.add(module_name)
    return names


def _tolerant_register(registry, plugin_name: str, builtin: bool):
    """The ``register`` callback a plugin receives: a duplicate name is recorded (and reported by
    ``plugins check``) without stopping the plugin's other registrations."""

    def register(name, obj, *, replace: bool = False, **metadata):
        try:
            registry.add(name, obj, plugin=plugin_name, builtin=builtin, replace=replace, **metadata)
        except DuplicatePluginError:
            pass

    return register


def _fill_registries(plugin_set: PluginSet) -> None:
    """Call every registration hook implementation separately, so each entry records its plugin."""
    pm = plugin_set.pm
    for kind, hook_name in KINDS.items():
        registry = plugin_set.registries[kind]
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            plugin_name = impl.plugin_name
            register = _tolerant_register(registry, plugin_name, plugin_name in plugin_set.builtin_names)
            try:
                impl.function(register=register)
            except Exception as exc:
                plugin_set.failures.append(
                    LoadFailure(plugin_name, plugin_set.distributions.get(plugin_name),
                                f"{hook_name} raised {type(exc).__name__}: {exc}")
                )


def make_plugin_manager(
    *, entry_points: bool = True, builtins: bool = True, extra_plugins: dict | None = None
) -> PluginSet:
    """A fresh manager with registries filled. Tests pass ``entry_points=False`` for isolation and
    ``extra_plugins={name: module_or_object}`` to add plugins without installing them."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in _env_list("PLUGRL_DISABLE_PLUGINS") or []:
        pm.set_blocked(name)
    failures: list[LoadFailure] = []
    distributions: dict[str, str] = {}
    if entry_points:
        _load_entry_points(pm, failures, distributions)
    builtin_names = _register_builtins(pm, BUILTIN_PLUGINS, failures) if builtins else set()
    for name, plugin in (extra_plugins or {}).items():
        if not pm.is_blocked(name):
            pm.register(plugin, name=name)
    pm.check_pending()  # a misspelled hook name in a plugin is an error, not a silent no-op
    if os.environ.get("PLUGRL_TRACE_PLUGINS"):
        pm.trace.root.setwriter(print)
        pm.enable_tracing()
    plugin_set = PluginSet(pm, Registries(failures), failures, builtin_names, distributions)
    _fill_registries(plugin_set)
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

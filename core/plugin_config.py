"""``PluginConfig``: the run config as one backend sees it, read-only and strict.

A train or rollout backend needs most of the run's settings (learning rate, batch sizes, lengths,
precision), so its options are the run config, narrowed: core builds the train backend (in each train
actor), a rollout backend that ``accepts_run_config`` (in the rollout manager) and each backend's
``check`` / ``engine_pool`` trait (on the driver) with a ``PluginConfig`` instead of the whole config.
It exposes core's settings, the settings core derives for the actors (``DERIVED_SETTINGS``), the
``extra`` keys of ``--custom-config-path`` and the flags this plugin owns. Two reads are errors
(``OptionsError``, which ``getattr(config, name, default)`` does not swallow, unlike AttributeError):

* a flag that another plugin owns (the torch trainer reading ``--tensor-model-parallel-size``): that
  value means nothing to this plugin and is usually unset;
* a name that is no setting of the run at all, i.e. a misspelling, which a plain namespace would turn
  into the silent default of ``getattr(args, "x", default)``.

A known setting that this config does not carry (a partial config built by a test) still raises
AttributeError, so ``getattr(config, name, default)`` keeps its meaning there. Ownership and the
known names come from the parsed config itself (``_flag_owners`` and ``_flag_dests``, recorded by
``core/config.py``), so the view works the same in a Ray actor as on the driver.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from .plugin_options import OptionsError

# Settings that core adds to the run config it hands to the actors (``core/loop.py``), besides the flags.
DERIVED_SETTINGS = frozenset({"device", "rollout_device", "engine_gpu_ids", "engine_placement"})
# Bookkeeping attributes of a parsed config (``core/config.py``); visible to every plugin.
META_SETTINGS = frozenset({"recipe", "_sources", "_flag_dests", "_flag_owners", "_implied", "_dropped"})


class PluginConfig:
    """What plugin ``name`` of ``kind`` may read of a run config (see the module docstring)."""

    __slots__ = ("_values", "_kind", "_name", "_foreign", "_known")

    def __init__(self, values: Mapping[str, Any], *, kind: str, name: str,
                 foreign: Mapping[str, tuple[str, str, str]], known: frozenset[str] | None):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_kind", kind)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_foreign", dict(foreign))
        object.__setattr__(self, "_known", known)

    @classmethod
    def for_plugin(cls, config, kind: str, name: str) -> PluginConfig:
        """The view of ``config`` (a namespace or a dict, as parsed by ``core/config.py``) for one plugin."""
        if isinstance(config, PluginConfig):  # narrowing a view again: what it may read
            values = config.to_dict()
        else:
            values = dict(config) if isinstance(config, Mapping) else dict(vars(config))
        owners = values.get("_flag_owners") or {}
        foreign = {dest: (owner[0], owner[1], owner[2]) for dest, owner in owners.items()
                   if (owner[0], owner[1]) != (kind, name)}
        dests = values.get("_flag_dests")
        known = None if dests is None else frozenset(dests) | DERIVED_SETTINGS | META_SETTINGS
        return cls(values, kind=kind, name=name, foreign=foreign, known=known)

    def __getattr__(self, attr: str) -> Any:
        # Called only when ordinary lookup fails, i.e. for every setting (the slots are found first).
        if attr.startswith("__") or attr in PluginConfig.__slots__:  # (a slot read before __init__ set it)
            raise AttributeError(attr)
        foreign = self._foreign.get(attr)
        if foreign is not None:
            kind, owner, flag = foreign
            raise OptionsError([f"{self._describe()} read '{attr}' ({flag}), a flag of the {owner} "
                                f"{kind.replace('_', ' ')}: a plugin reads core's settings and its own flags only"])
        try:
            return self._values[attr]
        except KeyError:
            pass
        if self._known is None or attr in self._known:
            raise AttributeError(f"this run config has no '{attr}'")
        close = difflib.get_close_matches(attr, [k for k in self._values if k not in self._foreign], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise OptionsError([f"{self._describe()} read '{attr}', which is no setting of this run (no flag of "
                            f"core or of this plugin, nor a derived setting){hint}"])

    def __setattr__(self, attr: str, value: Any) -> None:
        raise OptionsError([f"{self._describe()} tried to set '{attr}': the run config is read-only for a "
                            "plugin; keep derived values on the plugin itself, or use .replace(...) for a copy"])

    def __delattr__(self, attr: str) -> None:
        self.__setattr__(attr, None)

    def __reduce__(self):  # Ray and copy: rebuild from the same parts
        return (_rebuild, (self._values, self._kind, self._name, self._foreign, self._known))

    def __repr__(self) -> str:
        return f"PluginConfig({self._kind}={self._name!r}, {len(self._values)} settings)"

    def _describe(self) -> str:
        return f"{self._kind.replace('_', ' ')} '{self._name}'"

    def to_dict(self) -> dict[str, Any]:
        """The settings this plugin may read (not the other plugins' flags), as a plain dict."""
        return {k: v for k, v in self._values.items() if k not in self._foreign}

    def replace(self, **changes: Any) -> PluginConfig:
        """A copy with some settings changed (e.g. a warm-up optimizer's own learning rate); a name that
        is no setting is refused like a read."""
        for key in changes:
            if key not in self._values:
                getattr(self, key)  # raises for a foreign or unknown name
        return PluginConfig({**self._values, **changes}, kind=self._kind, name=self._name,
                            foreign=self._foreign, known=self._known)


def _rebuild(values, kind, name, foreign, known) -> PluginConfig:
    return PluginConfig(values, kind=kind, name=name, foreign=foreign, known=known)


def with_settings(config, **changes: Any):
    """``config`` with some settings changed, as a copy: ``PluginConfig.replace`` for a plugin's view,
    a new namespace for a plain one (tests build backends from ``SimpleNamespace`` configs)."""
    if isinstance(config, PluginConfig):
        return config.replace(**changes)
    from types import SimpleNamespace

    return SimpleNamespace(**{**vars(config), **changes})


def flag_owners(parser) -> dict[str, list[str]]:
    """``{dest: [kind, plugin name, flag]}`` of every plugin-owned flag and passthrough of ``parser``
    (a ``PlugrlArgumentParser``); stored on the parsed config as ``_flag_owners``."""
    from .flags import canonical_flag

    owned = parser.owned_actions()
    # a dest that a core flag also sets (--rollout-concurrency, spelled --sglang-server-concurrency by
    # the sglang backend too) is core's setting
    core_dests = {action.dest for action in parser.flag_actions() if action not in owned}
    owners = {action.dest: [kind, name, canonical_flag(action)]
              for action, (kind, name) in owned.items() if action.dest not in core_dests}
    for spec in parser.passthroughs:
        if spec.kind and spec.name:
            owners[spec.dest] = [spec.kind, spec.name, spec.prefix + "*"]
    return owners

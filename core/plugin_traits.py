"""What core knows about a plugin: the traits it declared at registration, read through the registry.

Core imports no plugin module and branches on no plugin name; where the loop, the config check or the
memory plan needs a fact about the selected plugin, it asks here. A plugin declares a trait as a
keyword of its ``register(...)`` call (stored in ``Entry.metadata``); a value written as
``"module:attr"`` in a key ending in ``TRAIT_CALLABLES`` is imported only when core asks for it.

Traits core reads (all optional; the default applies when a plugin does not declare one):

advantage_estimator  needs_critic (False), needs_ref_log_probs (False); options and check_options may also be
                     the class attributes ``options_type`` and ``check_options`` (core/plugin_options.py)
train_backend        check(config) -> list[str]     config problems, on the driver (``--dry-run`` too)
                     supplies_critic (False)         the backend computes critic values
                     parallel_sizes(config) -> ParallelSizes  TP/PP/CP/EP sizes (core/protocols.py); DP only
                                                     when absent (layout check, --dry-run, memory plan)
                     memory_model ("hf")             "megatron": bf16 params + fp32 main params and grads,
                                                     distributed optimizer, TP x PP shards (core/memory_plan.py)
                     gpu_bf16_only (False)           refuses --fp32 / --no-bf16 on GPUs (core/precision.py)
                     full_dp_steps (False)           every DP rank needs micro-batches in every optimizer
                                                     step: --global-batch-size checked against DP (core/dry_run.py)
                     default_data() -> dict          the embedded default run's files (train, eval, sft)
                     default_checkpoint() -> Path    its tiny checkpoint, built once and cached
rollout_backend      check(config) -> list[str]
                     machine_check(config) -> list[str]  what this machine lacks for the backend (a
                                                     package it launches), listed by ``--dry-run``, refused
                                                     by a run (train backends may declare it too)
                     engine_pool(config) -> str      "actors": core starts one Ray actor per engine on the
                                                     plan's bundles; "processes": the manager launches the
                                                     engines and needs their GPU ids; "external": neither
                     external_engines(config) -> list[str]  addresses of running engines (``--dry-run``)
                     drops_released_weights (False, or a fn(config) -> bool)  ``release_memory(keep_weights=False)`` frees the weights
                                                     without a host copy; the colocated loop asks for it when a
                                                     full push follows every resume (core/loop.py, memory plan)
filter               check(config) -> list[str]     config problems of the run with this filter (nonzero_std:
                                                     groups of one), on the driver (``--dry-run`` too)
buffer_policy        slime_adapter(path, args, n)    runs a slime ``--buffer-filter-path`` on this policy
reward_post_processor check(args) -> list[str] (or declared options); idle_flags (dests that do nothing unless
                     it is selected)
any kind             commands {"name": "module:function"}  ``plugrl NAME`` subcommands (core/plugin_commands.py)
                     options (a dataclass type), check_options(options) (see core/plugin_options.py)

A backend's ``check`` and ``engine_pool`` receive its ``PluginConfig`` view of the run config (core's
settings and its own flags, ``core/plugin_config.py``); the backends themselves are built with the same view.
"""

from __future__ import annotations

from typing import Any

from .registry import UnknownPluginError, import_object

# The keywords a ``register(...)`` call may pass, by kind (the traits above plus what every kind may
# declare); any other keyword is a load warning naming the closest one, since a misspelled trait would
# otherwise be ignored without a word.
COMMON_KEYWORDS = ("options", "check_options", "requires", "extra", "description", "commands")
REGISTER_KEYWORDS = {
    "reward": ("batched",),
    "advantage_estimator": ("needs_critic", "needs_ref_log_probs"),
    "filter": ("check",),
    "buffer_policy": ("slime_adapter",),
    "placement": (),
    "train_backend": ("check", "machine_check", "supplies_critic", "parallel_sizes", "memory_model", "gpu_bf16_only",
                      "full_dp_steps", "default_data", "default_checkpoint"),
    "rollout_backend": ("check", "machine_check", "engine_pool", "external_engines", "drops_released_weights"),
    "reward_post_processor": ("check", "idle_flags"),
}


def unknown_keyword_warnings(kind: str, name: str, plugin: str, metadata: dict) -> list[str]:
    """One line per ``register`` keyword that ``kind`` does not read (see ``REGISTER_KEYWORDS``)."""
    import difflib

    known = [*COMMON_KEYWORDS, *REGISTER_KEYWORDS.get(kind, ())]
    out = []
    for key in metadata:
        if key in known:
            continue
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; a {kind.replace('_', ' ')} may declare: {', '.join(known)}"
        out.append(f"plugin '{plugin}' registered {kind.replace('_', ' ')} '{name}' with keyword '{key}', which "
                   f"plugrl does not read{hint}")
    return out


# Traits whose value may be a "module:attr" string imported on first use.
TRAIT_CALLABLES = ("check", "machine_check", "engine_pool", "parallel_sizes", "external_engines", "default_data", "default_checkpoint",
                   "slime_adapter", "options", "check_options")


def _plugin_set(plugin_set):
    if plugin_set is not None:
        return plugin_set
    from .plugins import load_plugins

    return load_plugins()


def trait(kind: str, name: str | None, key: str, default: Any = None, plugin_set=None) -> Any:
    """The trait ``key`` that plugin ``name`` of ``kind`` declared, or ``default`` (also for an unknown
    or unset name: the config check reports those)."""
    if not name:
        return default
    try:
        entry = _plugin_set(plugin_set).entry(kind, name)
    except UnknownPluginError:
        return default
    return entry_trait(entry, key, default)


def entry_trait(entry, key: str, default: Any = None) -> Any:
    """The trait ``key`` of one registry entry (a ``"module:attr"`` callable is imported now)."""
    value = entry.metadata.get(key, default)
    # a trait may be a plain value ("actors") or a callable given as "module:attr": only the latter imports
    if key in TRAIT_CALLABLES and isinstance(value, str) and (":" in value or "." in value):
        value = import_object(value)
    return value


def drops_released_weights(args, plugin_set=None) -> bool:
    """Whether the colocated loop releases the engines' weights without a host copy: the rollout
    backend can, and every resume is followed by a full push (``--update-weights-interval 1``, no
    ``--async``, whose generations may run between pushes)."""
    name = getattr(args, "rollout_backend", None)
    drops = trait("rollout_backend", name, "drops_released_weights", False, plugin_set)
    if callable(drops):  # it depends on the backend's own flags (SGLang: no --sglang-enable-weights-cpu-backup)
        drops = drops(plugin_view(args, "rollout_backend", name))
    return (bool(drops)
            and int(getattr(args, "update_weights_interval", 1) or 1) == 1
            and not getattr(args, "async_train", False))


def train_trait(args, key: str, default: Any = None, plugin_set=None) -> Any:
    """A trait of the selected ``--train-backend``."""
    return trait("train_backend", getattr(args, "train_backend", None), key, default, plugin_set)


def rollout_trait(args, key: str, default: Any = None, plugin_set=None) -> Any:
    """A trait of the selected ``--rollout-backend``."""
    return trait("rollout_backend", getattr(args, "rollout_backend", None), key, default, plugin_set)


def external_engines(args, plugin_set=None) -> list[str]:
    """The running engines the selected rollout backend was given (its ``external_engines`` trait), else []."""
    declared = rollout_trait(args, "external_engines", None, plugin_set)
    return list(declared(plugin_view(args, "rollout_backend", args.rollout_backend)) or []) if declared else []


def plugin_view(args, kind: str, name: str):
    """What plugin ``name`` of ``kind`` is given of the run config: a strict read-only view
    (``core/plugin_config.py``)."""
    from .plugin_config import PluginConfig

    return PluginConfig.for_plugin(args, kind, name)


def engine_pool(args, plugin_set=None) -> str:
    """How the selected rollout backend's engines are started (see the module docstring)."""
    pool = rollout_trait(args, "engine_pool", "processes", plugin_set)
    pool = pool(plugin_view(args, "rollout_backend", args.rollout_backend)) if callable(pool) else pool
    if pool not in ("actors", "processes", "external"):
        raise ValueError(f"rollout backend '{args.rollout_backend}' declared engine_pool {pool!r}; "
                         "it must be 'actors', 'processes' or 'external'")
    return pool


def parallel_sizes(args, plugin_set=None):
    """The selected train backend's model-parallel sizes (its ``parallel_sizes(config)`` trait, given
    its view of the config), or all 1 when it declares none."""
    from .protocols import ParallelSizes

    declared = train_trait(args, "parallel_sizes", None, plugin_set)
    if declared is None:
        return ParallelSizes()
    sizes = declared(plugin_view(args, "train_backend", args.train_backend))
    if not isinstance(sizes, ParallelSizes):
        raise TypeError(f"train backend '{args.train_backend}': parallel_sizes() returned {type(sizes).__name__}, "
                        "not plugrl.core.protocols.ParallelSizes")
    return sizes


def backend_problems(args, plugin_set=None) -> list[str]:
    """The selected train and rollout backends' own config checks (driver side, ``--dry-run`` too)."""
    return _backend_checks(args, "check", plugin_set)


def backend_machine_problems(args, plugin_set=None) -> list[str]:
    """The selected backends' ``machine_check`` problems (what this machine lacks; the debug modes skip
    the backend they do not use)."""
    return _backend_checks(args, "machine_check", plugin_set, skip_unused=True)


def _backend_checks(args, key: str, plugin_set=None, *, skip_unused: bool = False) -> list[str]:
    """The problems the selected train and rollout backends' ``key`` trait reports; ``skip_unused``: not
    for the backend a debug mode leaves idle (``--debug-rollout-only``: the trainer, and vice versa)."""
    problems: list[str] = []
    for kind, unused in (("train_backend", "debug_rollout_only"), ("rollout_backend", "debug_train_only")):
        if skip_unused and getattr(args, unused, False):
            continue
        name = getattr(args, kind, None)
        check = trait(kind, name, key, None, plugin_set)
        if check is not None:
            problems.extend(_run_check(check, args, kind, name))
    return problems


def _run_check(check, args, kind: str, name: str) -> list[str]:
    """A plugin's ``check``, given its view of the config; a read the view refuses is a problem too."""
    from .plugin_options import OptionsError

    try:
        return list(check(plugin_view(args, kind, name)))
    except OptionsError as exc:
        return list(exc.problems)


def selected_checks(args, selected, kinds, plugin_set=None) -> list[str]:
    """The declared ``check(args)`` problems of the selected plugins of ``kinds`` (``selected``: the
    config's (kind, flag, name) picks)."""
    problems: list[str] = []
    for kind, _flag, name in selected:
        check = trait(kind, name, "check", None, plugin_set) if kind in kinds else None
        if check is not None:
            problems.extend(_run_check(check, args, kind, name))
    return problems


def idle_flag_problems(args, selected, plugin_set=None) -> list[str]:
    """A flag a plugin declared in ``idle_flags`` (it does nothing unless the plugin is selected), given
    while that plugin is not selected."""
    from .registry import SELECTING_FLAG

    picked = {(kind, name) for kind, _flag, name in selected}
    problems = []
    for entry in _plugin_set(plugin_set).registries.all_entries():
        if (entry.kind, entry.name) in picked:
            continue
        for dest in entry.metadata.get("idle_flags", ()):
            if getattr(args, dest, None) is not None:
                problems.append(f"--{dest.replace('_', '-')} has no effect without {SELECTING_FLAG[entry.kind]} "
                                f"{entry.name}")
    return problems


def default_run_provider(plugin_set=None):
    """The train backend entry that supplies the embedded default run (``default_data`` and
    ``default_checkpoint``); an error when no loaded plugin declares them."""
    plugin_set = _plugin_set(plugin_set)
    for entry in plugin_set.registries["train_backend"]:
        if "default_data" in entry.metadata and "default_checkpoint" in entry.metadata:
            return entry
    raise UnknownPluginError("no loaded train backend declares the embedded default run (default_data, "
                             "default_checkpoint); pass --prompt-data and --hf-checkpoint, or --recipe")


def default_data(plugin_set=None) -> dict:
    """``{"train": path, "eval": path, "sft": path}`` of the embedded default run."""
    entry = default_run_provider(plugin_set)
    return trait("train_backend", entry.name, "default_data", None, plugin_set)()


def default_checkpoint(plugin_set=None):
    """The embedded default run's tiny checkpoint directory (built on first use)."""
    entry = default_run_provider(plugin_set)
    return trait("train_backend", entry.name, "default_checkpoint", None, plugin_set)()

"""The run configuration of ``plugrl train``: flags, ``--config`` YAML, ``--recipe`` presets, derived
defaults and validation. Runs on the driver only, before any Ray actor or GPU is touched.

Precedence: flag defaults < recipe < YAML < command line. ``parse_config`` returns the resolved
``argparse.Namespace`` (slime's flag names as dests); ``validate_config`` checks it against the
plugin registries and raises one ``ConfigError`` listing every problem, each naming the flag and the
fix; ``config_to_dict`` gives the YAML/JSON form, which ``--config`` reads back.

The embedded default run is the ``tiny-default`` recipe (``plugrl train`` with no data adds
``--recipe tiny-default``; see ``plugrl.core.train_cli``).
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import time
from pathlib import Path
from typing import Any

from .flags import (
    DEFAULT_BUFFER_POLICY,
    META_KEYS,
    SECRET_DESTS,
    ConfigError,
    Layer,
    PlugrlArgumentParser,
    ReplaceAppendAction,
    add_core_flags,
    below_minimum,
    canonical_flag,
    check_reserved,
    cli_flags,
    passthrough_words,
    read_layer,
    read_yaml,
)
from .plugin_config import flag_owners
from .precision import precision_problems
from .registry import SELECTING_FLAG, PluginError, import_object
from .slime_compat import map_slime_builtins, slime_path_problems

__all__ = [
    "DEFAULT_RECIPE",
    "RECIPES",
    "ConfigError",
    "build_parser",
    "config_to_dict",
    "parse_config",
    "recipe_values",
    "resolve_defaults",
    "resolve_owned_flags",
    "validate_config",
]


# name -> flag values (dests), or a zero-argument callable returning them, or the "module:attr" path of
# one (imported only when the recipe is used, so recipes may compute paths of bundled files).
DEFAULT_RECIPE = "tiny-default"
RECIPES: dict[str, Any] = {
    DEFAULT_RECIPE: "plugrl.core.train_cli:tiny_default_values",
    # slime's Qwen3-4B guide on 8 GPUs (plugrl.core.recipes; docs/qwen3-4b-guide.md)
    "qwen3-4b-8xh100": "plugrl.core.recipes:qwen3_4b_8xh100",
    "qwen3-4b-8xh100-decoupled": "plugrl.core.recipes:qwen3_4b_8xh100_decoupled",
    "qwen3-4b-8xh100-async": "plugrl.core.recipes:qwen3_4b_8xh100_async",
    "qwen3-4b-8xh100-dynamic-sampling": "plugrl.core.recipes:qwen3_4b_8xh100_dynamic_sampling",
    "qwen3-4b-8xh100-fp8": "plugrl.core.recipes:qwen3_4b_8xh100_fp8",
}

DEFAULT_BACKENDS = {"train_backend": "torch", "rollout_backend": "hf"}
CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "lr_decay_style": ("constant", "linear", "cosine"),
    "reward_error": ("zero", "raise"),
    "loss_type": ("policy_loss", "sft_loss", "custom_loss"),
    "kl_loss_type": ("k1", "k2", "k3", "low_var_kl"),
    "wandb_mode": ("online", "offline", "disabled"),
}
# integer flags that must be >= 1 when given
POSITIVE_FLAGS = ("rollout_batch_size", "n_samples_per_prompt", "over_sampling_batch_size", "n_samples_per_eval_prompt",
                  "update_weights_interval", "rollout_concurrency", "micro_batch_size", "num_epoch", "save_interval",
                  "log_interval", "rollout_max_response_len", "global_batch_size",
                  "num_steps_per_rollout", "max_tokens_per_gpu", "sft_warmup_batch_size")
SECRET_FLAGS = tuple(f"--{dest.replace('_', '-')}" for dest in SECRET_DESTS)  # never shown in a message
PATH_FLAGS = (
    "custom_rm_path",
    "dynamic_sampling_filter_path",
    "buffer_filter_path",
    "custom_generate_function_path",
    "custom_reward_post_process_path",
    "custom_advantage_function_path",
    "custom_loss_function_path",
    "custom_pg_loss_reducer_function_path",
)


# --------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------


def _default_plugin_set():
    from .plugins import load_plugins

    return load_plugins()


def build_parser(plugin_set=None) -> PlugrlArgumentParser:
    """Every flag: core groups, then each plugin's groups (``plugrl_add_options``)."""
    plugin_set = plugin_set or _default_plugin_set()
    parser = PlugrlArgumentParser(
        prog="plugrl train",
        usage="plugrl train [--config RUN.YAML] [--recipe NAME] [--FLAG VALUE ...]",
        description="RL post-training (GRPO and relatives). Flags are slime's; --config YAML and --recipe "
        "presets set the same values (command line > YAML > recipe > defaults). A switch that a recipe or YAML "
        "turns on is turned off with --no-<switch> (e.g. --no-colocate).",
    )
    add_core_flags(parser)
    try:
        plugin_set.pm.hook.plugrl_add_options(parser=parser)
    except argparse.ArgumentError as exc:
        raise ConfigError(f"a plugin's plugrl_add_options defines a flag twice: {exc}") from exc
    return parser


# Flags other trainers have, where the closest spelling is not what is meant (--resume is not --recipe).
MEANT_FLAGS = {"--resume": "--load DIR (the --save directory to resume from)",
               "--resume-from-checkpoint": "--load DIR (the --save directory to resume from)",
               "--output_dir": "--output-dir", "--model": "--hf-checkpoint", "--model-path": "--hf-checkpoint"}


def recipe_values(name: str) -> dict:
    """The flag values of recipe ``name`` (a dict, a callable returning one, or its import path)."""
    if name not in RECIPES:
        close = difflib.get_close_matches(name, list(RECIPES), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"--recipe: unknown recipe '{name}'. Available: {', '.join(sorted(RECIPES))}.{hint}")
    values = RECIPES[name]
    if isinstance(values, str):
        values = import_object(values)
    if callable(values):
        values = values()
    if not isinstance(values, dict):
        raise ConfigError(f"--recipe {name}: the recipe must give a dict of flag values, got {type(values).__name__}")
    return values


RECIPE_SOURCE = "recipe:"  # args._sources value prefix of a flag the recipe set
YAML_SOURCE = "yaml:"  # ... of a flag the --config file set (followed by the file's path)


def _recipe_layer(parser: PlugrlArgumentParser, name: str) -> Layer:
    return read_layer(parser, recipe_values(name), f"recipe '{name}'", f"{RECIPE_SOURCE}{name}")


def _from_recipe(args: argparse.Namespace, flag: str) -> bool:
    """Whether ``flag``'s value came from ``--recipe`` (not the command line or ``--config``)."""
    return (getattr(args, "_sources", None) or {}).get(flag, "").startswith(RECIPE_SOURCE)


# --------------------------------------------------------------------------------------------------
# parse_config
# --------------------------------------------------------------------------------------------------


def _pre_parse(argv: list[str]) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    pre.add_argument("--recipe")
    return pre.parse_known_args(argv)[0]


def _check_one_config(argv: list[str]) -> None:
    """One ``--config`` per run: argparse would keep only the last file and drop the others without a word."""
    words = argv[:argv.index("--")] if "--" in argv else argv
    files = [w.split("=", 1)[1] if "=" in w else (words[i + 1] if i + 1 < len(words) else "")
             for i, w in enumerate(words) if w == "--config" or w.startswith("--config=")]
    if len(files) > 1:
        raise ConfigError(f"--config given {len(files)} times ({', '.join(files)}): a run reads one config file; "
                          "merge them into one (or give the extra values as flags, which override the file)")


def _negated_switches(parser: PlugrlArgumentParser, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """``--no-<switch>`` for any on-switch without its own ``--no-`` form: a recipe or YAML may turn a
    switch on (``colocate: true``), and the command line must be able to override it. Returns argv
    without those words and {canonical flag: dest}."""
    kept, off = [], {}
    for i, word in enumerate(argv):
        if word == "--":
            kept += argv[i:]
            break
        name = word.split("=", 1)[0]
        action = None
        if name.startswith("--no-") and "=" not in word and parser.action_for_option(name) is None:
            action = parser.action_for_option("--" + name[len("--no-"):])
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreConstAction)) and action.const is True:
            off[canonical_flag(action)] = action.dest
        else:
            kept.append(word)
    return kept, off


def parse_config(argv: list[str], plugin_set=None) -> argparse.Namespace:
    """Flags + ``--config`` YAML + ``--recipe`` -> the resolved namespace (driver; never touches GPUs).

    Raises ``ConfigError`` for unknown YAML keys or flags, and for flags of a plugin other than the
    one selected; argparse itself exits on ``--help`` and on malformed flag values.
    """
    argv = list(argv)
    plugin_set = plugin_set or _default_plugin_set()
    parser = build_parser(plugin_set)
    _check_one_config(argv)
    pre = _pre_parse(argv)
    yaml_raw = read_yaml(pre.config, "--config") if pre.config else {}
    yaml_layer = read_layer(parser, yaml_raw, pre.config or "", f"{YAML_SOURCE}{pre.config}")
    argv, switched_off = _negated_switches(parser, argv)
    given = cli_flags(parser, argv) | set(switched_off)

    recipe = pre.recipe or yaml_raw.get("recipe")
    layers = ([_recipe_layer(parser, recipe)] if recipe else []) + [yaml_layer]
    for layer in layers:
        parser.set_defaults(**layer.values)

    args, extras = parser.parse_known_args(argv)
    for dest in switched_off.values():
        setattr(args, dest, False)
    cli_passthrough, unknown = passthrough_words(parser, extras)
    if unknown:
        word = unknown[0].split("=")[0]
        close = [MEANT_FLAGS[word]] if word in MEANT_FLAGS else difflib.get_close_matches(
            word, parser.all_flag_names(), n=1)
        hint = f" Did you mean {close[0]}?" if close else " See `plugrl train --help`."
        raise ConfigError(f"unrecognized arguments: {' '.join(unknown)}.{hint}")

    sources: dict[str, str] = {}
    passthrough: dict[str, dict] = {spec.dest: {} for spec in parser.passthroughs}
    cli_layer = Layer("cli", flags=given, passthrough=cli_passthrough)
    for layer in layers + [cli_layer]:
        sources.update(dict.fromkeys(layer.flags, layer.source))
        for dest, values in layer.passthrough.items():
            passthrough[dest].update(values)
            prefix = next(s.prefix for s in parser.passthroughs if s.dest == dest)
            sources.update({prefix + k.replace("_", "-"): layer.source for k in values})
    check_reserved(parser, passthrough)
    for dest, values in passthrough.items():
        setattr(args, dest, values)

    args.recipe = recipe
    args._sources = sources
    args._yaml_values = dict(yaml_layer.values)  # dest -> value as the --config file gives it
    args._flag_dests = sorted({a.dest for a in parser.flag_actions()} | set(passthrough))
    args._flag_owners = flag_owners(parser)  # what each plugin may read of the config (core/plugin_config.py)
    if args.custom_config_path:
        _set_extra(args, read_yaml(args.custom_config_path, "--custom-config-path"), "--custom-config-path")
    _set_extra(args, yaml_layer.extra, f"{pre.config}: extra")
    resolve_owned_flags(parser, args)
    resolve_defaults(args, plugin_set)
    return args


def _set_extra(args: argparse.Namespace, values: dict, where: str) -> None:
    """Extra attributes for custom functions (slime's ``--custom-config-path``); flags are refused."""
    for key, value in values.items():
        if key in args._flag_dests or key in META_KEYS:
            raise ConfigError(f"{where}: '{key}' is a flag; set it with --config or on the command line")
        setattr(args, key, value)


# --------------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------------


def _kind_word(kind: str) -> str:
    return "backend" if kind.endswith("_backend") else kind.replace("_", " ")


def _is_set(action: argparse.Action, value: Any) -> bool:
    return value is not None and not (action.nargs == 0 and value is False)


def resolve_owned_flags(parser: PlugrlArgumentParser, args: argparse.Namespace) -> None:
    """Plugin-owned flags select their plugin (Megatron flags -> ``--train-backend megatron``); with
    another plugin selected they are an error (unless a recipe set them: see below). Records
    ``args._implied = {kind: [flags]}``."""
    _drop_replaced_recipe_values(parser, args)
    used: dict[tuple[str, str], list[str]] = {}
    for action, owner in parser.owned_actions().items():
        flag = canonical_flag(action)
        if flag in args._sources and _is_set(action, getattr(args, action.dest, None)):
            used.setdefault(owner, []).append(flag)
    for spec in parser.passthroughs:
        if spec.kind and spec.name:
            for key in getattr(args, spec.dest) or {}:
                used.setdefault((spec.kind, spec.name), []).append(spec.prefix + key.replace("_", "-"))
    by_kind: dict[str, dict[str, list[str]]] = {}
    for (kind, name), flags in used.items():
        by_kind.setdefault(kind, {})[name] = flags
    args._implied = {}
    for kind, names in by_kind.items():
        selecting = SELECTING_FLAG.get(kind, "--" + kind.replace("_", "-"))
        action = parser.action_for_option(selecting)
        if action is None:
            continue
        dest, selected = action.dest, getattr(args, action.dest, None)
        if isinstance(action, ReplaceAppendAction):  # a list of names (--reward-post-process): add them
            setattr(args, dest, list(selected or []) + [n for n in names if n not in (selected or [])])
            args._implied[kind] = [flag for flags in names.values() for flag in flags]
            continue
        if selected is None and len(names) > 1:
            described = "; ".join(f"{', '.join(f)} ({n})" for n, f in names.items())
            raise ConfigError(
                f"flags of different {_kind_word(kind)}s were given: {described}; choose one with {selecting}"
            )
        if selected is None:
            name, flags = next(iter(names.items()))
            setattr(args, dest, name)
            args._implied[kind] = flags
            continue
        for name, flags in names.items():
            if name != selected:
                verb = "belongs" if len(flags) == 1 else "belong"
                raise ConfigError(
                    f"{', '.join(flags)} {verb} to the {name} {_kind_word(kind)}; "
                    f"drop {'it' if len(flags) == 1 else 'them'} or use {selecting} {name}"
                )


def _drop_replaced_recipe_values(parser: PlugrlArgumentParser, args: argparse.Namespace) -> None:
    """A recipe's values for a plugin the user replaced by name on the command line or in ``--config``
    (``--recipe qwen3-4b-8xh100 --rollout-backend hf`` drops the recipe's ``--sglang-*`` values) are
    dropped rather than refused: they were the recipe's, not the user's. Records them in
    ``args._dropped`` (``--dry-run`` lists them)."""
    sources = args._sources

    def replaced(kind: str, name: str) -> bool:
        selecting = SELECTING_FLAG.get(kind, "--" + kind.replace("_", "-"))
        action = parser.action_for_option(selecting)
        if action is None or isinstance(action, ReplaceAppendAction):
            return False
        selected = getattr(args, action.dest, None)
        by_user = selecting in sources and not _from_recipe(args, selecting)
        return by_user and selected is not None and selected != name

    dropped: list[str] = []
    for action, (kind, name) in parser.owned_actions().items():
        flag = canonical_flag(action)
        if _from_recipe(args, flag) and replaced(kind, name):
            setattr(args, action.dest, False if action.nargs == 0 else None)
            del sources[flag]
            dropped.append(flag)
    for spec in parser.passthroughs:
        if spec.kind and spec.name and replaced(spec.kind, spec.name):
            values = getattr(args, spec.dest) or {}
            for key in list(values):
                flag = spec.prefix + key.replace("_", "-")
                if _from_recipe(args, flag):
                    del values[key], sources[flag]
                    dropped.append(flag)
    args._dropped = dropped


def resolve_defaults(args: argparse.Namespace, plugin_set=None) -> None:
    """Derived defaults (slime's rules); idempotent, leaves inconsistent values for validation."""
    if not args.output_dir:
        args.output_dir = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    args.rm_opt = dict(args.rm_opt or {})
    if args.rm_url:
        args.rm_opt.setdefault("url", args.rm_url)
    args.filter_opt = dict(args.filter_opt or {})
    args.adv_opt = dict(args.adv_opt or {})
    args.buffer_opt = dict(args.buffer_opt or {})
    args.placement_opt = dict(args.placement_opt or {})
    args.apply_chat_template_kwargs = dict(args.apply_chat_template_kwargs or {})
    args.reward_post_process = list(args.reward_post_process or [])
    from .debug_modes import drop_recipe_trainer_paths

    drop_recipe_trainer_paths(args)  # --debug-rollout-only over a recipe's --load/--save: no trainer state
    args.rollout_sample_hook_path = list(args.rollout_sample_hook_path or [])
    for dest, default in DEFAULT_BACKENDS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    if args.actor_num_gpus_per_node is None:
        args.actor_num_gpus_per_node = 1
    if args.placement is None:
        decoupled = args.rollout_num_gpus is not None and not args.colocate
        args.placement = "decoupled" if decoupled else "colocate"
    if args.rollout_num_gpus is None and (args.colocate or planned_colocation(args, plugin_set)):
        args.rollout_num_gpus = args.actor_num_nodes * args.actor_num_gpus_per_node
    offload = bool(args.colocate or args.offload)
    for dest in ("offload_train", "offload_rollout"):
        if getattr(args, dest) is None:
            setattr(args, dest, offload)
    if args.eps_clip_high is None:
        args.eps_clip_high = args.eps_clip
    for eval_dest, dest in (
        ("eval_max_response_len", "rollout_max_response_len"),
        ("eval_temperature", "rollout_temperature"),
        ("eval_top_p", "rollout_top_p"),
        ("eval_top_k", "rollout_top_k"),
        ("eval_input_key", "input_key"),
        ("eval_label_key", "label_key"),
        ("eval_reward_key", "reward_key"),
    ):
        if getattr(args, eval_dest) is None:
            setattr(args, eval_dest, getattr(args, dest))
    if args.over_sampling_batch_size is None:
        args.over_sampling_batch_size = args.rollout_batch_size
    if args.rollout_max_prompt_len is None and args.rollout_max_context_len is not None:
        args.rollout_max_prompt_len = args.rollout_max_context_len - 1
    if args.sft_warmup_lr is None:
        args.sft_warmup_lr = args.lr
    if args.sft_warmup_batch_size is None:
        args.sft_warmup_batch_size = args.rollout_batch_size
    map_slime_builtins(args)  # slime's own --*-path functions -> plugrl's built-ins (core/slime_compat.py)
    _resolve_batch(args)


def _resolve_batch(args: argparse.Namespace) -> None:
    """``global_batch_size = B·n // num_steps_per_rollout`` (one step per rollout when neither is given)."""
    if not args.rollout_batch_size or not args.n_samples_per_prompt:
        return
    total = args.rollout_batch_size * args.n_samples_per_prompt
    _fit_recipe_batch(args, total)
    steps, size = args.num_steps_per_rollout, args.global_batch_size
    if steps is None and size is None:
        args.num_steps_per_rollout, args.global_batch_size = 1, total
    elif size is None and steps > 0 and total % steps == 0:
        args.global_batch_size = total // steps
    elif steps is None and size > 0 and total % size == 0:
        args.num_steps_per_rollout = total // size


def _fit_recipe_batch(args: argparse.Namespace, total: int) -> None:
    """A recipe's ``--global-batch-size`` that the user's ``--rollout-batch-size``, ``--n-samples-per-prompt``
    or ``--num-steps-per-rollout`` no longer fits gives way: the user's steps per rollout, else the
    recipe's (one on the embedded default). A value the user gave is never changed; one that still fits is kept."""
    size, steps = args.global_batch_size, args.num_steps_per_rollout
    if not size or not _from_recipe(args, "--global-batch-size") or (total % size == 0 and steps in (None, total // size)):
        return
    if steps is None or _from_recipe(args, "--num-steps-per-rollout"):
        recipe = {k.replace("-", "_"): v for k, v in recipe_values(args.recipe).items()}
        recipe_total = int(recipe.get("rollout_batch_size") or 0) * int(recipe.get("n_samples_per_prompt") or 0)
        steps = recipe.get("num_steps_per_rollout") or (recipe_total // size if recipe_total % size == 0 else 1)
    if steps and total % steps == 0:
        args.num_steps_per_rollout, args.global_batch_size = steps, total // steps


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def validate_config(args: argparse.Namespace, plugin_set=None) -> None:
    """Every check that needs no GPU (driver); raises one ``ConfigError`` listing all problems."""
    plugin_set = plugin_set or _default_plugin_set()
    _raise(config_problems(args, plugin_set) + environment_problems(args, plugin_set))


def check_config(args: argparse.Namespace, plugin_set=None) -> None:
    """``validate_config`` without the machine checks (``--dry-run``: the values themselves)."""
    _raise(config_problems(args, plugin_set or _default_plugin_set()))


def config_problems(args: argparse.Namespace, plugin_set) -> list[str]:
    """Problems of the values themselves (names, ranges, combinations, placement, parallel layout):
    the same on every machine."""
    problems: list[str] = []
    _check_plugins(args, plugin_set, problems)
    _check_choices(args, problems)
    _check_rollout(args, problems, plugin_set)
    _check_algorithm(args, plugin_set, problems)
    _check_data_flags(args, problems)
    problems.extend(_missing_checkpoint_problems(args))
    problems.extend(_idle_setting_problems(args))
    problems.extend(_range_problems(args, plugin_set))
    _check_cluster(args, plugin_set, problems)
    _check_weight_transport(args, plugin_set, problems)
    problems += precision_problems(args)
    from .preflight import value_problems

    problems.extend(value_problems(args))  # reward limits
    if not problems:  # plugins validate a config that passed core's own checks (``--dry-run`` too)
        from .configure import configure_plugins

        problems.extend(configure_plugins(plugin_set, args))
    return problems


def environment_problems(args: argparse.Namespace, plugin_set) -> list[str]:
    """What this machine lacks to start the run: data and checkpoint paths, the selected plugins'
    packages, a CUDA device for ``--device cuda``. ``--dry-run`` reports these without failing."""
    problems: list[str] = []
    _check_requirements(args, plugin_set, problems)
    if not problems:  # a backend's machine check may import what a missing requirement lacks
        from .plugin_traits import backend_machine_problems

        problems.extend(backend_machine_problems(args, plugin_set))
    _check_paths(args, problems)
    _check_device(args, problems)
    _check_host_memory(args, plugin_set, problems)
    from .preflight import machine_problems

    problems.extend(machine_problems(args, plugin_set))  # --save, model folder, --*-path functions, data files
    return problems


def _raise(problems: list[str]) -> None:
    if problems:
        head = (
            problems[0]
            if len(problems) == 1
            else f"{len(problems)} problems in the run config:\n  - " + "\n  - ".join(problems)
        )
        raise ConfigError(head, problems)


def _selected_names(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(kind, flag, name) of every plugin the config selects by name."""
    picks = [
        ("train_backend", args.train_backend),
        ("rollout_backend", args.rollout_backend),
        ("placement", args.placement),
        ("advantage_estimator", args.advantage_estimator),
        ("filter", args.dynamic_sampling_filter),
    ]
    if not args.custom_rm_path:  # the path's function scores instead of --rm-type (core/reward_call.py)
        picks.append(("reward", args.rm_type))
    if not args.buffer_filter_path:
        picks.append(("buffer_policy", args.buffer_filter))
    picks += [("reward_post_processor", name) for name in args.reward_post_process]
    return [(kind, SELECTING_FLAG[kind], name) for kind, name in picks if name]


def _check_plugins(args, plugin_set, problems: list[str]) -> None:
    for kind, flag, name in _selected_names(args):
        registry = plugin_set.registries[kind]
        if name not in registry:
            problems.append(f"{flag}: {registry.unknown_message(name)}")
    from .plugin_options import option_problems

    selected = _selected_names(args)
    if args.debug_rollout_only:  # nothing trains: the estimator's rules (e.g. groups of two or more) do not apply
        selected = [pick for pick in selected if pick[0] not in ("advantage_estimator", "train_backend")]
    problems.extend(option_problems(args, selected, plugin_set))  # each plugin's declared options
    if args.dynamic_sampling_filter and args.dynamic_sampling_filter_path:
        problems.append("--dynamic-sampling-filter and --dynamic-sampling-filter-path both given; keep one")
    if not (args.rm_type or args.custom_rm_path) and args.loss_type == "policy_loss" and not args.debug_train_only:
        problems.append(
            "--rm-type is required (or --custom-rm-path); `plugrl plugins list --kind reward` lists rewards"
        )
    problems.extend(import_path_problems(args, (*PATH_FLAGS, "rollout_sample_hook_path")))
    problems.extend(slime_path_problems(args, (*PATH_FLAGS, "rollout_sample_hook_path")))


def import_path_problems(args, dests) -> list[str]:
    """slime's ``--*-path`` flags among ``dests`` whose values are not ``module.attr`` / ``module:attr``
    (each flag one path, or a list for a repeatable flag); shared with plugins that own such flags."""
    problems = []
    for dest in dests:
        values = getattr(args, dest, None)
        for value in values if isinstance(values, list) else [values]:
            if value and not ("." in value or ":" in value):
                problems.append(f"--{dest.replace('_', '-')} {value}: write it as module.attr or module:attr")
    return problems


def _check_requirements(args, plugin_set, problems: list[str]) -> None:
    """The selected plugins' packages must be importable here (debug modes skip the unused backend)."""
    for kind, flag, name in _selected_names(args):
        if name not in plugin_set.registries[kind]:
            continue  # reported by _check_plugins
        if (kind == "train_backend" and args.debug_rollout_only) or (
            kind == "rollout_backend" and args.debug_train_only
        ):
            continue
        entry = plugin_set.entry(kind, name)
        missing = entry.missing_requirements()
        if not missing:
            continue
        install = entry.install_hint(missing)
        implied = (args._implied.get(kind) if hasattr(args, "_implied") else None) or []
        shown = ", ".join(implied[:3]) + (f" and {len(implied) - 3} more" if len(implied) > 3 else "")
        because = f" (implied by {shown})" if implied else ""
        what = f"the {name} backend" if kind.endswith("_backend") else f"{', '.join(missing)}"
        verb = "is" if len(missing) == 1 else "are"
        problems.append(
            f"{flag} {name}{because} requires {what} ({install}): {', '.join(missing)} {verb} not importable"
        )


def _check_choices(args, problems: list[str]) -> None:
    for dest, allowed in CHOICES.items():
        value = getattr(args, dest)
        if value is not None and value not in allowed:
            problems.append(f"--{dest.replace('_', '-')} {value}: choose one of {', '.join(allowed)}")


def _positive(args, problems: list[str], *dests: str, minimum: int = 1) -> None:
    problems.extend(below_minimum(args, dests, minimum))


def _idle_buffer_problems(args) -> list[str]:
    """A buffer policy the user chose, or its pairs, without --partial-rollout: the buffer only ever holds
    the groups a rollout aborts with partial rollout (as in slime), so the choice would do nothing."""
    if args.partial_rollout:
        return []
    sources = getattr(args, "_sources", None) or {}
    chosen = args.buffer_filter != DEFAULT_BUFFER_POLICY  # a saved config.yaml names the default too
    given = [f"--buffer-filter {args.buffer_filter}" if chosen and "--buffer-filter" in sources
             and not _from_recipe(args, "--buffer-filter") else None,
             f"--buffer-filter-path {args.buffer_filter_path}" if args.buffer_filter_path else None,
             "--buffer-opt " + " ".join(f"{k}={v}" for k, v in args.buffer_opt.items()) if args.buffer_opt else None]
    given = [g for g in given if g]
    if not given:
        return []
    return [f"{' '.join(given)} without --partial-rollout: the buffer only holds the groups a rollout aborts with "
            "--partial-rollout, so the policy would never receive one; add --partial-rollout or drop "
            f"{'them' if len(given) > 1 else 'it'}"]


def _check_rollout(args, problems: list[str], plugin_set=None) -> None:
    _positive(args, problems, *_root_values(args, POSITIVE_FLAGS))
    _positive(args, problems, "num_rollout", "sft_warmup_steps", minimum=0)
    if args.rollout_batch_size is None:
        problems.append("--rollout-batch-size is required (prompts per rollout)")
    if args.max_staleness is not None and (args.max_staleness < 1 or not args.async_train):
        problems.append(f"--max-staleness {args.max_staleness}: it bounds the --async loop and must be >= 1 "
                        "(1 = one step off); add --async or drop it")
    problems.extend(_idle_buffer_problems(args))
    if args.stale_partial_rollout is not None and args.max_staleness is None:
        problems.append("--stale-partial-rollout only applies with --max-staleness")
    if args.use_fault_tolerance:
        problems.append("--use-fault-tolerance (engine restarts) is not implemented yet: a dying engine stops "
                        "the run with a message naming it; resume with --load from the last --save checkpoint")
    if args.rollout_temperature is None or not 0 < args.rollout_temperature < math.inf:
        problems.append(f"--rollout-temperature must be > 0, got {args.rollout_temperature}")
    if args.rollout_top_p is None or not 0 < args.rollout_top_p <= 1:
        problems.append(f"--rollout-top-p must be in (0, 1], got {args.rollout_top_p}")
    problems.extend(_nucleus_problems(args))
    if (
        args.rollout_batch_size
        and args.over_sampling_batch_size
        and args.over_sampling_batch_size < args.rollout_batch_size
    ):
        problems.append(
            f"--over-sampling-batch-size ({args.over_sampling_batch_size}) must be >= "
            f"--rollout-batch-size ({args.rollout_batch_size})"
        )
    if args.prompt_data and args.num_rollout is None and args.num_epoch is None:
        problems.append("give --num-rollout or --num-epoch (how long to train)")
    # a recipe's interval with `--save ''` just means no saves
    if args.save_interval is not None and not args.save and not _from_recipe(args, "--save-interval"):
        problems.append("--save-interval needs --save DIR (where to save)")
    if args.eval_interval is not None and args.eval_interval < 0:
        problems.append(f"--eval-interval must be >= 0 (0 turns eval off), got {args.eval_interval}")
    if args.eval_interval and not args.eval_prompt_data:
        problems.append("--eval-interval needs --eval-prompt-data NAME PATH (what to evaluate)")
    if args.use_dynamic_batch_size and not args.max_tokens_per_gpu:
        problems.append("--use-dynamic-batch-size needs --max-tokens-per-gpu (the packing capacity)")
    from .plugin_traits import idle_flag_problems, selected_checks

    problems.extend(idle_flag_problems(args, _selected_names(args), plugin_set))  # declared by the plugins
    problems.extend(selected_checks(args, _selected_names(args), ("reward_post_processor", "filter"), plugin_set))
    _check_batch(args, problems)


def _nucleus_problems(args) -> list[str]:
    """``--rollout-top-p < 1`` for rollouts that are trained on: the train log-probs are over the full
    vocabulary while the tokens were drawn from the nucleus, so the importance ratio would be off-policy.
    slime replays each token's nucleus in the train log-probs; plugrl's engines do not record it."""
    top_p = args.rollout_top_p
    if top_p is None or not 0 < top_p < 1 or args.debug_rollout_only:
        return []
    return [f"--rollout-top-p {top_p:g}: training rollouts must sample the full vocabulary (1.0): train log-probs "
            "are over the full vocabulary, so a nucleus would make the ratio off-policy (slime replays the rollout's "
            "nucleus; plugrl does not); use 1.0, and --eval-top-p for evaluation"]


def _check_batch(args, problems: list[str]) -> None:
    if not args.rollout_batch_size or not args.n_samples_per_prompt:
        return
    total = args.rollout_batch_size * args.n_samples_per_prompt
    steps, size = args.num_steps_per_rollout, args.global_batch_size
    product = f"--rollout-batch-size × --n-samples-per-prompt = {total}"
    if steps and total % steps:
        problems.append(f"--num-steps-per-rollout {steps} does not divide {product}; change one of them")
    elif size and total % size:
        problems.append(f"{product} must be divisible by --global-batch-size ({size}); change one of them")
    elif steps and size and steps * size != total:
        problems.append(
            f"--global-batch-size {size} × --num-steps-per-rollout {steps} must equal {product}; give only one"
        )


def _check_algorithm(args, plugin_set, problems: list[str]) -> None:
    if args.kl_coef and args.kl_loss_coef:
        problems.append("--kl-coef and --kl-loss-coef may not both be non-zero; keep one of them")
    if args.use_rollout_logprobs and args.use_tis:
        problems.append(
            "--use-rollout-logprobs and --use-tis exclude each other (TIS corrects recomputed "
            "log-probs towards the rollout's); keep one"
        )
    if args.eps_clip_c is not None and args.eps_clip_c <= 1:
        problems.append(f"--eps-clip-c must be > 1, got {args.eps_clip_c}")
    from .loss_options import loss_option_problems
    from .plugin_options import declares_options

    problems.extend(loss_option_problems(args, plugin_set))
    if args.loss_type == "custom_loss" and not args.custom_loss_function_path:
        problems.append("--loss-type custom_loss needs --custom-loss-function-path")
    elif args.loss_type == "custom_loss" or args.custom_loss_function_path:
        # slime hands the function the backend's raw (vocab-parallel) logits and its own batch layout;
        # plugrl's backends compute fp32 log-probs first and share one loss (core/losses.py).
        problems.append("--loss-type custom_loss / --custom-loss-function-path are not implemented: plugrl's "
                        "policy loss is core/losses.compute_rl_loss; change what it sees with "
                        "--custom-advantage-function-path or --custom-pg-loss-reducer-function-path")
    if args.advantage_estimator in plugin_set.registries["advantage_estimator"]:
        try:
            estimator = plugin_set.get("advantage_estimator", args.advantage_estimator)
            if not declares_options(plugin_set.entry("advantage_estimator", args.advantage_estimator)):
                estimator.check_config(args)  # the older hook; declared options are checked with the plugin's
            _check_critic(args, plugin_set, estimator, problems)
        except (ValueError, PluginError, ImportError) as exc:
            problem = str(exc)
            if problem not in problems:
                problems.append(problem)


def _check_critic(args, plugin_set, estimator, problems: list[str]) -> None:
    """An estimator that needs critic values (``needs_critic``) runs only on a train backend that
    declares ``supplies_critic``."""
    from .plugin_traits import train_trait

    entry = plugin_set.entry("advantage_estimator", args.advantage_estimator)
    needs = entry.metadata.get("needs_critic", getattr(estimator, "needs_critic", False))
    if needs and not train_trait(args, "supplies_critic", False, plugin_set):
        suppliers = [e.name for e in plugin_set.registries["train_backend"] if e.metadata.get("supplies_critic")]
        problems.append(
            f"--advantage-estimator {args.advantage_estimator} needs critic values, which --train-backend "
            f"{args.train_backend} does not supply (train backends that do: {', '.join(suppliers) or 'none'}); "
            "choose another estimator, e.g. grpo, rloo, or reinforce_plus_plus with --normalize-advantages")


def _recipe_hint(args, flag: str, usage: str) -> str:
    """For a path that came from a recipe: the recipe names the user's copy, so say how to replace it."""
    if not _from_recipe(args, flag):
        return ""
    recipe = args._sources[flag][len(RECIPE_SOURCE):]
    return f" (set by recipe '{recipe}': put your copy there or pass {flag} {usage})"


def _data_path_problem(args, flag: str, spec: str, usage: str = "PATH") -> str | None:
    path = str(spec).split("@[", 1)[0]
    if Path(path).exists():
        return None
    head, sep, _ = path.rpartition(":")
    if sep and head and Path(head).is_dir():  # dir:split of a saved DatasetDict
        return None
    return f"{flag}: {path} does not exist{_recipe_hint(args, flag, usage)}"


def _eval_paths(args) -> list[str] | None:
    """The paths of ``--eval-prompt-data`` (NAME PATH pairs or one PATH), None when malformed."""
    pairs = list(args.eval_prompt_data or [])
    if len(pairs) > 1 and len(pairs) % 2:
        return None
    return pairs[-1:] if len(pairs) == 1 else pairs[1::2]


def _check_data_flags(args, problems: list[str]) -> None:
    if _eval_paths(args) is None:
        problems.append(
            f"--eval-prompt-data takes NAME PATH pairs (or one PATH), got {len(args.eval_prompt_data)} values"
        )
    pairs = list(args.eval_prompt_data or [])
    names = pairs[0::2] if len(pairs) > 1 and not len(pairs) % 2 else []
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # their metrics (eval/NAME/...) would be logged under one name, one set overwriting the other
        problems.append(f"--eval-prompt-data names {', '.join(repeated)} more than once; give each eval set its own "
                        "name (its metrics are logged as eval/NAME/...)")
    posts = list(args.reward_post_process or [])
    twice = sorted({name for name in posts if posts.count(name) > 1})
    if twice:
        problems.append(f"--reward-post-process {', '.join(twice)} is given more than once (each would apply its "
                        "change again); give it once")
    if args.sft_warmup_steps and not args.sft_warmup_data:
        problems.append("--sft-warmup-steps needs --sft-warmup-data (prompt/response JSONL)")


def _recipe_value(args, flag: str) -> Any:
    """The value the run's recipe gives ``flag`` (None without a recipe or when it does not set it)."""
    if not args.recipe or args.recipe not in RECIPES:
        return None
    values = {str(k).lstrip("-").replace("-", "_"): v for k, v in recipe_values(args.recipe).items()}
    return values.get(flag[2:].replace("-", "_"))


# Values ``resolve_defaults`` derives when not given: dest -> the dest it is derived from. A saved config.yaml
# holds both; when the command line then changes the root (--lr over a saved file), the file's derived value
# equals the file's root, not the new one, and is still not the user's choice.
DERIVED_FROM = {"sft_warmup_lr": "lr", "sft_warmup_batch_size": "rollout_batch_size",
                "eval_max_response_len": "rollout_max_response_len", "eval_temperature": "rollout_temperature",
                "eval_top_p": "rollout_top_p", "eval_top_k": "rollout_top_k", "eval_input_key": "input_key",
                "eval_label_key": "label_key", "eval_reward_key": "reward_key"}


def _given_by_user(args, flag: str, neutral: Any = None) -> bool:
    """Whether the command line or ``--config`` set ``flag`` to something other than ``neutral`` (its default,
    or the value it derives from) and other than the recipe's value. Only such a value is the user's choice:
    a recipe's values are not, and a saved config.yaml lists every flag, defaults included (a derived value
    there equal to the file's own root value is the derivation, written out)."""
    source = (getattr(args, "_sources", None) or {}).get(flag)
    if source is None or source.startswith(RECIPE_SOURCE):
        return False
    dest = flag[2:].replace("-", "_")
    value = getattr(args, dest, None)
    if value == neutral or value is None:
        return False
    if not source.startswith(YAML_SOURCE):
        return True
    in_file = getattr(args, "_yaml_values", None) or {}
    root = DERIVED_FROM.get(dest)
    if root is not None and root in in_file and in_file[root] == value:
        return False
    return value != _recipe_value(args, flag)


def _given_as(args, flag: str, show_value: bool = True) -> str:
    """``--flag VALUE``, naming the ``--config`` file when the value came from it."""
    value = getattr(args, flag[2:].replace("-", "_"), None)
    shown = " ".join(map(str, value)) if isinstance(value, list) else str(value)
    text = f"{flag} {shown}" if show_value and not isinstance(value, bool) else flag
    source = (getattr(args, "_sources", None) or {}).get(flag, "")
    if source.startswith(YAML_SOURCE):
        text += f" (key {flag[2:].replace('-', '_')} in {source[len(YAML_SOURCE):]})"
    return text


def _idle_settings(args) -> list[tuple[str, Any, bool, str]]:
    """(flag, neutral value, whether the setting does something here, what makes it do something) of the
    settings that do nothing without another: eval data and interval, the warm-up, loss terms, packing, wandb."""
    use_tis = bool(args.use_tis)
    eval_on = bool(args.eval_prompt_data) and args.eval_interval != 0  # (a missing interval is reported once)
    warmup, wandb = bool(args.sft_warmup_steps), bool(args.use_wandb)
    return [
        # an explicit --eval-interval 0 turns eval off on purpose (e.g. over a recipe's eval set): no complaint
        ("--eval-prompt-data", None, args.eval_interval is not None, "--eval-interval N (eval runs before training "
                                                                     "and every N rollouts, as in slime)"),
        *[(f"--{dest.replace('_', '-')}", neutral, eval_on, "--eval-prompt-data NAME PATH and --eval-interval N")
          for dest, neutral in (("n_samples_per_eval_prompt", 1),
                                ("eval_max_response_len", args.rollout_max_response_len),
                                ("eval_temperature", args.rollout_temperature), ("eval_top_p", args.rollout_top_p),
                                ("eval_top_k", args.rollout_top_k), ("eval_input_key", args.input_key),
                                ("eval_label_key", args.label_key), ("eval_reward_key", args.reward_key))],
        *[(flag, neutral, warmup, "--sft-warmup-steps N") for flag, neutral in (
            ("--sft-warmup-data", None), ("--sft-warmup-lr", args.lr),
            ("--sft-warmup-batch-size", args.rollout_batch_size), ("--sft-warmup-prompt-loss-weight", 0.0))],
        ("--kl-loss-coef", 0.0, bool(args.use_kl_loss), "--use-kl-loss"),
        ("--use-unbiased-kl", False, bool(args.use_kl_loss), "--use-kl-loss"),
        # the KL estimator serves the KL loss and the reward's KL penalty (--kl-coef) alike
        ("--kl-loss-type", "k1", bool(args.use_kl_loss) or bool(args.kl_coef), "--use-kl-loss or --kl-coef"),
        # --use-rs takes its upper bound from --tis-clip unless --rs-upper-bound is given
        ("--tis-clip", 2.0, use_tis or (bool(args.use_rs) and args.rs_upper_bound is None), "--use-tis"),
        ("--tis-clip-low", 0.0, use_tis, "--use-tis"),
        ("--mask-offpolicy-in-partial-rollout", False, bool(args.partial_rollout), "--partial-rollout"),
        ("--max-tokens-per-gpu", None, bool(args.use_dynamic_batch_size), "--use-dynamic-batch-size"),
        *[(flag, None, wandb, "--use-wandb") for flag in ("--wandb-project", "--wandb-group", "--wandb-key",
                                                          "--wandb-mode")],
    ]


def _idle_setting_problems(args) -> list[str]:
    """Settings the user gave that would do nothing (slime ignores them silently): each names what makes it
    work. Only the user's values count (``_given_by_user``), not a recipe's or a default."""
    problems = []
    for flag, neutral, active, needs in _idle_settings(args):
        if not active and _given_by_user(args, flag, neutral):
            shown = _given_as(args, flag, show_value=flag not in SECRET_FLAGS)
            problems.append(f"{shown} has no effect without {needs}; drop {flag} or add "
                            f"{'them' if ' and ' in needs else 'it'}")
    return problems


# Values ``resolve_defaults`` derives from another flag when not given (--eval-top-k from --rollout-top-k, ...):
# checked only when given, so that a bad value is reported once, at the flag the user set.
DERIVED_DESTS = frozenset({"over_sampling_batch_size", "global_batch_size", "num_steps_per_rollout",
                           "sft_warmup_batch_size", "sft_warmup_lr", "eval_max_response_len", "eval_temperature",
                           "eval_top_p", "eval_top_k", "eps_clip_high", "rollout_max_prompt_len"})


def _root_values(args, dests) -> list[str]:
    """``dests`` less the derived ones the user did not set (see ``DERIVED_DESTS``)."""
    sources = getattr(args, "_sources", None) or {}
    return [d for d in dests if d not in DERIVED_DESTS or "--" + d.replace("_", "-") in sources]


def _top_k_ok(k) -> bool:
    return k == -1 or k >= 1


# dest -> (whether a value is valid, what the flag takes); NaN fails every comparison, so it is refused too
RANGES = {
    "lr": (lambda v: 0 <= v < math.inf, ">= 0"),
    "min_lr": (lambda v: 0 <= v < math.inf, ">= 0"),
    "sft_warmup_lr": (lambda v: 0 <= v < math.inf, ">= 0"),
    "adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_eps": (lambda v: 0 < v < math.inf, "> 0"),
    "weight_decay": (lambda v: 0 <= v < math.inf, ">= 0"),
    "clip_grad": (lambda v: 0 <= v < math.inf, ">= 0"),
    "lr_warmup_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "lr_warmup_iters": (lambda v: v >= 0, ">= 0"),
    "lr_decay_iters": (lambda v: v >= 0, ">= 0"),
    "rollout_top_k": (_top_k_ok, "-1 (no top-k) or >= 1"),
    "eval_top_k": (_top_k_ok, "-1 (no top-k) or >= 1"),
    "eval_top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "eval_temperature": (lambda v: 0 <= v < math.inf, ">= 0 (0: greedy)"),
    "eps_clip": (lambda v: 0 <= v < math.inf, ">= 0"),
    "eps_clip_high": (lambda v: 0 <= v < math.inf, ">= 0"),
    "tis_clip": (lambda v: 0 <= v < math.inf, ">= 0"),
    "tis_clip_low": (lambda v: 0 <= v < math.inf, ">= 0"),
    # slime allows a negative --entropy-coef (it then lowers entropy); a negative KL weight has no such use
    "kl_loss_coef": (lambda v: 0 <= v < math.inf, ">= 0"),
    "kl_coef": (lambda v: 0 <= v < math.inf, ">= 0"),
    "gamma": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "lambd": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "eval_max_response_len": (lambda v: v >= 1, ">= 1"),
    "rollout_max_prompt_len": (lambda v: v >= 1, ">= 1"),
}


def _estimator_fields(args, plugin_set) -> set[str]:
    """The option fields of the selected estimator: it checks their values itself (ppo: --gamma, --lambd)."""
    import dataclasses

    from .plugin_options import _declared

    try:
        options_type = _declared(plugin_set.entry("advantage_estimator", args.advantage_estimator))[0]
    except (PluginError, ImportError, ValueError):
        return set()
    return {f.name for f in dataclasses.fields(options_type)} if dataclasses.is_dataclass(options_type) else set()


def _range_problems(args, plugin_set) -> list[str]:
    """Values torch or an engine would refuse in a Ray actor, or that mean nothing (``RANGES``); derived values
    only when given. ``--rollout-top-p`` and ``--rollout-temperature`` are checked with the rollout flags."""
    skip = _estimator_fields(args, plugin_set) & {"gamma", "lambd"}
    problems = []
    for dest in _root_values(args, RANGES):
        valid, wanted = RANGES[dest]
        value = getattr(args, dest, None)
        if value is not None and dest not in skip and not valid(value):
            problems.append(f"--{dest.replace('_', '-')} must be {wanted}, got {value}")
    if args.min_lr is not None and args.lr is not None and args.min_lr > args.lr >= 0:
        problems.append(f"--min-lr ({args.min_lr}) must be <= --lr ({args.lr}): the schedule decays from --lr to "
                        "--min-lr; lower --min-lr")
    if args.tis_clip_low is not None and args.tis_clip is not None and args.tis_clip_low > args.tis_clip >= 0:
        problems.append(f"--tis-clip-low ({args.tis_clip_low}) must be <= --tis-clip ({args.tis_clip}): they are the "
                        "lower and upper bound of the TIS weight")
    if any(stop == "" for stop in args.rollout_stop or []):
        problems.append("--rollout-stop: an empty string is no stop string (it matches everywhere); drop the \"\" or "
                        "give the text to stop at")
    return problems


def _missing_checkpoint_problems(args) -> list[str]:
    """``--hf-checkpoint`` is required except on the embedded default run (``plugrl train`` fills in its tiny
    checkpoint): without it the model would be looked up on huggingface.co, deep in a Ray actor."""
    if args.hf_checkpoint or args.recipe == DEFAULT_RECIPE:
        return []
    return ["--hf-checkpoint is required (the model to train): give a local Hugging Face checkpoint folder "
            "(config.json, tokenizer, weights), e.g. one saved with save_pretrained or `huggingface-cli download`"]


def _check_paths(args, problems: list[str]) -> None:
    for flag, spec in (("--prompt-data", args.prompt_data), ("--sft-warmup-data", args.sft_warmup_data)):
        problem = spec and _data_path_problem(args, flag, spec)
        if problem:
            problems.append(problem)
    for spec in _eval_paths(args) or []:
        problem = _data_path_problem(args, "--eval-prompt-data", spec, "NAME PATH")
        if problem:
            problems.append(problem)
    if args.hf_checkpoint:
        path = Path(args.hf_checkpoint)
        hint = _recipe_hint(args, "--hf-checkpoint", "DIR")
        if not path.is_dir():
            problems.append(f"--hf-checkpoint {path} is not a directory{hint or ' (give a Hugging Face model directory)'}")
        elif not (path / "config.json").is_file():
            problems.append(
                f"--hf-checkpoint {path} has no config.json{hint or ' (it must be a Hugging Face model directory)'}"
            )
    if getattr(args, "ref_load", None) and not Path(args.ref_load).exists():
        # read by the train backend on the GPUs, long after start: a mistyped path must stop the run here
        hint = _recipe_hint(args, "--ref-load", "DIR")
        problems.append(f"--ref-load {args.ref_load} does not exist"
                        f"{hint or ' (give the reference model: a Hugging Face directory or a torch_dist checkpoint)'}")


def _check_device(args, problems: list[str]) -> None:
    if args.device == "cuda":
        import torch  # only here: parsing must not import torch

        if not torch.cuda.is_available():
            problems.append(
                "--device cuda: no CUDA device is visible (torch.cuda.is_available() is False); "
                "use --device cpu or auto"
            )


def planned_colocation(args, plugin_set) -> bool | None:
    """Whether the placement puts engines on the train GPUs (None when it cannot plan here)."""
    from .dry_run import placement_plan

    plugin_set = plugin_set or _default_plugin_set()
    try:
        return bool(placement_plan(args, plugin_set).colocated)
    except (PluginError, ImportError, ValueError):
        return None


def _has_nvidia_gpu() -> bool:
    """An NVIDIA driver lists a GPU (read from /proc: validation must not import torch)."""
    try:
        return bool(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return False


def _check_host_memory(args, plugin_set, problems: list[str]) -> None:
    """A GPU run whose host-memory plan (core/memory_plan.py) exceeds this machine is refused here."""
    from .memory_plan import host_memory_problem, plan_memory, skip_check

    if args.device == "cpu" or skip_check():
        return
    if args.device == "auto" and not _has_nvidia_gpu():
        return  # here the run falls back to CPU (no offload, no GPU export); --dry-run still prints the plan
    colocated = planned_colocation(args, plugin_set)
    if colocated is None:
        return
    problem = host_memory_problem(plan_memory(args, colocated=colocated), args)
    if problem:
        problems.append(problem)


def _check_weight_transport(args, plugin_set, problems: list[str]) -> None:
    """A forced ``--weight-transport`` that cannot work for this placement is refused on the driver."""
    forced = getattr(args, "weight_transport", "auto") or "auto"
    if forced in ("auto", "object_store"):
        return
    from .plugin_traits import engine_pool

    flag = f"--weight-transport {forced}"
    try:
        pool = engine_pool(args, plugin_set)
    except (PluginError, ImportError, ValueError):
        return  # the rollout backend's own problem is reported by the plugin checks
    if pool != "actors":
        problems.append(f"{flag}: rollout backend '{args.rollout_backend}' launches its engines itself and takes "
                        "weights through the object store; use --weight-transport auto or object_store")
        return
    from .weight_sync import colocated_engine_count

    colocated = planned_colocation(args, plugin_set)
    no_gpu = args.device == "cpu" or (args.device == "auto" and not _has_nvidia_gpu())
    if forced == "cuda_ipc" and no_gpu:
        problems.append(f"{flag}: CUDA IPC needs a GPU; this run is on the CPU (--device {args.device}); "
                        "use auto or object_store")
    elif forced == "cuda_ipc" and colocated is False:
        problems.append(f"{flag}: CUDA IPC needs the engines on the trainer's GPU; this placement is decoupled "
                        "(use broadcast, auto or object_store)")
    elif forced == "cuda_ipc" and colocated and colocated_engine_count(args) > 1:
        problems.append(f"{flag}: CUDA IPC reaches only the engine on train rank 0's GPU; this run starts "
                        f"{colocated_engine_count(args)} engines (use auto or object_store)")
    elif forced == "broadcast" and colocated:
        problems.append(f"{flag}: broadcast needs the engines on other GPUs than the trainer's (NCCL cannot join "
                        "two ranks on one GPU); this placement is colocated (use cuda_ipc, auto or object_store)")


def _colocate_turned_off(args) -> bool:
    """``--no-colocate`` on the command line, or ``colocate: false`` in ``--config`` over a recipe that turns it
    on; ``colocate: false`` (or null) alone is the default, as a saved config.yaml writes it."""
    source = (getattr(args, "_sources", None) or {}).get("--colocate", "")
    if args.colocate or not source or source.startswith(RECIPE_SOURCE):
        return False
    return not source.startswith(YAML_SOURCE) or bool(_recipe_value(args, "--colocate"))


def _check_cluster(args, plugin_set, problems: list[str]) -> None:
    from .dry_run import layout_problems, placement_plan
    from .plugin_options import OptionsError

    if args.async_train and args.colocate:
        problems.append(
            "--async with --colocate: colocated async cannot keep weights fixed during generation; "
            "drop --colocate or --async"
        )
    plan, refused = None, None  # the placement's plan, computed once for the checks below
    registry = plugin_set.registries["placement"]
    if args.placement in registry and not registry.entry(args.placement).missing_requirements():
        try:
            plan = placement_plan(args, plugin_set)
        except OptionsError:
            pass  # reported by the options check, naming the key
        except ValueError as exc:
            refused = f"--placement {args.placement}: {exc}"
    sources = getattr(args, "_sources", None) or {}
    if (_colocate_turned_off(args) and plan is not None and plan.colocated and "--placement" not in sources
            and "--rollout-num-gpus" not in sources):
        # the default placement stays colocated without --rollout-num-gpus: the engines would share the train
        # GPUs as before, only without the offloading --colocate turned on
        problems.append(f"{_given_as(args, '--colocate').replace('--colocate', '--no-colocate', 1)} without "
                        "--rollout-num-gpus: the engines would still share the train GPUs "
                        f"(placement {args.placement}), now without offloading; give --rollout-num-gpus N to put "
                        "them on GPUs of their own (decoupled), or drop --no-colocate")
    if args.colocate and plan is not None and not plan.colocated:
        problems.append(f"--colocate conflicts with --placement {args.placement}, which gives the engines GPUs of "
                        "their own; drop one")
    if args.debug_train_only and args.debug_rollout_only:
        problems.append("--debug-train-only and --debug-rollout-only exclude each other")
    if refused:
        problems.append(refused)
    elif plan is not None:  # a plugin's plan the loop could not run (core/placement_layout.plan_problems)
        from .dry_run import placement_request
        from .placement_layout import plan_problems

        problems.extend(f"--placement {args.placement}: {problem}"
                        for problem in plan_problems(placement_request(args), plan))
    problems.extend(layout_problems(args))
    from .plugin_traits import backend_problems

    problems.extend(backend_problems(args, plugin_set))  # each backend's declared ``check``


# --------------------------------------------------------------------------------------------------
# Serialisation
# --------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [_plain(v) for v in items]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def config_to_dict(args: argparse.Namespace) -> dict:
    """The resolved config as plain YAML/JSON types; ``--config`` reads it back (``config`` itself and
    credentials (``SECRET_DESTS``) are left out; attributes that are not flags go under ``extra``)."""
    flag_dests = set(getattr(args, "_flag_dests", ()) or ())
    out: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in sorted(vars(args).items()):
        if key.startswith("_") or key == "config" or key in SECRET_DESTS:
            continue
        if flag_dests and key not in flag_dests and key not in META_KEYS:
            extra[key] = _plain(value)
        else:
            out[key] = _plain(value)
    if extra:
        out["extra"] = extra
    return out

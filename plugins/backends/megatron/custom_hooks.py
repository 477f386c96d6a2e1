"""slime's Megatron escape hatches, with slime's signatures, for the megatron train backend.

Resolved from the flags in each train actor (the driver checks that each is an import path and that
the ``--megatron-config-path`` file parses):

* ``--custom-megatron-init-path``: ``fn(args)``, once, right after the process groups exist;
* ``--custom-model-provider-path``: ``fn(pre_process, post_process[, vp_stage])`` returns the
  GPTModel to train (and, built the same way, the reference model). slime's providers read
  Megatron's global args, which plugrl does not create, so the provider is also offered plugrl's
  derived ``config`` (a ``TransformerConfig``) and ``layer_spec`` when its signature names them.
  The model must use plugrl's packed core attention (``attention.local_spec_with_packed_attention``)
  and megatron-core's local names, which the HF weight mapping loads;
* ``--custom-megatron-before-log-prob-hook-path``: ``fn(args, model, store_prefix)`` before the old
  (``store_prefix=""``) and reference (``"ref_"``) log-probs of a rollout;
* ``--custom-megatron-before-train-step-hook-path``: ``fn(args, rollout_id, step_id, model,
  optimizer, opt_param_scheduler)`` before each optimizer step's micro-batches; ``model`` is the
  list of model chunks (one: PP = 1), ``optimizer`` megatron-core's optimizer (torch's AdamW on CPU)
  and ``opt_param_scheduler`` ``None`` (plugrl's LR schedule is a function of the step, set by the
  backend right before ``optimizer.step``);
* ``--megatron-config-path``: YAML ``megatron: [{name, role: actor|critic, overrides: {field: value}}]``;
  the ``actor`` entries' overrides set megatron-core ``TransformerConfig`` fields (as
  ``--megatron-<field>`` flags do; the command line wins); ``critic`` entries are refused (plugrl
  trains no critic).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


def load_hook(args, flag_dest: str) -> Callable | None:
    path = getattr(args, flag_dest, None)
    if not path:
        return None
    from plugrl.core.registry import import_object

    hook = import_object(path)
    if not callable(hook):
        raise TypeError(f"--{flag_dest.replace('_', '-')} {path}: not callable")
    return hook


def call_model_provider(provider: Callable, *, config, layer_spec) -> Any:
    """slime's call (``pre_process=True, post_process=True``: PP = 1), plus ``vp_stage``, ``config``
    and ``layer_spec`` for a provider whose signature takes them."""
    params = inspect.signature(provider).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    extra = {name: value for name, value in (("vp_stage", None), ("config", config), ("layer_spec", layer_spec))
             if takes_any or name in params}
    return provider(pre_process=True, post_process=True, **extra)


def megatron_config_overrides(path: str | None) -> dict:
    """The actor overrides of a ``--megatron-config-path`` YAML, merged in file order."""
    if not path:
        return {}
    from plugrl.core.flags import read_yaml

    entries = read_yaml(path, "--megatron-config-path").get("megatron")
    if not isinstance(entries, list):  # a config error, reported with the others (ValueError)
        raise ValueError(f"--megatron-config-path {path}: expected a top-level 'megatron:' list of "  # noqa: TRY004
                         "{name, role, overrides} entries")
    merged: dict = {}
    for i, entry in enumerate(entries):
        where = f"--megatron-config-path {path}: entry {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("overrides", {}), dict):
            raise ValueError(f"{where}: expected a mapping with 'role' and an 'overrides' mapping")  # noqa: TRY004
        role = entry.get("role", "actor")
        if role == "critic":
            raise ValueError(f"{where}: role 'critic': plugrl trains no critic (use role: actor)")
        if role != "actor":
            raise ValueError(f"{where}: role must be actor or critic, got {role!r}")
        merged.update({str(k).replace("-", "_"): v for k, v in (entry.get("overrides") or {}).items()})
    return merged

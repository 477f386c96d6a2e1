"""Every hook plugrl calls, grouped by when it runs.

Registration hooks run once per process inside ``load_plugins()`` (driver, rollout manager, every train
actor), so they must stay cheap: no torch.cuda, megatron or sglang imports. Each receives a
``register(name, obj, *, description="", options=None, check_options=None, replace=False, **traits)``
callback; plugrl records which plugin (and distribution) registered each name, and a name two plugins
register is selectable only as ``plugin:name``. docs/plugin-guide.md is the author's guide.
The loop never calls plugins through pluggy in the hot path: it resolves names in the registries.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import pluggy

hookspec = pluggy.HookspecMarker("plugrl")

Register = Callable[..., None]

# --------------------------------------------------------------------------------------------------
# Registration hooks: once per process, collect-all, return None.
# --------------------------------------------------------------------------------------------------


@hookspec
def plugrl_register_rewards(register: Register) -> None:
    """Register reward functions, selected with ``--rm-type NAME``.

    ``register(name, fn, batched=False, options=None, description="")``. A per-sample ``fn(sample,
    **options) -> float | dict | None`` (sync or ``async``); with ``batched=True`` ``fn(samples,
    **options) -> list``. Options come from ``--rm-opt KEY=VALUE`` (the fields of ``options``, a
    dataclass, when declared). Rewards are called in the rollout manager and by ``plugrl score``.
    """


@hookspec
def plugrl_register_advantage_estimators(register: Register) -> None:
    """Register advantage estimator classes (``--advantage-estimator NAME``).

    The class is built with the run config; ``shape_rewards`` runs in the rollout manager and
    ``compute`` in the train actors (see ``plugrl.core.protocols.AdvantageEstimator``).
    """


@hookspec
def plugrl_register_filters(register: Register) -> None:
    """Register dynamic-sampling filters (``--dynamic-sampling-filter NAME``).

    ``fn(group: list[Sample], **options) -> FilterDecision | bool`` (options from ``--filter-opt``,
    plus ``reward_key`` when ``--reward-key`` is set); called in the rollout manager once per finished
    group; drops are counted as ``rollout/dynamic_filter/drop_{reason}``.
    """


@hookspec
def plugrl_register_buffer_policies(register: Register) -> None:
    """Register partial-rollout buffer policy classes (``--buffer-filter NAME``).

    Instances live in the rollout manager: ``add(groups)``, ``take(n, rollout_id)``, ``__len__``,
    ``state_dict()``, ``load_state_dict(state)``.
    """


@hookspec
def plugrl_register_placements(register: Register) -> None:
    """Register placement strategies (``--placement NAME``): pure ``plan(request) -> PlacementPlan``
    functions, called on the driver before any actor starts."""


@hookspec
def plugrl_register_train_backends(register: Register) -> None:
    """Register train backends (``--train-backend NAME``) as lazy factories.

    ``register(name, "module:Class", requires=("torch", ...), extra="megatron")``: the factory is
    imported only inside a train actor, so listing plugins never imports megatron or CUDA.
    """


@hookspec
def plugrl_register_rollout_backends(register: Register) -> None:
    """Register rollout engines (``--rollout-backend NAME``) as lazy factories, like train backends;
    imported inside the rollout manager."""


@hookspec
def plugrl_register_reward_post_processors(register: Register) -> None:
    """Register reward post-processors (``--reward-post-process NAME``, repeatable), e.g. DAPO's
    overlong penalty: ``fn(samples, options) -> None`` edits raw rewards in the rollout manager before
    the estimator's ``shape_rewards``; ``options`` is its declared options object (``register(...,
    options=MyOptions)``, checked on the driver) or, when it declares none, the run config."""


# --------------------------------------------------------------------------------------------------
# Configuration hooks.
# --------------------------------------------------------------------------------------------------


@hookspec
def plugrl_add_options(parser: Any) -> None:
    """Add a plugin's own flags. Called on the driver when the ``plugrl train`` parser is built.

    Add one argument group named after the plugin; prefix the flags (``--sglang-*``, ``--megatron-*``)
    unless they are slime's own names that the plugin owns (e.g. ``--tensor-model-parallel-size``).
    """


@hookspec(historic=True)
def plugrl_configure(config: Any) -> None:
    """Called on the driver once the run config is final, before any actor starts (historic: plugins
    registered later still receive it). Validate plugin options here; raise ``ValueError`` naming the flag."""


# --------------------------------------------------------------------------------------------------
# Observer hooks: driver process only, collect-all; a returned dict adds metrics to the step's line.
# An observer that raises, returns a non-dict or a key the line already holds is warned about and
# skipped (core/observers.py): it can neither stop the run nor rewrite core's metrics.
# --------------------------------------------------------------------------------------------------


@hookspec
def plugrl_on_rollout_end(rollout_id: int, metrics: Mapping[str, float]) -> dict | None:
    """After a rollout's samples are generated, rewarded and filtered; on the driver."""


@hookspec
def plugrl_on_train_step_end(rollout_id: int, metrics: Mapping[str, float]) -> dict | None:
    """After training on a rollout (all optimizer steps of it); on the driver."""


@hookspec
def plugrl_on_eval_end(rollout_id: int, metrics: Mapping[str, float]) -> dict | None:
    """After an evaluation pass; on the driver."""


# --------------------------------------------------------------------------------------------------
# Dispatch hooks (firstresult): the first plugin that recognises the input answers.
# --------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def plugrl_model_bridge(hf_config: Any) -> Any:
    """Return an HF <-> Megatron bridge for this HF config's architecture, or None. Called inside
    the megatron train actors; the first non-None answer wins."""

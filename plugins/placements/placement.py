"""Placement strategies ``colocate`` and ``decoupled``: pure plans, no Ray.

Called on the driver before any actor exists; core turns the plan into one Ray placement group of
``num_bundles`` bundles (1 GPU + 1 CPU each, PACK) whose bundles are sorted by (node IP, GPU id).
Layout follows slime's ``_get_placement_group_layout`` (reference §8):
  colocate   bundles = max(actor GPUs, rollout GPUs), rollout offset 0 (train and rollout share GPUs;
             engines on bundles the trainer also uses release their memory while it trains)
  decoupled  bundles = actor GPUs + rollout GPUs, rollout offset = actor GPUs
Rollout engine i (one Ray actor) starts at bundle ``offset + i * min(gpus_per_engine, gpus_per_node)``;
an engine wider than a node has one actor per node, and ``gpus_per_engine // gpus_per_node``
consecutive entries of ``engine_bundles`` form one server.

``sort_bundles`` is the ordering step: given what a probe actor on each bundle reported (node IP,
GPU id), it says which physical bundle plays logical bundle i (slime ``placement_group.py``).
"""

from __future__ import annotations

from plugrl.core import hookimpl
from plugrl.core.protocols import PlacementPlan, PlacementRequest


from plugrl.core.placement_layout import (  # noqa: F401 - public names stay importable here
    _node_key,
    _ranges,
    describe_plan,
    engine_gpu_ids,
    sort_bundles,
)


def _check_request(request: PlacementRequest, rollout_gpus: int) -> None:
    for flag, value in (("--actor-num-nodes", request.actor_num_nodes),
                        ("--actor-num-gpus-per-node", request.actor_num_gpus_per_node),
                        ("--rollout-num-gpus-per-engine", request.rollout_num_gpus_per_engine),
                        ("--num-gpus-per-node", request.num_gpus_per_node)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    if not isinstance(rollout_gpus, int) or rollout_gpus < 0:
        raise ValueError(f"--rollout-num-gpus must be a non-negative integer, got {rollout_gpus!r}")
    per_engine, per_node = request.rollout_num_gpus_per_engine, request.num_gpus_per_node
    if rollout_gpus % per_engine:
        raise ValueError(
            f"--rollout-num-gpus ({rollout_gpus}) must be divisible by --rollout-num-gpus-per-engine ({per_engine})"
        )
    if per_engine > per_node and per_engine % per_node:
        raise ValueError(
            f"--rollout-num-gpus-per-engine ({per_engine}) spans nodes, so it must be a multiple of "
            f"--num-gpus-per-node ({per_node})"
        )


def _engine_bundles(request: PlacementRequest, offset: int, rollout_gpus: int) -> tuple[tuple[int, ...], ...]:
    step = min(request.rollout_num_gpus_per_engine, request.num_gpus_per_node)
    return tuple(tuple(range(offset + i * step, offset + (i + 1) * step)) for i in range(rollout_gpus // step))


def _plan(request: PlacementRequest, rollout_gpus: int, *, colocated: bool) -> PlacementPlan:
    _check_request(request, rollout_gpus)
    actor_gpus = request.actor_gpus
    if colocated:
        num_bundles, offset = max(actor_gpus, rollout_gpus), 0
    else:
        num_bundles, offset = actor_gpus + rollout_gpus, actor_gpus
    engines = _engine_bundles(request, offset, rollout_gpus)
    notes = []
    if colocated:
        # slime: an engine "needs offload" iff it starts on a GPU the trainer also uses.
        shared = [i for i, bundles in enumerate(engines) if bundles[0] < actor_gpus]
        if shared:
            notes.append(f"engines {_ranges(shared)} share GPUs with training: release memory while training")
        alone = [i for i, bundles in enumerate(engines) if bundles[0] >= actor_gpus]
        if alone:
            notes.append(f"engines {_ranges(alone)} have GPUs of their own and keep their memory")
    per_engine, per_node = request.rollout_num_gpus_per_engine, request.num_gpus_per_node
    if per_engine > per_node:
        notes.append(f"each server spans {per_engine // per_node} nodes: one engine actor per node")
    return PlacementPlan(
        num_bundles=num_bundles,
        actor_bundles=tuple(range(actor_gpus)),
        rollout_offset=offset,
        rollout_bundles=tuple(range(offset, offset + rollout_gpus)),
        engine_bundles=engines,
        colocated=colocated,
        notes=tuple(notes),
    )


def colocate(request: PlacementRequest) -> PlacementPlan:
    """Train and rollout share the first GPUs; rollout GPUs default to the actor GPUs."""
    rollout_gpus = request.actor_gpus if request.rollout_num_gpus is None else request.rollout_num_gpus
    return _plan(request, rollout_gpus, colocated=True)


def decoupled(request: PlacementRequest) -> PlacementPlan:
    """Rollout engines on their own GPUs after the actor's (needs ``--rollout-num-gpus``)."""
    if request.rollout_num_gpus is None:
        raise ValueError("decoupled placement needs --rollout-num-gpus (or use --colocate)")
    return _plan(request, request.rollout_num_gpus, colocated=False)


@hookimpl
def plugrl_register_placements(register):
    register("colocate", colocate, description="train and rollout share GPUs (offload/onload between phases)")
    register("decoupled", decoupled, description="rollout engines on their own GPUs after the trainer's")

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

import socket
from collections.abc import Callable, Sequence

from plugrl.core import hookimpl
from plugrl.core.protocols import PlacementPlan, PlacementRequest


def _node_key(node: str, resolve: Callable[[str], str]) -> list[int]:
    """slime's ``sort_key`` for a node: IPv4 octets as integers (so 10.0.0.9 < 10.0.0.10); a hostname
    is resolved to an IP first; failing both, the characters' code points (stable, if arbitrary)."""
    try:
        return [int(part) for part in node.split(".")]
    except ValueError:
        pass
    try:
        return [int(part) for part in resolve(node).split(".")]
    except (OSError, TypeError, ValueError):  # socket.gaierror is an OSError
        return [ord(c) for c in node]


def sort_bundles(bundle_infos: Sequence[tuple[str, int | str]], *,
                 resolve: Callable[[str], str] = socket.gethostbyname) -> list[int]:
    """Physical bundle indices in logical order: ``result[i]`` is the bundle that logical bundle i
    (train rank i, rollout GPU i - offset) uses.

    ``bundle_infos[b]`` is ``(node IP or hostname, GPU id)`` as reported from inside bundle b (Ray
    gives a placement group's bundles in no particular order). Bundles sort by (node, GPU id) with
    the node compared as in :func:`_node_key`; ties keep the bundle index order (a stable sort).
    Runs on the driver once the placement group is ready.
    """
    keyed = [(_node_key(str(node), resolve), int(gpu), b) for b, (node, gpu) in enumerate(bundle_infos)]
    return [b for _, _, b in sorted(keyed, key=lambda k: (k[0], k[1]))]


def engine_gpu_ids(engine_bundles: Sequence[Sequence[int]], physical: Sequence[int],
                   bundle_infos: Sequence[tuple[str, int | str]], launcher_bundle: int) -> list[list[int]]:
    """The physical GPU ids of every rollout engine, for the ``CUDA_VISIBLE_DEVICES`` of the engine
    processes the rollout manager launches on its own node (logical bundle ``launcher_bundle``).
    ``physical`` is :func:`sort_bundles`' answer. Runs on the driver; an engine on another node is an
    error (launched servers run beside the manager; a multi-node rollout uses external engines)."""
    home = str(bundle_infos[physical[launcher_bundle]][0])
    ids = []
    for i, bundles in enumerate(engine_bundles):
        nodes = {str(bundle_infos[physical[b]][0]) for b in bundles}
        if nodes != {home}:
            raise ValueError(
                f"rollout engine {i} has GPUs on {sorted(nodes)} but the rollout manager launches engines on {home}: "
                "engines spanning other nodes need --rollout-external-engine-addrs (start SGLang there yourself)"
            )
        ids.append([int(bundle_infos[physical[b]][1]) for b in bundles])
    return ids


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


def _ranges(indices: list[int]) -> str:
    return f"{indices[0]}" if len(indices) == 1 else f"{indices[0]}-{indices[-1]}"


def describe_plan(plan: PlacementPlan, name: str | None = None) -> str:
    """A per-bundle table for ``--dry-run``: which train rank and which rollout engine use each GPU."""
    engine_of = {b: i for i, bundles in enumerate(plan.engine_bundles) for b in bundles}
    rank_of = {b: r for r, b in enumerate(plan.actor_bundles)}
    title = name or ("colocate" if plan.colocated else "decoupled")
    lines = [
        (f"placement {title}: {plan.num_bundles} bundles (1 GPU + 1 CPU each), "
         f"{len(plan.actor_bundles)} train GPUs, {len(plan.rollout_bundles)} rollout GPUs "
         f"(offset {plan.rollout_offset}), {len(plan.engine_bundles)} rollout engine actors"),
        "bundle  train       rollout",
    ]
    for bundle in range(plan.num_bundles):
        train = f"rank {rank_of[bundle]}" if bundle in rank_of else "-"
        if bundle in engine_of:
            engine = engine_of[bundle]
            rollout = f"engine {engine} (local gpu {plan.engine_bundles[engine].index(bundle)})"
        else:
            rollout = "-"
        lines.append(f"{bundle:>6}  {train:<10}  {rollout}")
    lines.extend(f"note: {note}" for note in plan.notes)
    lines.append("bundles are ordered by (node IP, GPU id) once the placement group is ready")
    return "\n".join(lines)


@hookimpl
def plugrl_register_placements(register):
    register("colocate", colocate, description="train and rollout share GPUs (offload/onload between phases)")
    register("decoupled", decoupled, description="rollout engines on their own GPUs after the trainer's")

"""Turning a placement plan into Ray bundles, and describing it: what core does with any placement
plugin's ``PlacementPlan`` (driver side, once the placement group is ready or for ``--dry-run``).

``sort_bundles`` is the ordering step: given what a probe actor on each bundle reported (node IP,
GPU id), it says which physical bundle plays logical bundle i (slime ``placement_group.py``).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence

from .protocols import PlacementPlan, PlacementRequest


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


def plan_problems(request: PlacementRequest, plan: PlacementPlan) -> list[str]:
    """What makes ``plan`` unusable for ``request``: the checks the driver runs on the selected
    placement's plan before any actor starts, and ``plugrl.core.testing.check_placement`` runs on a
    plugin's plans. Each line names the plan field that is wrong."""
    if not isinstance(plan, PlacementPlan):
        return [f"returned {type(plan).__name__}; expected PlacementPlan"]
    bundles = range(plan.num_bundles)
    actor, rollout = list(plan.actor_bundles), list(plan.rollout_bundles)
    problems = []
    if len(actor) != request.actor_gpus or len(set(actor)) != len(actor) or not set(actor) <= set(bundles):
        problems.append(f"actor_bundles {actor} must be {request.actor_gpus} distinct bundles in 0..{plan.num_bundles - 1}")
    if not rollout:
        given = ("--rollout-num-gpus is unset, so the request's rollout_num_gpus is None"
                 if request.rollout_num_gpus is None else f"--rollout-num-gpus {request.rollout_num_gpus}")
        problems.append(f"rollout_bundles is empty ({given}): the rollout manager and the engines need at least one "
                        "GPU; give --rollout-num-gpus N")
    else:
        wrong_count = request.rollout_num_gpus is not None and len(rollout) != request.rollout_num_gpus
        if wrong_count or len(set(rollout)) != len(rollout) or not set(rollout) <= set(bundles):
            count = f"{request.rollout_num_gpus} " if request.rollout_num_gpus is not None else ""
            problems.append(f"rollout_bundles {rollout} must be {count}distinct bundles in 0..{plan.num_bundles - 1}")
    if set(actor) | set(rollout) != set(bundles):
        problems.append(f"bundles {sorted(set(bundles) - set(actor) - set(rollout))} are unused")
    if not plan.colocated and set(actor) & set(rollout):
        problems.append(f"not colocated, yet bundles {sorted(set(actor) & set(rollout))} are shared")
    engine_size = min(request.rollout_num_gpus_per_engine, request.num_gpus_per_node)
    if sorted(b for engine in plan.engine_bundles for b in engine) != sorted(rollout):
        problems.append(f"engine_bundles {plan.engine_bundles} do not partition rollout_bundles {rollout}")
    if any(len(engine) != engine_size for engine in plan.engine_bundles):
        problems.append(f"every engine actor must hold {engine_size} bundles: {plan.engine_bundles}")
    if rollout and plan.rollout_offset != min(rollout):
        problems.append(f"rollout_offset {plan.rollout_offset} is not the first rollout bundle")
    return problems

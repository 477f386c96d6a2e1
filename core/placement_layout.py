"""Turning a placement plan into Ray bundles, and describing it: what core does with any placement
plugin's ``PlacementPlan`` (driver side, once the placement group is ready or for ``--dry-run``).

``sort_bundles`` is the ordering step: given what a probe actor on each bundle reported (node IP,
GPU id), it says which physical bundle plays logical bundle i (slime ``placement_group.py``).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence

from .protocols import PlacementPlan


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

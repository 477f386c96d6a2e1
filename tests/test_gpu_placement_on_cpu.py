"""The driver's GPU placement code (``Cluster._gpu_options``) on a CPU box: Ray is started with
logical GPUs (resource accounting only, no CUDA), so the placement group, the bundle probes and the
Ray options each actor would get are real. This path otherwise runs only on GPU machines; a crash in
it (a trait read wrongly, a renamed helper) showed up only there before this test."""

from __future__ import annotations

import pytest

from plugrl.core.config import parse_config
from plugrl.core.loop import Cluster
from plugrl.core.plugins import load_plugins

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def logical_gpus():
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def options_for(argv: list[str]) -> tuple[Cluster, dict, list[dict]]:
    plugin_set = load_plugins()
    args = parse_config(argv, plugin_set)
    cluster = Cluster.__new__(Cluster)  # the placement half only: no actors are started
    cluster.args, cluster.placement_group = args, None
    cluster.engine_gpu_ids = cluster.engine_placement = None
    world = int(args.actor_num_nodes) * int(args.actor_num_gpus_per_node)
    try:
        rollout, train = cluster._gpu_options(args, plugin_set, world)
    finally:
        pg = cluster.placement_group
    from ray.util.placement_group import remove_placement_group

    remove_placement_group(pg)
    return cluster, rollout, train


def test_colocated_one_gpu_shares_the_bundle(logical_gpus):
    cluster, rollout, train = options_for(["--actor-num-gpus-per-node", "1", "--colocate"])
    assert cluster.plan.colocated
    # both sides on one GPU: fractions that add up to at most one GPU
    assert len(train) == 1 and train[0]["num_gpus"] + rollout["num_gpus"] <= 1
    assert cluster.engine_placement is None  # one engine: it lives in the rollout manager


def test_decoupled_two_gpus_gives_the_engine_its_own_gpu(logical_gpus):
    cluster, rollout, train = options_for(["--actor-num-gpus-per-node", "1", "--rollout-num-gpus", "1",
                                           "--rollout-num-gpus-per-engine", "1"])
    assert not cluster.plan.colocated
    assert train[0]["num_gpus"] == 1
    train_bundle = train[0]["scheduling_strategy"].placement_group_bundle_index
    engine_bundle = rollout["scheduling_strategy"].placement_group_bundle_index
    assert train_bundle != engine_bundle
    gpus = {info[1] for info in cluster.bundle_infos}
    assert len(gpus) == 2  # the probes saw two distinct (logical) GPUs


def test_two_engines_on_two_gpus_start_as_actors(logical_gpus):
    cluster, rollout, train = options_for(["--actor-num-gpus-per-node", "2", "--colocate",
                                           "--rollout-num-gpus-per-engine", "1"])
    assert cluster.engine_placement is not None
    assert len(cluster.engine_placement["bundles"]) == 2

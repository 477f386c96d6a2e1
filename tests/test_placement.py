"""Placement plans: slime's layout table (reference §8), engine offsets, errors, purity."""

import subprocess
import sys

import pytest
from plugrl.core.protocols import PlacementPlan, PlacementRequest
from plugrl.core.testing import check_placement, plugin_set  # noqa: F401  (fixture)
from plugrl.plugins.backends.placement import colocate, decoupled, describe_plan


def request(actor_nodes=1, actor_per_node=8, rollout=None, per_engine=1, per_node=8):
    return PlacementRequest(actor_num_nodes=actor_nodes, actor_num_gpus_per_node=actor_per_node,
                            rollout_num_gpus=rollout, rollout_num_gpus_per_engine=per_engine,
                            num_gpus_per_node=per_node)


@pytest.mark.parametrize(
    "actor_nodes, actor_per_node, rollout, decoupled_layout, colocated_layout",
    [
        (2, 8, 32, (48, 16), (32, 0)),  # slime tests/test_placement_group.py
        (1, 8, 8, (16, 8), (8, 0)),
        (1, 8, 4, (12, 8), (8, 0)),
        (4, 8, 8, (40, 32), (32, 0)),
    ],
)
def test_slime_layout_table(actor_nodes, actor_per_node, rollout, decoupled_layout, colocated_layout):
    req = request(actor_nodes, actor_per_node, rollout)
    plan = decoupled(req)
    assert (plan.num_bundles, plan.rollout_offset) == decoupled_layout
    assert plan.actor_bundles == tuple(range(actor_nodes * actor_per_node))
    assert plan.rollout_bundles == tuple(range(plan.rollout_offset, plan.rollout_offset + rollout))
    assert not plan.colocated
    plan = colocate(req)
    assert (plan.num_bundles, plan.rollout_offset) == colocated_layout
    assert plan.rollout_bundles == tuple(range(rollout)) and plan.colocated


def test_colocate_actor_8_defaults_rollout_to_actor_gpus():
    plan = colocate(request(rollout=None))
    assert plan == PlacementPlan(
        num_bundles=8, actor_bundles=tuple(range(8)), rollout_offset=0, rollout_bundles=tuple(range(8)),
        engine_bundles=tuple((i,) for i in range(8)), colocated=True,
        notes=("engines 0-7 share GPUs with training: release memory while training",),
    )


def test_engines_of_two_gpus():
    plan = decoupled(request(2, 8, 32, per_engine=2))
    assert len(plan.engine_bundles) == 16
    assert [e[0] for e in plan.engine_bundles] == [16 + 2 * i for i in range(16)]
    assert plan.engine_bundles[0] == (16, 17) and plan.engine_bundles[-1] == (46, 47)
    plan = colocate(request(per_engine=2))
    assert plan.engine_bundles == ((0, 1), (2, 3), (4, 5), (6, 7))


def test_engine_wider_than_a_node_has_one_actor_per_node():
    plan = decoupled(request(2, 8, 32, per_engine=16))
    # slime: engine actor i at offset + i * min(gpus_per_engine, gpus_per_node).
    assert [e[0] for e in plan.engine_bundles] == [16, 24, 32, 40]
    assert all(len(e) == 8 for e in plan.engine_bundles)
    assert "each server spans 2 nodes" in " ".join(plan.notes)


def test_colocate_with_more_rollout_than_actor_gpus():
    plan = colocate(request(1, 4, 8, per_engine=2))
    assert plan.num_bundles == 8 and plan.actor_bundles == (0, 1, 2, 3)
    assert plan.notes == (
        "engines 0-1 share GPUs with training: release memory while training",
        "engines 2-3 have GPUs of their own and keep their memory",
    )


@pytest.mark.parametrize(
    "req, match",
    [
        (request(rollout=6, per_engine=4), "--rollout-num-gpus-per-engine"),
        (request(rollout=36, per_engine=12), "multiple of --num-gpus-per-node"),
        (request(actor_per_node=0, rollout=8), "--actor-num-gpus-per-node"),
        (request(rollout=-1), "--rollout-num-gpus"),
    ],
)
def test_errors(req, match):
    for strategy in (colocate, decoupled):
        with pytest.raises(ValueError, match=match):
            strategy(req)


def test_decoupled_needs_rollout_gpus():
    with pytest.raises(ValueError, match="--rollout-num-gpus"):
        decoupled(request(rollout=None))


def test_describe_plan_names_every_bundle():
    text = describe_plan(colocate(request(1, 4, 4, per_engine=2)))
    lines = text.splitlines()
    assert lines[0].startswith("placement colocate: 4 bundles")
    assert "     0  rank 0      engine 0 (local gpu 0)" in lines
    assert "     3  rank 3      engine 1 (local gpu 1)" in lines
    text = describe_plan(decoupled(request(1, 2, 2)), name="decoupled")
    assert "     1  rank 1      -" in text.splitlines()
    assert "     2  -           engine 0 (local gpu 0)" in text.splitlines()


def test_registered_and_conform(plugin_set):  # noqa: F811 - the imported fixture
    for name, fn in (("colocate", colocate), ("decoupled", decoupled)):
        entry = plugin_set.entry("placement", name)
        assert entry.obj is fn and entry.builtin
        check_placement(name)


def test_placement_module_imports_no_ray():
    code = ("import sys, plugrl.plugins.backends.placement as p\n"
            "from plugrl.core.protocols import PlacementRequest\n"
            "p.describe_plan(p.colocate(PlacementRequest(actor_num_gpus_per_node=8)))\n"
            "assert 'ray' not in sys.modules, 'ray was imported'\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)

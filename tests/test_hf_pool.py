"""HFEnginePool (plugins/backends/hf_pool.py): several embedded engines as Ray actors behind the
one-engine API, with real Ray on CPU. Checked against a single in-process engine: dispatch spreads
requests, a weight push reaches every engine, abort returns partial outputs, the per-engine sampling
RNGs checkpoint and restore."""

import asyncio

import pytest
import torch
from plugrl.plugins.backends.hf_engine import HFRolloutEngine
from plugrl.plugins.backends.tiny_default import build_tiny_checkpoint

PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny"))


@pytest.fixture(scope="module")
def pool(ckpt):
    import ray

    # Two fake GPUs: Ray hands out GPU ids and placement-group bundles without touching a device.
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    pool = HFRolloutEngine.from_placement(ckpt, placement={"bundles": [0, 1], "placement_group": None, "num_gpus": 0},
                                          device="cpu", seed=3, max_batch_size=8)
    yield pool
    pool.close()
    ray.shutdown()


def _generate_all(pool, requests):
    """Submit all at once (so the pool spreads them) and return results in order."""
    async def main():
        tasks = [asyncio.ensure_future(pool.generate(ids, params)) for ids, params in requests]
        await asyncio.sleep(0)  # every task has been dispatched
        dispatched = pool.in_flight()
        return dispatched, await asyncio.gather(*tasks)
    return asyncio.run(main())


def test_one_bundle_is_a_plain_engine(ckpt):
    engine = HFRolloutEngine.from_placement(ckpt, placement={"bundles": [0]}, device="cpu")
    try:
        assert isinstance(engine, HFRolloutEngine)
    finally:
        engine.close()


def test_requests_are_spread_and_answered(pool):
    greedy = {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True}
    dispatched, results = _generate_all(pool, [(PROMPT, greedy)] * 8)
    assert dispatched == [4, 4] and pool.in_flight() == [0, 0]
    assert all(len(r["tokens"]) == 6 and r["finish_reason"]["type"] == "length" for r in results)
    assert len({tuple(r["tokens"]) for r in results}) == 1  # greedy: both engines hold the same weights
    assert pool.health() and pool.load_stats() == {"num_running": 0, "num_waiting": 0}


def test_a_push_reaches_every_engine(pool, ckpt):
    reference = HFRolloutEngine(ckpt, device="cpu")
    try:
        torch.manual_seed(0)
        new = {name: p.detach() + 0.05 * torch.randn_like(p) for name, p in reference.model.named_parameters()}
        reference.update_weights(new, 7)
        pool.update_weights(new, 7)
        greedy = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}
        expected = asyncio.run(reference.generate(PROMPT, greedy))["tokens"]
        dispatched, results = _generate_all(pool, [(PROMPT, greedy)] * 2)  # one per engine
        assert dispatched == [1, 1]
        assert [r["tokens"] for r in results] == [expected, expected]
        assert {r["weight_version"] for r in results} == {"7"} and pool.weight_version == "7"
        assert pool.log_probs_of([PROMPT + expected], [8])[0] == pytest.approx(
            reference.log_probs_of([PROMPT + expected], [8])[0], abs=1e-6)
    finally:
        reference.close()


def test_abort_returns_partial_outputs_from_every_engine(pool):
    long = {"max_new_tokens": 100_000, "ignore_eos": True}

    async def main():
        tasks = [asyncio.ensure_future(pool.generate(PROMPT, long)) for _ in range(4)]
        while pool.load_stats()["num_running"] < 4:
            await asyncio.sleep(0.05)
        await pool.abort_all()
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    assert [r["finish_reason"]["type"] for r in results] == ["abort"] * 4
    assert all(0 < len(r["tokens"]) < 100_000 for r in results)


def test_sampling_state_restores_per_engine(pool):
    sampled = {"max_new_tokens": 12, "temperature": 1.0, "ignore_eos": True}
    state = pool.state_dict()
    assert len(state["engines"]) == 2
    _, first = _generate_all(pool, [(PROMPT, sampled)] * 2)
    pool.load_state_dict(state)
    _, again = _generate_all(pool, [(PROMPT, sampled)] * 2)
    assert [r["tokens"] for r in again] == [r["tokens"] for r in first]
    assert first[0]["tokens"] != first[1]["tokens"]  # seed + i: the engines draw different samples


def test_memory_calls_fan_out_and_errors_come_back(pool):
    pool.release_memory()
    pool.resume_memory(["weights"])
    pool.resume_memory(None)
    assert pool.gpu_memory_gib() is None  # CPU engines hold no GPU memory
    with pytest.raises(ValueError, match="unknown memory tags"):
        pool.release_memory(["activations"])


def test_rollout_manager_builds_a_pool_from_the_engine_placement(pool, ckpt):
    """The wiring the GPU loop uses (``engine_placement`` in the worker config), here with CPU engine
    actors: a rollout is generated across both engines with the trainer's log-probs after a push."""
    from plugrl.core.config import parse_config
    from plugrl.core.plugins import make_plugin_manager
    from plugrl.core.rollout_manager import RolloutManager
    from plugrl.core.train_worker import TrainWorker
    from plugrl.plugins.backends.hf_pool import HFEnginePool

    args = parse_config(["--recipe", "tiny-default", "--hf-checkpoint", ckpt, "--rollout-batch-size", "4",
                         "--n-samples-per-prompt", "4", "--global-batch-size", "16"],
                        make_plugin_manager(entry_points=False))
    config = {**vars(args), "device": "cpu", "rollout_device": "cpu",
              "engine_placement": {"bundles": [0, 1], "placement_group": None, "num_gpus": 0}}
    trainer, rollout = TrainWorker(config, total_optimizer_steps=2), RolloutManager(config)
    try:
        assert isinstance(rollout.engine, HFEnginePool) and len(rollout.engine) == 2
        import ray

        # as the driver pushes: a reference to the trainer's export, read by each engine actor
        rollout.update_weights(None, 1, by_reference=[ray.put(trainer.export_weights(None))])
        assert rollout.engine.weight_version == "1"
        data, _metrics = rollout.generate(0)
        assert len(data["tokens"]) == 16
        worst = max(abs(x - y) for p, q in zip(trainer.log_probs(data["tokens"], data["response_lengths"]),
                                               data["rollout_log_probs"]) for x, y in zip(p, q))
        assert worst < 1e-4
        assert all(s["generated_tokens"] > 0 for s in rollout.engine._all("stats"))  # both engines generated
    finally:
        rollout.close()


def test_engines_take_their_placement_group_bundles(pool, ckpt):
    """As on GPUs: engine i is pinned to bundle ``bundles[i]`` of the run's placement group and gets
    that bundle's GPU (fake GPUs here, CPU engines)."""
    import ray
    from plugrl.core.train_group import probe_bundles
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([{"GPU": 1, "CPU": 1}] * 2, strategy="PACK")
    ray.get(group.ready())
    try:
        gpu_of_bundle = {b: gpu for b, (_node, gpu) in enumerate(probe_bundles(group, 2))}
        placed = HFRolloutEngine.from_placement(
            ckpt, placement={"bundles": [1, 0], "placement_group": group, "num_gpus": 0.2}, device="cpu")
        try:
            got = [ray.get(actor.gpu_ids.remote()) for actor in placed.actors]
            assert [[int(g) for g in ids] for ids in got] == [[gpu_of_bundle[1]], [gpu_of_bundle[0]]]
            greedy = {"max_new_tokens": 3, "temperature": 0.0, "ignore_eos": True}
            assert len(asyncio.run(placed.generate(PROMPT, greedy))["tokens"]) == 3
        finally:
            placed.close()
    finally:
        remove_placement_group(group)

"""Streamed weight pushes between real Ray actors on CPU: a train rank (TrainWorker, torch backend)
and the rollout manager with its embedded hf engine, through the driver's ``WeightSync``: the gloo
broadcast group (the code NCCL runs on GPUs) and handles (``/dev/shm`` here, CUDA IPC on a GPU).
After a push the engine's log-probs are the trainer's; a push the engine refuses (a name/shape it
does not have) leaves its weights as they were; a dead train rank gives the train-rank death error."""

import pytest

ray = pytest.importorskip("ray")

from plugrl.core.config import parse_config  # noqa: E402
from plugrl.core.plugins import make_plugin_manager  # noqa: E402
from plugrl.core.rollout_manager import RolloutManager  # noqa: E402
from plugrl.core.train_group import RankDiedError, TrainGroup, remote_actor_class  # noqa: E402
from plugrl.core.train_worker import TrainWorker  # noqa: E402
from plugrl.core.weight_sync import BROADCAST, CUDA_IPC, OBJECT_STORE, WeightSync, WeightSyncError  # noqa: E402
from plugrl.plugins.backends.tiny_default import build_tiny_checkpoint  # noqa: E402

SEQUENCES = [[5, 17, 42, 9, 7, 8, 9], [3, 4, 5, 6, 11, 12]]
LENGTHS = [3, 2]


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


def _config(checkpoint):
    args = parse_config(["--recipe", "tiny-default", "--hf-checkpoint", str(checkpoint), "--rollout-batch-size", "4",
                         "--n-samples-per-prompt", "4", "--global-batch-size", "16", "--lr", "1e-2"],
                        make_plugin_manager(entry_points=False))
    return {**vars(args), "device": "cpu", "rollout_device": "cpu"}


@pytest.fixture(scope="module")
def actors(ray_local, tmp_path_factory):
    """A train rank on checkpoint A, the rollout manager's engine on checkpoint B (same shapes, other
    values: a push visibly changes the engine), and a train rank of another shape (checkpoint C)."""
    root = tmp_path_factory.mktemp("ckpts")
    a = build_tiny_checkpoint(root / "a", seed=0)
    b = build_tiny_checkpoint(root / "b", seed=1)
    c = build_tiny_checkpoint(root / "c", seed=2, intermediate_size=80)
    train = TrainGroup(remote_actor_class(TrainWorker), _config(a), 10, [{"num_cpus": 1}])
    other = TrainGroup(remote_actor_class(TrainWorker), _config(c), 10, [{"num_cpus": 1}])
    rollout = remote_actor_class(RolloutManager).options(num_cpus=1).remote(_config(b))
    ray.get(rollout.__ray_ready__.remote())
    yield train, other, rollout
    train.kill()
    other.kill()
    ray.kill(rollout)


def _max_diff(a, b):
    return max(abs(x - y) for p, q in zip(a, b) for x, y in zip(p, q))


def _engine_lp(rollout):
    return ray.get(rollout.engine_log_probs.remote(SEQUENCES, LENGTHS, 1.0))


def test_cpu_run_picks_the_object_store(actors):
    train, _, rollout = actors
    sync = WeightSync(train, rollout, use_gpu=False, bucket_bytes=4096)
    assert sync.name == OBJECT_STORE and not sync.streams


@pytest.mark.parametrize("transport", [BROADCAST, CUDA_IPC])
def test_streamed_push_makes_the_engine_compute_the_trainers_log_probs(actors, transport):
    train, _, rollout = actors
    ray.get(rollout.update_weights.remote(_reset_buckets(rollout), 0))  # back to checkpoint B's weights
    trainer_lp = train.log_probs(SEQUENCES, LENGTHS)
    assert _max_diff(_engine_lp(rollout), trainer_lp) > 1e-3  # different checkpoints
    sync = WeightSync(train, rollout, use_gpu=False, bucket_bytes=8192, transport=transport)
    assert sync.streams and sync.name == transport
    for version in (1, 2):  # the group and the actors serve push after push
        sync.push(version)
        assert _max_diff(_engine_lp(rollout), trainer_lp) < 1e-4
    if transport == CUDA_IPC:  # several buckets, each packed once, all freed at the end
        assert ray.get(train.actors[0].weights_end.remote(None)) == 0


_B_STATE = {}


def _reset_buckets(rollout):
    """Checkpoint B's weights (captured once from a fresh engine: the rollout manager's own)."""
    if not _B_STATE:
        from plugrl.plugins.backends.hf.engine import HFRolloutEngine

        path = ray.get(rollout.__ray_call__.remote(lambda self: self.args.hf_checkpoint))
        engine = HFRolloutEngine(path, device="cpu")
        _B_STATE.update({k: v.clone() for k, v in engine.model.state_dict().items()})
        engine.close()
    return [dict(_B_STATE)]


@pytest.mark.parametrize("transport", [BROADCAST, CUDA_IPC])
def test_push_of_unknown_shapes_is_refused_and_leaves_the_engine_as_it_was(actors, transport):
    _, other, rollout = actors
    before = _engine_lp(rollout)
    sync = WeightSync(other, rollout, use_gpu=False, bucket_bytes=8192, transport=transport)
    with pytest.raises(WeightSyncError, match=f"over {transport} failed: .*shape mismatch"):
        sync.push(7)
    assert _engine_lp(rollout) == before
    assert ray.get(rollout.__ray_call__.remote(lambda self: self.engine.weight_version)) != "7"
    assert ray.get(other.actors[0].weights_end.remote(None)) == 0  # the failed push's buffers are gone


def test_a_dead_train_rank_during_a_push_is_reported_as_its_death(actors):
    _, other, rollout = actors
    sync = WeightSync(other, rollout, use_gpu=False, bucket_bytes=8192, transport=CUDA_IPC)
    ray.kill(other.actors[0])
    with pytest.raises(RankDiedError, match="train rank 0 of 1"):
        sync.push(9)

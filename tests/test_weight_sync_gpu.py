"""CUDA IPC weight push on one GPU between two real Ray actors (run on the GPU machine:
``python -m pytest -m gpu tests/test_weight_sync_gpu.py -s``): a train rank (``TrainWorker``, torch
backend, bf16) and the embedded ``hf`` engine in its own actor, both on the one GPU (Ray gives each
its own CUDA_VISIBLE_DEVICES; the driver matches them by device UUID and must pick ``cuda_ipc``).

After a push the engine's weights equal the trainer's bit for bit and its log-probs agree; five
more pushes leave both processes' host memory where it was (nothing crosses through the host); a
push of the ~1.1 GB set takes well under a second."""

import os
import time

import pytest

torch = pytest.importorskip("torch")
ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# ~569M parameters, bf16: ~1.1 GB (tied embeddings). The tiny tokenizer's ids fit any vocabulary.
SHAPE = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 8,
         "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 512}
BUCKET_BYTES = 256 << 20
SEQUENCES = [[5, 17, 42, 9, 7, 8, 9, 11, 12, 13], [3, 4, 5, 6, 11, 12, 40, 41]]
LENGTHS = [5, 4]
# Same reasoning as tests/test_gpu_path.py: bf16 rounding over 8 layers moves a log-prob by at most
# a few 1e-2 nats between two implementations of one model; a wrong or stale weight moves it by more.
LOGPROB_DIFF_BOUND = 0.1
# Host memory growth over 5 pushes, per process. A host copy anywhere on the way (what the object
# store path does) costs the whole 1.1 GB set per push in some process, i.e. >= 1.1 GB here; what
# legitimately grows is Python/Ray bookkeeping and CUDA IPC ref-counter pages: a few MiB. 256 MiB
# sits far from both.
RSS_GROWTH_BOUND = 256 << 20


def _rss_probe():
    """A function ``actor.__ray_call__`` runs in the actor: its process's VmRSS. Nested, so Ray
    ships it by value (the tests directory need not be importable in the worker)."""

    def rss(self) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    return rss


def _engine_actor_class():
    """Defined in a function so Ray ships it by value (the tests directory need not be importable
    in the worker)."""

    class EngineActor:
        """The embedded hf engine in a Ray actor of its own, with the rollout manager's weight API."""

        def __init__(self, path: str):
            from plugrl.plugins.backends.hf.engine import HFRolloutEngine

            self.engine = HFRolloutEngine(path, device="cuda", dtype="bfloat16")

        def weight_receivers(self) -> list:
            import ray as ray_

            from plugrl.core.weight_handles import device_uuid

            return [{"uuid": device_uuid(), "node": ray_.util.get_node_ip_address(), "where": "test engine actor"}]

        def update_weights(self, payload, version) -> None:
            self.engine.update_weights(payload, version)

        def state(self) -> dict:
            return {k: v.detach().cpu() for k, v in self.engine.model.state_dict().items()}

        def log_probs(self, sequences, lengths):
            return self.engine.log_probs_of(sequences, lengths, 1.0)

        def version(self) -> str:
            return self.engine.weight_version

    return EngineActor


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from plugrl.core.config import parse_config
    from plugrl.core.plugins import make_plugin_manager
    from plugrl.core.train_group import TrainGroup, remote_actor_class
    from plugrl.core.train_worker import TrainWorker
    from plugrl.plugins.backends.tiny_default import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("ipc")
    trainer_ckpt = build_tiny_checkpoint(root / "trainer", seed=0, bf16=True, **SHAPE)
    engine_ckpt = build_tiny_checkpoint(root / "engine", seed=1, bf16=True, **SHAPE)  # other values
    args = parse_config(["--recipe", "tiny-default", "--hf-checkpoint", str(trainer_ckpt)],
                        make_plugin_manager(entry_points=False))
    config = {**vars(args), "device": "cuda", "rollout_device": "cuda", "bf16": True, "fp32": False}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    train = engine = None
    try:
        # fractions of the one GPU, as the colocated placement gives them
        train = TrainGroup(remote_actor_class(TrainWorker), config, 10, [{"num_cpus": 1, "num_gpus": 0.4}])
        engine = ray.remote(_engine_actor_class()).options(num_cpus=1, num_gpus=0.4).remote(str(engine_ckpt))
        ray.get(engine.__ray_ready__.remote())
        yield train, engine
    finally:
        if train is not None:
            train.kill()
        if engine is not None:
            ray.kill(engine)
        ray.shutdown()


def _trainer_state(train) -> dict:
    return {k: v.clone() for bucket in ray.get(train.export_weights(None)) for k, v in bucket.items()}


def test_ipc_push_on_one_gpu(pair):
    from plugrl.core.weight_sync import CUDA_IPC, WeightSync

    train, engine = pair
    sync = WeightSync(train, engine, use_gpu=True, bucket_bytes=BUCKET_BYTES)
    print(sync.choice.describe())
    assert sync.name == CUDA_IPC, sync.choice.describe()

    expected = _trainer_state(train)
    nbytes = sum(t.numel() * t.element_size() for name, t in expected.items() if name != "lm_head.weight")
    assert nbytes > 1e9
    before = ray.get(engine.state.remote())
    assert sorted(before) == sorted(expected)
    assert any(not torch.equal(before[k], expected[k]) for k in expected)  # a push has something to change
    del before

    sync.push(1)
    got = ray.get(engine.state.remote())
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    del got
    assert ray.get(engine.version.remote()) == "1"
    trainer_lp = train.log_probs(SEQUENCES, LENGTHS)
    engine_lp = ray.get(engine.log_probs.remote(SEQUENCES, LENGTHS))
    worst = max(abs(a - b) for p, q in zip(trainer_lp, engine_lp) for a, b in zip(p, q))
    print(f"max |trainer - engine| log-prob after the push: {worst:.4f} nats")
    assert worst < LOGPROB_DIFF_BOUND

    # Host memory across 5 pushes (after the first one: one-time CUDA/IPC setup is done by then).
    rank0 = train.actors[0]
    _rss_of_actor = _rss_probe()
    rss_before = {"trainer": ray.get(rank0.__ray_call__.remote(_rss_of_actor)),
                  "engine": ray.get(engine.__ray_call__.remote(_rss_of_actor))}
    seconds = []
    for version in range(2, 7):
        started = time.perf_counter()
        sync.push(version)
        seconds.append(time.perf_counter() - started)
    rss_after = {"trainer": ray.get(rank0.__ray_call__.remote(_rss_of_actor)),
                 "engine": ray.get(engine.__ray_call__.remote(_rss_of_actor))}
    growth = {k: rss_after[k] - rss_before[k] for k in rss_before}
    print(f"push of {nbytes / 1e9:.2f} GB: {[round(s, 3) for s in seconds]} s; "
          f"host RSS growth over 5 pushes: { {k: f'{v / 2**20:.1f} MiB' for k, v in growth.items()} }")
    assert all(g < RSS_GROWTH_BOUND for g in growth.values()), growth
    assert ray.get(engine.version.remote()) == "6"
    assert min(seconds) < 0.5, seconds  # CUDA IPC of ~1 GB: ~0.01-0.1 s on an H200; the host path took seconds
    # the trainer freed its buckets after each push: nothing is left open
    assert ray.get(rank0.weights_end.remote(None)) == 0
    final = ray.get(engine.state.remote())
    for name, tensor in expected.items():  # the trainer did not change: neither did the pushes' result
        assert torch.equal(final[name], tensor), name


def test_transport_is_logged_by_uuid_not_index(pair):
    """Both actors call their GPU cuda:0; the UUIDs they report are the same physical GPU."""
    train, engine = pair
    info = ray.get(train.actors[0].weight_source_info.remote())
    receivers = ray.get(engine.weight_receivers.remote())
    assert info["problem"] is None and info["uuid"] and info["uuid"] == receivers[0]["uuid"]
    visible = ray.get(engine.__ray_call__.remote(lambda self: os.environ.get("CUDA_VISIBLE_DEVICES")))
    assert visible is not None

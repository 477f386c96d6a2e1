"""Weight sync cost, trainer -> rollout engine: seconds and GB/s per transport and state size.

Runs on the driver machine (CPU, or GPUs with ``--device cuda``). For each size it writes a
random-init Qwen3 checkpoint (tiny tokenizer, bf16), starts one ``plugrl serve`` engine on it
(``python -m plugrl.plugins.backends.sglang.server`` with the flags ``launch.server_args`` computes,
as ``SGLangRolloutBackend`` does), and pushes that model's own state dict (perturbed, so every push
really changes the weights) through each path:

  embedded      ``HFRolloutEngine.update_weights`` from a dict, in this process (the baseline: no
                transport, just the in-place copy);
  tensor        ``POST /update_weights_from_tensor`` per bucket and dtype with SGLang's
                ``flattened_bucket`` format (``push_tensor``): the bucket is copied once into memory
                the engine maps, only handles travel over HTTP (CPU: /dev/shm; CUDA: IPC handles, the
                engine on the same GPU as the source tensors);
  distributed   ``init_weights_update_group`` once (not timed), then per bucket
                ``POST /update_weights_from_distributed`` + a broadcast (``DistributedPusher``): gloo
                (host memory: with ``--device cuda`` the buckets' device-to-host copies are timed
                too), and with ``--device cuda`` also NCCL into an engine on the second GPU (NCCL
                cannot connect two processes on one GPU, so that row needs 2 GPUs).

Every timed push is bracketed by nothing else (no pause/flush: those are constant HTTP round trips).

The in-loop transports (``core/weight_sync.py``), between two Ray actors (processes) as a run has
them: a train rank (``TrainWorker``, torch backend, holding the model) and the embedded engine in an
actor of its own, both on the one device (with CUDA: fractions of GPU 0, as colocated):

  loop-object-store  what the loop did before: the trainer offloads, exports host views of its offload
                     buffers through Ray's object store, the engine copies them onto its GPU;
  loop-ipc           the streamed push: flat GPU buckets packed by the trainer, opened by CUDA IPC
                     handle in the engine (``/dev/shm`` handles with ``--device cpu``).

The table then names the device and the ratio of the two rows.

    python benchmarks/weight_sync.py                      # CPU: ~4, 40, 200 MB states
    python benchmarks/weight_sync.py --device cuda --size 4b
    python benchmarks/weight_sync.py --device cuda --size 4b --paths tensor,distributed-nccl
    python benchmarks/weight_sync.py --device cuda --size 4b --paths loop-object-store,loop-ipc
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

# Qwen3 shapes (tiny tokenizer ids are a subset of any vocabulary). Sizes are bf16 state bytes.
SHAPES = {
    "4mb": {"vocab_size": 384, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64},
    "40mb": {"vocab_size": 384, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6,
              "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64},
    "200mb": {"vocab_size": 384, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 8,
               "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 128},
    "4b": {"vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960},
}


def build(size: str, directory: Path) -> Path:
    """A random bf16 Qwen3 checkpoint of ``SHAPES[size]`` with the tiny tokenizer."""
    from plugrl.plugins.backends.torch.tiny_default import build_tiny_checkpoint

    return build_tiny_checkpoint(directory / size, bf16=True, **SHAPES[size])


def start_engine(path: Path, device: str, log_dir: Path, gpu: int = 0):
    """One ``plugrl serve`` process on ``path`` (on GPU ``gpu`` with CUDA); returns (child, url)
    once it answers."""
    import httpx
    from plugrl.plugins.backends.sglang import launch

    port = launch.free_port()
    values = launch.server_args(model_path=str(path), host="127.0.0.1", port=port, tp_size=1, base_gpu_id=gpu,
                                seed=0, memory_saver=False, device=device.split(":")[0],
                                overrides={"dtype": "bfloat16"})
    argv = [sys.executable, "-m", "plugrl.plugins.backends.sglang.server", *launch.flag_words(values)]
    child = launch.start("engine", argv, log_dir=log_dir)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/health_generate", timeout=30, trust_env=False).status_code == 200
        except httpx.HTTPError:  # still loading
            return False

    launch.wait_until(up, timeout=600, interval=0.5, what="plugrl serve /health_generate", child=child)
    return child, url


def timed(fn, repeats: int) -> float:
    """Best (min) seconds of ``repeats`` calls after one untimed warm-up call: on a shared machine
    the minimum is the transport's cost, the rest is other processes' noise."""
    fn(0)
    times = []
    for i in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn(i + 1)
        times.append(time.perf_counter() - started)
    return min(times)


def embedded_seconds(path: Path, device: str, state: dict, repeats: int) -> float:
    """The baseline: a second engine in this process loads the dict in place (freed on return, so
    the served engine started next has the memory)."""
    from plugrl.plugins.backends.hf.engine import HFRolloutEngine

    engine = HFRolloutEngine(str(path), device=device, dtype="bfloat16")
    try:
        return timed(lambda v: engine.update_weights(state, v), repeats)
    finally:
        engine.close()


PATHS = ("embedded", "tensor", "distributed", "distributed-nccl", "loop-object-store", "loop-ipc")
LOOP_PATHS = ("loop-object-store", "loop-ipc")


def _engine_actor_class():
    """The embedded engine in its own actor, with the rollout manager's weight API (defined in a
    function so Ray ships it by value)."""

    class EngineActor:
        def __init__(self, path: str, device: str):
            from plugrl.plugins.backends.hf.engine import HFRolloutEngine

            self.engine = HFRolloutEngine(path, device=device, dtype="bfloat16")

        def weight_receivers(self) -> list:
            import ray

            from plugrl.core.weight_handles import device_uuid

            uuid = device_uuid() if self.engine.device.type == "cuda" else None
            return [{"uuid": uuid, "node": ray.util.get_node_ip_address(), "where": "benchmark engine"}]

        def update_weights(self, payload, version) -> None:
            self.engine.update_weights(payload, version)

    return EngineActor


def loop_rows(path: Path, device: str, repeats: int, buffer_size: int, paths: tuple[str, ...]) -> dict:
    """Seconds of each in-loop transport in ``paths`` (see the module docstring)."""
    import ray
    from plugrl.core.config import parse_config
    from plugrl.core.plugins import make_plugin_manager
    from plugrl.core.train_group import TrainGroup, remote_actor_class
    from plugrl.core.train_worker import TrainWorker
    from plugrl.core.weight_sync import CUDA_IPC, OBJECT_STORE, WeightSync

    cuda = device != "cpu"
    args = parse_config(["--recipe", "tiny-default", "--hf-checkpoint", str(path)], make_plugin_manager(entry_points=False))
    config = {**vars(args), "device": "cuda" if cuda else "cpu", "rollout_device": "cuda" if cuda else "cpu",
              "bf16": True, "fp32": False}
    share = {"num_cpus": 1, "num_gpus": 0.4} if cuda else {"num_cpus": 1}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    out = {}
    train = engine = None
    try:
        train = TrainGroup(remote_actor_class(TrainWorker), config, 1, [share])
        engine = ray.remote(_engine_actor_class()).options(**share).remote(str(path), "cuda" if cuda else "cpu")
        ray.get(engine.__ray_ready__.remote())
        if "loop-object-store" in paths:
            sync = WeightSync(train, engine, use_gpu=cuda, bucket_bytes=buffer_size, transport=OBJECT_STORE)
            if cuda:
                train.offload()  # as the loop pushed: from host views of the offload buffers
            try:
                out["loop-object-store"] = timed(sync.push, repeats)
            finally:
                if cuda:
                    train.onload()
        if "loop-ipc" in paths:
            # on CUDA the driver's own choice must be CUDA IPC (same GPU by UUID); CPU forces the shm handles
            sync = WeightSync(train, engine, use_gpu=cuda, bucket_bytes=buffer_size,
                              transport=None if cuda else CUDA_IPC)
            if sync.name != CUDA_IPC:
                raise RuntimeError(f"expected CUDA IPC between two actors on one GPU, got {sync.choice.describe()}")
            out["loop-ipc"] = timed(sync.push, repeats)
    finally:
        if train is not None:
            train.kill()
        if engine is not None:
            ray.kill(engine)
        ray.shutdown()
    return out


def _checkpoint_state(path: Path, device: str = "cpu") -> dict:
    from plugrl.plugins.backends.hf.engine import HFRolloutEngine

    engine = HFRolloutEngine(str(path), device=device, dtype="bfloat16")
    try:
        return dict(engine.model.state_dict())
    finally:
        engine.close()


def bench_size(size: str, device: str, repeats: int, buffer_size: int, workdir: Path,
               paths: tuple[str, ...] = PATHS) -> list[tuple]:
    import httpx
    from plugrl.plugins.backends.sglang import launch
    from plugrl.plugins.backends.sglang.weights import DistributedPusher, push_tensor
    from plugrl.plugins.backends.sglang.wire import bucket_by_size

    path = build(size, workdir)
    # The trainer's side: the same names and shapes, different values, on the source device.
    state = {n: (t + 0.01).to(device) for n, t in _checkpoint_state(path, device).items()}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    pairs = list(state.items())
    count = len(pairs)
    rows = []

    def row(path_name: str, seconds: float) -> None:
        rows.append((path_name, device, size, nbytes / 1e6, count, seconds, nbytes / seconds / 1e9))
        print(f"  {path_name:<17} {seconds:8.3f} s", file=sys.stderr, flush=True)

    if "embedded" in paths:
        row("embedded", embedded_seconds(path, device, state, repeats))
    if any(p in paths for p in LOOP_PATHS):
        del state, pairs  # the loop rows' actors hold their own copies
        if device != "cpu":
            torch.cuda.empty_cache()
        for name, seconds in loop_rows(path, device, repeats, buffer_size, paths).items():
            row(name, seconds)
        if not set(paths) - set(LOOP_PATHS) - {"embedded"}:
            return rows
        state = {n: (t + 0.01).to(device) for n, t in _checkpoint_state(path).items()}
        pairs = list(state.items())
    buckets = bucket_by_size(pairs, buffer_size)
    if "tensor" in paths or "distributed" in paths:
        child, url = start_engine(path, device, workdir)
        client = httpx.Client(timeout=httpx.Timeout(3600.0, connect=10.0), trust_env=False)
        try:
            if "tensor" in paths:
                row("tensor", timed(lambda v: push_tensor(client, [url], buckets, str(v), tp_sizes=[1]), repeats))
            if "distributed" in paths:
                pusher = DistributedPusher(client, [url], host="127.0.0.1", port=launch.free_port(), backend="gloo")
                try:
                    def broadcast(v: int) -> None:
                        # gloo sends host memory: CUDA buckets pay their device-to-host copy here.
                        host = [[(n, t.cpu()) for n, t in b] for b in buckets] if device != "cpu" else buckets
                        pusher.push(host, str(v))

                    row("distributed", timed(broadcast, repeats))
                finally:
                    pusher.close()
        finally:
            client.close()
            child.stop()
    if device != "cpu" and "distributed-nccl" in paths:
        if torch.cuda.device_count() < 2:
            print("  distributed-nccl skipped: NCCL cannot broadcast between two processes on one GPU; "
                  "it needs 2 GPUs (engine on cuda:1)", file=sys.stderr, flush=True)
        else:
            child, url = start_engine(path, device, workdir, gpu=1)
            client = httpx.Client(timeout=httpx.Timeout(3600.0, connect=10.0), trust_env=False)
            try:
                pusher = DistributedPusher(client, [url], host="127.0.0.1", port=launch.free_port(), backend="nccl")
                try:
                    row("distributed-nccl", timed(lambda v: pusher.push(buckets, str(v)), repeats))
                finally:
                    pusher.close()
            finally:
                client.close()
                child.stop()
    return rows


def device_name(device: str) -> str:
    if device == "cpu":
        return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--size", default=None, help=f"comma list of {sorted(SHAPES)} (default: 4mb,40mb,200mb)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--buffer-size", type=int, default=512 << 20, help="bucket bytes (slime's default 512 MiB)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma list of {list(PATHS)} (default: all; "
                   "distributed-nccl runs with --device cuda only; loop-* start a local Ray)")
    args = p.parse_args(argv)
    paths = tuple(args.paths.split(","))
    if unknown := [name for name in paths if name not in PATHS]:
        p.error(f"unknown path(s) {unknown}; known: {list(PATHS)}")
    sizes = (args.size or "4mb,40mb,200mb").split(",")
    if unknown := [s for s in sizes if s not in SHAPES]:
        p.error(f"unknown size(s) {unknown}; known: {sorted(SHAPES)}")
    device = "cuda:0" if args.device == "cuda" else "cpu"
    rows = []
    with tempfile.TemporaryDirectory(prefix="plugrl-weight-sync-") as tmp:
        for size in sizes:
            print(f"{size}:", file=sys.stderr, flush=True)
            rows += bench_size(size, device, args.repeats, args.buffer_size, Path(tmp), paths)
    print(f"device: {device_name(device)}; torch {torch.__version__}; bucket {args.buffer_size >> 20} MiB; "
          f"best of {args.repeats} pushes after a warm-up")
    print(f"| {'path':<17} | {'device':<6} | {'size':<5} | {'MB':>8} | {'tensors':>7} | {'seconds':>8} | {'GB/s':>6} |")
    print(f"|{'-' * 19}|{'-' * 8}|{'-' * 7}|{'-' * 10}|{'-' * 9}|{'-' * 10}|{'-' * 8}|")
    for name, dev, size, mb, count, seconds, gbps in rows:
        print(f"| {name:<17} | {dev:<6} | {size:<5} | {mb:8.1f} | {count:7d} | {seconds:8.3f} | {gbps:6.3f} |")
    for size in sizes:
        loop = {name: seconds for name, _, s, _, _, seconds, _ in rows if s == size and name in LOOP_PATHS}
        if len(loop) == 2:
            print(f"{size}: loop-object-store / loop-ipc = {loop['loop-object-store'] / loop['loop-ipc']:.1f}x "
                  f"({loop['loop-object-store']:.3f} s vs {loop['loop-ipc']:.3f} s per push) on {device_name(device)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

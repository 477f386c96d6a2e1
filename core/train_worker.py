"""``TrainWorker``: the body of one train Ray actor (one rank); builds the selected train backend in-process.

Only plain data crosses the actor boundary: the config dict in, metric dicts and weight buckets out.

Fan-out calling convention (the driver side is ``core/train_group.py``; every train backend relies on it):

* The driver calls ``train``, ``export_weights``, ``save``, ``load``, ``save_hf``, ``offload``,
  ``onload``, ``sft_warmup`` and ``log_probs`` on ALL ranks, with the same arguments (``train``'s data
  is one ``ray.put`` object shared by every rank), because a backend may run collectives inside any
  of them. It waits for every rank and uses rank 0's return value.
* ``train``: each backend takes its own data-parallel share of ``data`` (the whole rollout) and
  returns metrics that are already reduced over ranks (rank 0's are logged).
* ``export_weights``: rank 0 returns the HF-named buckets, other ranks ``[]``.
* ``save`` / ``save_hf``: the backend decides who writes (all ranks must return); ``load``: every
  rank restores its state from the same directory (a filesystem the driver and all ranks share).
* ``progress()`` is polled on rank 0 only, from the driver, while ``train`` runs.
* Streamed weight pushes (``core/weight_sync.py``) call rank 0 only, with no collectives in between:
  ``weight_source_info`` once at start, ``weights_join`` once (broadcast transport), then per push
  ``weights_begin`` -> ``weights_bucket`` (pulled by each engine) or ``weights_broadcast`` ->
  ``weights_end``. A backend streams when it has ``weight_sources()`` (live HF-named tensors on its
  device, rank 0 holding the whole model) and no ``weight_stream_problem()``.

The torch.distributed rendezvous (env vars set by ``build`` before the backend exists) is described in
``core/train_group.py``.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from types import SimpleNamespace


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


class TrainWorker:
    """One rank. ``TrainWorker(config, steps)`` builds the backend at once (in-process use, world of
    one); the train group passes ``build=False`` and calls ``node_address`` then ``build(dist_env)``."""

    def __init__(self, config: dict, total_optimizer_steps: int, *, build: bool = True):
        self.args = SimpleNamespace(**config)
        self.total_optimizer_steps = total_optimizer_steps
        self.backend = None
        if build:
            self.build()

    def node_address(self) -> tuple[str, int]:
        """In the actor, before ``build``: this node's IP and a port free on it right now (the driver
        uses rank 0's pair as MASTER_ADDR / MASTER_PORT)."""
        import socket

        import ray

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def build(self, dist_env: dict | None = None) -> None:
        """Set the rendezvous env vars (if any), then build the backend, which joins the process group."""
        from .plugins import load_plugins

        if dist_env:
            os.environ.update({k: str(v) for k, v in dist_env.items()})
            local_ranks = int(dist_env.get("LOCAL_WORLD_SIZE", 1))
            if local_ranks > 1:
                import torch

                # Ranks of one node train at the same time: split the cores instead of oversubscribing.
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
        plugin_set = load_plugins()
        from .plugin_config import PluginConfig
        from .plugin_options import build_estimator

        estimator = build_estimator(plugin_set.entry("advantage_estimator", self.args.advantage_estimator), self.args)
        backend_cls = plugin_set.get("train_backend", self.args.train_backend)
        # A line before and after (rank 0): building a large model takes minutes and reports nothing itself.
        started = time.monotonic()
        if _is_rank0():
            print(f"[model build] {self.args.train_backend} backend from {self.args.hf_checkpoint}", flush=True)
        # The backend reads core's settings and its own flags only (core/plugin_config.py).
        backend_config = PluginConfig.for_plugin(self.args, "train_backend", self.args.train_backend)
        self.backend = backend_cls(backend_config, estimator=estimator, total_optimizer_steps=self.total_optimizer_steps)
        if _is_rank0():
            print(f"[model build] done in {time.monotonic() - started:.0f} s", flush=True)

    def train(self, rollout_id: int, data: dict) -> dict:
        return self.backend.train(rollout_id, data)

    def progress(self) -> dict:
        """Micro-batches done in the running ``train`` call (polled by the driver)."""
        return {"train": getattr(self.backend, "progress", (0, 0))}

    def export_weights(self, bucket_bytes: int | None = None) -> list:
        return self.backend.export_weights(bucket_bytes)

    # ---- streamed weight pushes (rank 0; core/weight_sync.py) ----------------------------------
    def weight_source_info(self) -> dict:
        """Where this rank's weights live and whether its backend can stream them."""
        import ray

        from .weight_handles import device_uuid

        problem = None
        if not callable(getattr(self.backend, "weight_sources", None)):
            problem = f"the {self.args.train_backend} train backend has no weight_sources()"
        elif callable(getattr(self.backend, "weight_stream_problem", None)):
            problem = self.backend.weight_stream_problem()
        device = getattr(self.backend, "device", None)
        on_gpu = getattr(device, "type", None) == "cuda"
        return {"uuid": device_uuid() if on_gpu else None, "node": ray.util.get_node_ip_address(),
                "problem": problem}

    def weights_begin(self, bucket_bytes: int | None, push_id: int) -> list:
        """Plan push ``push_id`` over the live weights; returns its manifest (``[BucketSpec]``)."""
        from .weight_source import WeightSource

        self.weights_end(None)
        named, dtype = self.backend.weight_sources()
        self._weight_source = WeightSource(named, bucket_bytes or None, dtype=dtype)
        self._weight_push_id = int(push_id)
        return self._weight_source.manifest()

    def _source_of(self, push_id: int):
        source = getattr(self, "_weight_source", None)
        if source is None or self._weight_push_id != int(push_id):
            raise RuntimeError(f"weight push {push_id} is not open on this train rank "
                               f"(open: {getattr(self, '_weight_push_id', None)})")
        return source

    def weights_bucket(self, push_id: int, index: int) -> dict:
        """A handle of bucket ``index`` (CUDA IPC / ``/dev/shm``), pulled by an engine."""
        return self._source_of(push_id).bucket(int(index))

    def weights_broadcast(self, push_id: int, group_name: str) -> bool:
        """Send every bucket to the weight group; False when an engine refused the push."""
        from .weight_broadcast import get

        return self._source_of(push_id).broadcast(get(group_name))

    def weights_end(self, push_id: int | None) -> int:
        """Free the push's buffers (any open push when ``push_id`` is None); returns how many
        buffers were packed (a bucket pulled again after its buffer went is packed again)."""
        source = getattr(self, "_weight_source", None)
        if source is None or (push_id is not None and self._weight_push_id != int(push_id)):
            return 0
        self._weight_source = None
        source.end()
        return source.packs

    def weights_join(self, name: str, address: str, port: int, world_size: int, backend: str) -> None:
        """Host the weight broadcast group as its rank 0 (``core/weight_broadcast.py``)."""
        from .weight_broadcast import join

        join(name, address, port, 0, world_size, backend=backend)

    def save(self, path: str) -> None:
        self.backend.save(path)

    def load(self, path: str) -> None:
        self.backend.load(path)

    def save_hf(self, path: str) -> None:
        self.backend.save_hf(path)

    def offload(self) -> None:
        self.backend.offload()

    def onload(self) -> None:
        self.backend.onload()

    def release_cached_memory(self) -> None:
        """Colocated GPU, streamed push: give the allocator's cached, unused blocks (training's
        activations) back to the GPU before the engine resumes its weights next to this state."""
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def sft_warmup(self, path: str, *, steps: int, batch_size: int, lr: float, prompt_loss_weight: float,
                   seed: int) -> list[float]:
        """Supervised format warm-up on a JSONL of {prompt, response} rows (chat template applied).
        Every rank draws the same batches (same seed); the backend splits each batch over ranks."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.args.hf_checkpoint)
        examples = []
        with open(path) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    prompt = row["prompt"]
                    if self.args.apply_chat_template and isinstance(prompt, str):
                        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                               tokenize=False, add_generation_prompt=True)
                    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
                    response_ids = tokenizer.encode(row["response"], add_special_tokens=False)
                    examples.append((prompt_ids + response_ids, len(response_ids)))
        rng = random.Random(seed)
        batches = []
        for _ in range(steps):
            chosen = rng.sample(examples, min(batch_size, len(examples)))
            batches.append(([e[0] for e in chosen], [e[1] for e in chosen]))
        from .progress import progress_iter

        # A line every 30 s from rank 0 (forwarded to the driver's output): the default run's warm-up is long.
        batches = progress_iter(batches, "[format warm-up]", unit="step", stream=sys.stdout, bar=False,
                                enabled=_is_rank0())
        return self.backend.sft_warmup(batches, lr=lr, prompt_loss_weight=prompt_loss_weight)

    def log_probs(self, sequences: list[list[int]], response_lengths: list[int]) -> list[list[float]]:
        """The trainer's response log-probs for fixed sequences (weight-push checks); called on every
        rank (a backend's forward may be a collective)."""
        return self.backend.log_probs(sequences, response_lengths)

"""The driver's weight push, trainer -> rollout engines, and its choice of transport.

Chosen once at start from where the weights live (``choose_transport``: train rank 0's GPU and each
engine process's GPU, by device UUID, as the actors report them) and printed:

  cuda_ipc      every engine is on train rank 0's GPU (colocated): per bucket the trainer packs a flat
                GPU buffer (megatron -> HF names mapped there) and each engine opens it by CUDA IPC
                handle and copies it into its parameters; the object store carries handles and the
                manifest only (``core/weight_source.py``, ``core/weight_stream.py``);
  broadcast     every engine is on another GPU: the buckets are broadcast over a weight group of
                train rank 0 and the engine processes (NCCL; gloo on CPU, ``core/weight_broadcast.py``);
  object_store  CPU runs, backends that cannot stream (megatron TP > 1), engines the rollout backend
                launches itself, engines on a mix of both: rank 0's host export through Ray's object
                store (``core/weight_buckets.py``), as before.

The streamed transports read the trainer's weights on its GPU, so the colocated loop pushes before it
offloads the trainer (``sync_steps``). Runs on the driver.
"""

from __future__ import annotations

import logging
import uuid as uuidlib
from dataclasses import dataclass

logger = logging.getLogger(__name__)

OBJECT_STORE, CUDA_IPC, BROADCAST = "object_store", "cuda_ipc", "broadcast"
TRANSPORTS = (OBJECT_STORE, CUDA_IPC, BROADCAST)
WINDOW_BUCKETS = 2  # flat buckets a streamed push holds at once (core/weight_source.WINDOW)


class WeightSyncError(RuntimeError):
    """A weight push failed while both the trainer and the rollout manager are alive."""


@dataclass(frozen=True)
class TransportChoice:
    name: str
    reason: str
    backend: str | None = None  # the broadcast group's torch.distributed backend

    def describe(self) -> str:
        via = f" over {self.backend}" if self.backend else ""
        return f"weight sync: {self.name}{via} ({self.reason})"


def choose_transport(*, use_gpu: bool, trainer: dict | None, receivers: list[dict] | None) -> TransportChoice:
    """Pure: the transport for train rank 0's ``trainer`` info (``{"uuid", "problem"}``) and the
    engines' ``receivers`` (``[{"uuid"}]``, None when the engines are not plugrl's to stream into)."""
    if not use_gpu:
        return TransportChoice(OBJECT_STORE, "CPU run")
    if trainer is None or trainer.get("problem"):
        return TransportChoice(OBJECT_STORE, f"the trainer cannot stream its weights: "
                                             f"{(trainer or {}).get('problem') or 'no information'}")
    if trainer.get("uuid") is None:
        return TransportChoice(OBJECT_STORE, "train rank 0 is not on a GPU")
    if not receivers:
        return TransportChoice(OBJECT_STORE, "the rollout backend pushes to engines it launched itself")
    gpu = trainer["uuid"]
    if any(r.get("uuid") is None for r in receivers):
        return TransportChoice(OBJECT_STORE, "an engine is not on a GPU")
    same = sum(r["uuid"] == gpu for r in receivers)
    if same == len(receivers):
        return TransportChoice(CUDA_IPC, f"{'the engine is' if same == 1 else f'all {same} engines are'} on train "
                                         f"rank 0's GPU {gpu}")
    if same == 0:
        return TransportChoice(BROADCAST, f"{len(receivers)} engine(s) on other GPUs than train rank 0's", "nccl")
    return TransportChoice(OBJECT_STORE, f"{same} of {len(receivers)} engines share train rank 0's GPU and the "
                                         "others do not; mixing CUDA IPC and broadcast is not supported")


def expected_transport(args, *, colocated: bool, on_gpu: bool = True) -> str:
    """What ``choose_transport`` will pick for a config, predicted on the driver before any actor
    exists (the memory plan, ``--dry-run``); the run itself decides from the actors' reports."""
    from .plugin_traits import engine_pool, parallel_sizes

    forced = getattr(args, "weight_transport", "auto") or "auto"
    if forced != "auto":
        return forced  # --weight-transport (checked against the placement on the driver)
    if not on_gpu or engine_pool(args) != "actors":
        return OBJECT_STORE
    if parallel_sizes(args).tp > 1:  # no rank holds whole tensors: the backend's weight_stream_problem
        return OBJECT_STORE
    if not colocated:
        return BROADCAST
    # one engine sits on train rank 0's GPU; more engines colocated are on other train GPUs too (mixed)
    return CUDA_IPC if colocated_engine_count(args) == 1 else OBJECT_STORE


def colocated_engine_count(args) -> int:
    """Engines a colocated run starts (one per ``--rollout-num-gpus-per-engine`` train GPUs)."""
    train_gpus = int(args.actor_num_nodes) * int(args.actor_num_gpus_per_node)
    rollout_gpus = int(getattr(args, "rollout_num_gpus", None) or train_gpus)  # colocate's default
    per_engine = max(1, int(getattr(args, "rollout_num_gpus_per_engine", 1) or 1))
    return max(1, -(-rollout_gpus // per_engine))


def sync_steps(*, colocated: bool, offload_train: bool, offload_rollout: bool, streams: bool,
               pushing: bool) -> list[str]:
    """The colocated GPU loop's steps after ``train``, in order: ``offload_train``,
    ``resume_weights``, ``push``, ``resume_kv``. A streamed push reads the trainer's weights on
    the GPU, so there both models' weights are resident at the push and the trainer offloads after
    it (the engine's KV cache comes back only then: ``core/memory_plan.py`` counts that moment);
    first ``trim_train`` hands the trainer's cached, unused GPU blocks (training's activations)
    back, so the engine's weights have room."""
    steps: list[str] = []
    if colocated and offload_train and not streams:
        steps.append("offload_train")
    if colocated and offload_train and streams:
        steps.append("trim_train")
    if colocated and offload_rollout:
        steps.append("resume_weights")
    if pushing:
        steps.append("push")
    if colocated and offload_train and streams:
        steps.append("offload_train")
    if colocated and offload_rollout:
        steps.append("resume_kv")
    return steps


def first_push_steps(*, colocated: bool, offload_train: bool, streams: bool) -> list[str]:
    """Before rollout 0: the first push, and (colocated) the trainer's offload, in order."""
    if colocated and offload_train:
        return ["push", "offload_train"] if streams else ["offload_train", "push"]
    return ["push"]


class WeightSync:
    """One run's weight pushes. ``transport``: force one (tests, benchmarks); ``backend``: the
    broadcast group's backend when forced (default nccl on GPU, gloo on CPU)."""

    def __init__(self, train_group, rollout, *, use_gpu: bool, bucket_bytes: int | None,
                 engine_by_reference: bool = False, transport: str | None = None, backend: str | None = None):
        import ray

        self.train, self.rollout = train_group, rollout
        self.rank0 = train_group.actors[0]
        self.bucket_bytes = int(bucket_bytes) if bucket_bytes else None
        self.engine_by_reference = engine_by_reference
        self.group_name = None
        self._push_id = 0
        receivers = None
        if transport is None and not use_gpu:
            self.choice = choose_transport(use_gpu=False, trainer=None, receivers=None)
        elif transport is None:
            trainer = ray.get(self.rank0.weight_source_info.remote())
            receivers = ray.get(rollout.weight_receivers.remote()) if use_gpu and not trainer.get("problem") else None
            self.choice = choose_transport(use_gpu=use_gpu, trainer=trainer, receivers=receivers)
        else:
            if transport not in TRANSPORTS:
                raise ValueError(f"unknown weight transport {transport!r}; known: {list(TRANSPORTS)}")
            if transport == BROADCAST:
                receivers = ray.get(rollout.weight_receivers.remote())
                if not receivers:
                    raise ValueError("broadcast weight transport: the rollout backend reports no engine processes")
            self.choice = TransportChoice(transport, "forced", (backend or ("nccl" if use_gpu else "gloo"))
                                          if transport == BROADCAST else None)
        if self.choice.name == BROADCAST:
            self._join(len(receivers))
        logger.info(self.choice.describe())

    @property
    def name(self) -> str:
        return self.choice.name

    @property
    def streams(self) -> bool:
        """True when the push reads the trainer's weights on its device (the loop pushes before offloading)."""
        return self.choice.name != OBJECT_STORE

    def _join(self, num_receivers: int) -> None:
        import ray

        address, port = ray.get(self.rank0.node_address.remote())
        self.group_name = f"plugrl-weights-{uuidlib.uuid4().hex[:8]}"
        world = 1 + num_receivers
        # every member at once: the group's rendezvous waits for all of them
        ray.get([self.rank0.weights_join.remote(self.group_name, address, port, world, self.choice.backend),
                 self.rollout.join_weight_group.remote(self.group_name, address, port, 1, world,
                                                       self.choice.backend)])

    # ---- one push -------------------------------------------------------------------------------
    def push(self, version: int) -> None:
        """Push train rank 0's current weights to every engine as weight version ``version``."""
        if self.choice.name == OBJECT_STORE:
            self._push_object_store(version)
            return
        import ray

        self._push_id += 1
        push_id = self._push_id
        try:
            manifest = ray.get(self.rank0.weights_begin.remote(self.bucket_bytes, push_id))
            if self.choice.name == CUDA_IPC:
                from .weight_stream import HandleStream

                ray.get(self.rollout.update_weights.remote(HandleStream(self.rank0, manifest, push_id), version))
            else:
                from .weight_stream import BroadcastStream

                sent = self.rank0.weights_broadcast.remote(push_id, self.group_name)
                received = self.rollout.update_weights.remote(BroadcastStream(self.group_name, manifest, push_id),
                                                              version)
                ray.get([received, sent])  # the engine's error first: it says why it refused
        except Exception as exc:  # noqa: BLE001 - re-raised as the clearest of three errors below
            self._raise_push_error(exc, version)
        ray.get(self.rank0.weights_end.remote(push_id))

    def _push_object_store(self, version: int) -> None:
        import ray

        buckets = self.train.export_weights(self.bucket_bytes)  # rank 0's, as an ObjectRef
        if self.engine_by_reference:  # engine actors read the export from the object store themselves
            ray.get(self.rollout.update_weights.remote(None, version, by_reference=[buckets]))
        else:  # Ray resolves the reference for the rollout manager
            ray.get(self.rollout.update_weights.remote(buckets, version))

    def _raise_push_error(self, exc: BaseException, version: int):
        """A dead train rank 0 -> RankDiedError; a dead rollout manager -> its RayActorError; else
        WeightSyncError naming the transport, with the engine's or trainer's own message."""
        import ray

        from .train_group import RankDiedError

        try:
            ray.get(self.rank0.__ray_ready__.remote(), timeout=60)
        except ray.exceptions.RayActorError as dead:
            raise RankDiedError(0, len(self.train.actors), dead) from exc
        except ray.exceptions.GetTimeoutError:
            pass
        ray.get(self.rollout.__ray_ready__.remote(), timeout=60)  # raises RayActorError if it died
        try:  # free the trainer's buffers; the run may go on after the caller handles the error
            ray.get(self.rank0.weights_end.remote(None), timeout=60)
        except Exception as cleanup:  # noqa: BLE001 - the push error below is the one to report
            logger.warning("freeing the failed push's buffers: %s", cleanup)
        cause = getattr(exc, "cause", None) or exc
        lines = [line for line in str(cause).splitlines() if line.strip()]
        detail = lines[-1] if lines else type(cause).__name__
        raise WeightSyncError(f"weight push to version {version} over {self.choice.name} failed: {detail}") from exc

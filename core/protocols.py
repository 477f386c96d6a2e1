"""The contracts of each plugin kind. Pure Python (torch only in type hints), importable anywhere.

Which process calls what:
  reward                 rollout manager, per sample or per group
  advantage_estimator    ``shape_rewards`` in the rollout manager, ``compute`` in the train actors
  filter                 rollout manager, once per finished group
  buffer_policy          rollout manager
  placement              driver, before any actor exists
  train/rollout backend  inside their actors
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Sequence, runtime_checkable

from .types import FilterDecision, Group, Sample, option

if TYPE_CHECKING:  # torch is not needed to import the contracts
    import torch


# ---------------------------------------------------------------------------------------------------
# Advantage estimators
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdvantageInputs:
    """Per-sample response-aligned tensors handed to ``compute`` on the train side.

    ``rewards[i]`` is the (shaped) scalar reward of sample i, ``raw_rewards[i]`` the unshaped one;
    ``kl[i]``, ``values[i]``, ``loss_masks[i]`` have ``response_lengths[i]`` entries.
    """

    rewards: Sequence[float]
    loss_masks: Sequence["torch.Tensor"]
    response_lengths: Sequence[int]
    raw_rewards: Sequence[float] | None = None
    kl: Sequence["torch.Tensor"] | None = None
    values: Sequence["torch.Tensor"] | None = None


class AdvantageEstimator:
    """Base class for estimators; subclasses set ``name`` and override what they need.

    Built by core (``plugin_options.build_estimator``, in the rollout manager and in every train
    actor) as ``cls(options)`` with its declared options object (subclass ``OptionsEstimator``, the
    way every bundled estimator does), or as ``cls(args)`` with the run config namespace when it
    declares no options type (then read it with ``getattr`` and defaults).
    """

    name: ClassVar[str] = ""
    needs_ref_log_probs: ClassVar[bool] = False
    needs_critic: ClassVar[bool] = False
    normalizes_group_rewards: ClassVar[bool] = False

    def __init__(self, args: Any = None):
        self.args = args

    def option(self, key: str, default: Any) -> Any:
        return option(self.args, key, default)

    @classmethod
    def check_config(cls, args: Any) -> None:
        """On the driver, before any actor starts; raise ``ValueError`` naming the flag."""

    def shape_rewards(self, rewards: "torch.Tensor") -> "torch.Tensor":
        """Rollout side: ``rewards[n_groups, n]`` raw rewards -> rewards the train side receives."""
        return rewards

    def compute(self, inputs: AdvantageInputs) -> tuple[list["torch.Tensor"], list["torch.Tensor"]]:
        """Train side: per-sample token advantages and returns, each of ``response_lengths[i]``."""
        raise NotImplementedError(f"estimator '{self.name}' must implement compute()")


# ---------------------------------------------------------------------------------------------------
# Buffer policies (partial rollout)
# ---------------------------------------------------------------------------------------------------


@runtime_checkable
class BufferPolicy(Protocol):
    def add(self, groups: list[Group]) -> None: ...

    def take(self, n: int, rollout_id: int | None = None) -> list[Group]: ...

    def __len__(self) -> int: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


# ---------------------------------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlacementRequest:
    """What the run needs, from ``--actor-num-nodes --actor-num-gpus-per-node --rollout-num-gpus
    --rollout-num-gpus-per-engine --num-gpus-per-node``; ``options``: the placement's declared options
    object (``--placement-opt``), or the plain dict of pairs when it declares none."""

    actor_num_nodes: int = 1
    actor_num_gpus_per_node: int = 1
    rollout_num_gpus: int | None = None
    rollout_num_gpus_per_engine: int = 1
    num_gpus_per_node: int = 8
    options: Any = None

    @property
    def actor_gpus(self) -> int:
        return self.actor_num_nodes * self.actor_num_gpus_per_node


@dataclass(frozen=True)
class PlacementPlan:
    """Bundle indices (one bundle = one GPU and one CPU) for each role, in sorted-bundle order."""

    num_bundles: int
    actor_bundles: tuple[int, ...]
    rollout_offset: int
    rollout_bundles: tuple[int, ...]
    engine_bundles: tuple[tuple[int, ...], ...]  # one tuple of bundles per rollout engine
    colocated: bool
    notes: tuple[str, ...] = field(default_factory=tuple)


# ---------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------


class RolloutEngine(Protocol):
    """One generation engine (embedded ``hf``, its GPU pool, or SGLang servers): every call the
    rollout manager makes. Built as ``cls(hf_checkpoint, *, device, seed, max_batch_size)``, plus
    ``args=`` (its ``PluginConfig`` view of the run config, with its own flags) when the class sets
    ``accepts_run_config``; the methods in ``OPTIONAL_METHODS`` are looked up and skipped when absent."""

    OPTIONAL_METHODS: ClassVar[tuple[str, ...]] = (
        "state_dict", "load_state_dict", "gpu_memory_gib", "update_weights_from_ref", "close",
        "weight_receivers", "join_weight_group",
    )

    device: Any  # optional: where an in-process engine runs ("cpu", "cuda:0"); read for the weight transport

    async def generate(self, input_ids: list[int], sampling_params: dict) -> dict:
        """SGLang ``/generate`` semantics (field names and defaults) ->
        ``{"tokens": [...], "log_probs": [...], "text": str, "finish_reason": {"type": "stop" |
        "length" | "abort", "matched": ...}, "prompt_tokens": int, "completion_tokens": int,
        "weight_version": str}``; log-probs are ``log_softmax(logits / temperature)`` of each token."""

    async def abort_all(self) -> None:
        """Answer every in-flight request with its partial output and ``finish_reason`` abort."""

    def update_weights(self, named_tensors: Any, version: int) -> None:
        """HF-named tensors (dict, pairs or buckets) between two decode steps; sets ``weight_version``."""

    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        """Colocated GPU runs, before training: free ``tags`` (None: all of weights, kv_cache, cuda_graph).
        A backend declaring the ``drops_released_weights`` trait also takes ``keep_weights=False``: free
        the weights without a copy, a full push follows the resume (``core/plugin_traits.py``)."""

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        """After training: ``["weights"]`` before the push, then ``["kv_cache", "cuda_graph"]``."""

    def log_probs_of(self, sequences: list[list[int]], response_lengths: list[int],
                     temperature: float = 1.0) -> list[list[float]]:
        """The engine's response log-probs for fixed sequences (checks that a push landed)."""

    # optional
    def state_dict(self) -> dict:
        """Sampling state (RNG) for checkpoints, so a resumed run samples as an uninterrupted one."""

    def load_state_dict(self, state: dict) -> None: ...

    def gpu_memory_gib(self) -> float | None:
        """What the engine still holds on its GPU (logged after ``release_memory``)."""

    def update_weights_from_ref(self, ref: Any, version: int) -> None:
        """Engines in other actors read the trainer's export from Ray's object store themselves."""

    def close(self) -> None:
        """Stop what the engine launched (servers, router) at the end of the run."""

    def weight_receivers(self) -> list[dict]:
        """An engine pool (engines in other processes): one ``{"uuid", "node", "where"}`` per engine
        process, for the driver's choice of weight transport (``core/weight_sync.py``); without it an
        in-process engine is taken to be on ``device``."""

    def join_weight_group(self, name: str, address: str, port: int, first_rank: int, world_size: int,
                          backend: str) -> None:
        """An engine pool: each engine process joins the weight broadcast group as ranks
        ``first_rank``...; without it the rollout manager's own process joins (in-process engine)."""


@dataclass(frozen=True)
class ParallelSizes:
    """A train backend's model-parallel sizes, its ``parallel_sizes(config)`` trait (read by the layout
    check, the ``--dry-run`` rank table, the memory plan and the weight-transport choice); data
    parallelism is what TP × PP × CP leave of the train GPUs. A backend that declares none trains
    data-parallel only. ``flags`` names the flag that sets each size (``{"tp": "--tensor-..."}``),
    for messages."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int | None = None  # expert tensor parallelism (None: as tp)
    sequence_parallel: bool = False
    distributed_optimizer: bool = False  # optimizer state sharded over DP (the memory plan divides it)
    vocab_multiple: int = 1  # the trained embedding/output rows are padded to a multiple of this (memory plan)
    flags: dict = field(default_factory=dict)

    def flag(self, size: str) -> str:
        return self.flags.get(size, f"the {size.upper()} size")


class TrainBackend(Protocol):
    """The train actors' backend: every call ``core/train_worker.py`` makes. Built as
    ``cls(config, *, estimator, total_optimizer_steps)`` in each train actor (it joins the process
    group); ``config`` is its ``PluginConfig`` view of the run config (``core/plugin_config.py``)."""

    OPTIONAL_METHODS: ClassVar[tuple[str, ...]] = ("weight_sources", "weight_stream_problem")

    progress: tuple[int, int]  # (micro-batches done, planned) of the running ``train`` call; polled on rank 0
    device: Any  # optional: the torch device of this rank's weights (CUDA IPC needs "cuda")

    def train(self, rollout_id: int, data: dict) -> dict:
        """All optimizer steps of one rollout; returns the rollout's train metrics (same on every rank)."""

    def export_weights(self, bucket_bytes: int | None = None) -> Any:
        """HF-named CPU tensors in buckets (rank 0; other ranks return ``[]``), also while offloaded."""

    def log_probs(self, sequences: list[list[int]], response_lengths: list[int]) -> list[list[float]]:
        """Response log-probs for fixed sequences, without grad; every rank calls it."""

    def sft_warmup(self, batches: Any, *, lr: float, prompt_loss_weight: float = 0.0) -> list[float]:
        """Supervised steps on (prompt, response) token batches before RL; the loss per step."""

    def save(self, path: str) -> None: ...

    def load(self, path: str) -> None: ...

    def save_hf(self, path: str) -> None: ...

    def offload(self) -> None:
        """Colocated GPU runs: free the GPU, keep the state on the host."""

    def onload(self) -> None: ...

    # optional: streamed weight pushes (core/weight_sync.py), else export_weights through the object store
    def weight_sources(self) -> tuple[list, Any]:
        """Rank 0 holding the whole model: ``([(hf_name, live tensor), ...], dtype to send or None)``,
        the tensors on the backend's device, read between train steps without a copy."""

    def weight_stream_problem(self) -> str | None:
        """Why this layout cannot stream (e.g. tensor parallelism: no rank holds whole tensors), or None."""


def protocol_methods(protocol: type) -> dict[str, Any]:
    """The methods a protocol class declares (name -> function), for conformance checks."""
    return {name: value for name, value in vars(protocol).items()
            if callable(value) and not name.startswith("_") and name != "OPTIONAL_METHODS"}


__all__ = [
    "AdvantageEstimator",
    "AdvantageInputs",
    "BufferPolicy",
    "FilterDecision",
    "Group",
    "ParallelSizes",
    "PlacementPlan",
    "PlacementRequest",
    "RolloutEngine",
    "Sample",
    "TrainBackend",
]

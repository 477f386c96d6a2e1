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

    Built as ``cls(args)`` where ``args`` is the run config namespace (``getattr`` with defaults, so
    an estimator also works with a bare ``types.SimpleNamespace``).
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
    --rollout-num-gpus-per-engine --num-gpus-per-node``."""

    actor_num_nodes: int = 1
    actor_num_gpus_per_node: int = 1
    rollout_num_gpus: int | None = None
    rollout_num_gpus_per_engine: int = 1
    num_gpus_per_node: int = 8

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
    """One generation engine (embedded ``hf`` or an SGLang server): the calls the rollout manager makes."""

    async def generate(self, input_ids: list[int], sampling_params: dict) -> dict:
        """SGLang ``/generate`` semantics (field names and defaults) ->
        ``{"tokens": [...], "log_probs": [...], "text": str, "finish_reason": {"type": "stop" |
        "length" | "abort", "matched": ...}, "prompt_tokens": int, "completion_tokens": int,
        "weight_version": str}``; log-probs are ``log_softmax(logits / temperature)`` of each token."""

    async def abort_all(self) -> None:
        """Answer every in-flight request with its partial output and ``finish_reason`` abort."""

    def update_weights(self, named_tensors: Any, version: int) -> None:
        """HF-named tensors (dict, pairs or buckets) between two decode steps; sets ``weight_version``."""

    def release_memory(self, tags: Sequence[str] | None = None) -> None: ...

    def resume_memory(self, tags: Sequence[str] | None = None) -> None: ...

    def health(self) -> bool: ...

    def load_stats(self) -> dict:
        """``{"num_running": int, "num_waiting": int}``"""


class TrainBackend(Protocol):
    def train(self, rollout_id: int, data: dict) -> dict: ...

    def export_weights(self) -> Any: ...

    def save(self, path: str) -> None: ...

    def load(self, path: str) -> None: ...

    def offload(self) -> None: ...

    def onload(self) -> None: ...


__all__ = [
    "AdvantageEstimator",
    "AdvantageInputs",
    "BufferPolicy",
    "FilterDecision",
    "Group",
    "PlacementPlan",
    "PlacementRequest",
    "RolloutEngine",
    "Sample",
    "TrainBackend",
]

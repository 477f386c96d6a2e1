"""The HF <-> Megatron model bridge for dense Qwen3 / Qwen2 / Llama, and its ``plugrl_model_bridge``
hook implementation (firstresult: answers for the supported ``model_type`` values, else None).

Loaded as a built-in plugin in every process (driver, train actors); importing it imports neither
torch nor megatron, so ``plugrl plugins list`` stays light. The bridge's methods run in the
megatron train actors and in the converter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from plugrl.core import hookimpl

from .config_bridge import (
    SUPPORTED_MODEL_TYPES,
    MegatronModelConfig,
    _get,
    derive_model_config,
)


class DenseDecoderBridge:
    """Maps one HF architecture onto megatron-core's GPTModel (local layer spec) and back."""

    model_types = SUPPORTED_MODEL_TYPES

    def __init__(self, hf_config: Any):
        self.hf_config = hf_config
        self.model_type = _get(hf_config, "model_type")

    def model_config(self, args: Any = None) -> MegatronModelConfig:
        """Megatron model arguments; explicit flags in ``args`` override or, if they contradict the
        checkpoint, raise ValueError."""
        return derive_model_config(self.hf_config, args)

    def build_model(self, cfg: MegatronModelConfig, **kwargs):
        from .config_bridge import build_gpt_model

        return build_gpt_model(cfg, **kwargs)

    def hf_to_megatron(self, hf_state: Mapping, cfg: MegatronModelConfig, tp_size: int = 1, tp_rank: int = 0) -> dict:
        from .weights import hf_to_megatron

        return hf_to_megatron(hf_state, cfg, tp_size=tp_size, tp_rank=tp_rank)

    def megatron_to_hf(self, shards: list, cfg: MegatronModelConfig) -> dict:
        from .weights import megatron_to_hf

        return megatron_to_hf(shards, cfg)

    def export_hf_buckets(self, named_tensors: Iterable, bucket_bytes: int):
        from .weights import export_hf_buckets

        return export_hf_buckets(named_tensors, bucket_bytes)


@hookimpl
def plugrl_model_bridge(hf_config):
    if _get(hf_config, "model_type") in SUPPORTED_MODEL_TYPES:
        return DenseDecoderBridge(hf_config)
    return None

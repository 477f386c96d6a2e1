"""Derive megatron-core model arguments from an HF dense decoder config (Qwen3, Qwen2, Llama).

Runs on the driver (validation before any GPU is touched), in the converter, and in the megatron
train actors (to build the GPTModel). Pure Python; megatron is imported only by
``transformer_config`` / ``build_gpt_model``, which run where a model is actually built.

Explicit flags use slime's (Megatron's) dests (``args.rotary_base``, ``args.num_layers``, ...).
Architecture flags must agree with the checkpoint (slime's ``_hf_validate_args``, but a
``ValueError`` naming the flag and both values instead of a bare assertion); layout flags that the
checkpoint does not fix (vocab padding multiple, TP size, sequence length) simply override.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")
DEFAULT_VOCAB_DIVISOR = 128  # Megatron's --make-vocab-size-divisible-by default


@dataclass(frozen=True)
class MegatronModelConfig:
    """Everything the weight mapping and the GPTModel constructor need, in Megatron's terms."""

    model_type: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    norm_epsilon: float
    rotary_base: float
    qk_layernorm: bool
    add_qkv_bias: bool
    untie_embeddings_and_output_weights: bool
    vocab_size: int
    padded_vocab_size: int
    max_position_embeddings: int
    make_vocab_size_divisible_by: int = DEFAULT_VOCAB_DIVISOR
    tensor_model_parallel_size: int = 1
    # Fixed for the supported families; kept as fields so the manifest records them.
    swiglu: bool = True
    normalization: str = "RMSNorm"
    disable_bias_linear: bool = True

    @property
    def group_query_attention(self) -> bool:
        return self.num_query_groups != self.num_attention_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MegatronModelConfig:
        return cls(**values)


def padded_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Megatron's ``_vocab_size_with_padding``: round up to a multiple of divisor x TP."""
    multiple = divisible_by * tp_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def _get(hf_config: Any, key: str, default: Any = None) -> Any:
    if isinstance(hf_config, Mapping):
        return hf_config.get(key, default)
    return getattr(hf_config, key, default)


def _rope_theta(hf_config: Any) -> float:
    # transformers 5 keeps it in rope_parameters; 4.x and raw config.json files have rope_theta.
    params = _get(hf_config, "rope_parameters") or {}
    scaling = _get(hf_config, "rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported by the megatron bridge (only plain RoPE)")
    theta = params.get("rope_theta", _get(hf_config, "rope_theta"))
    if theta is None:
        raise ValueError("the HF config has no rope_theta")
    return float(theta)


def _checkpoint_values(hf_config: Any) -> dict:
    """The architecture as the checkpoint states it, keyed by Megatron dest."""
    model_type = _get(hf_config, "model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if _get(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {_get(hf_config, 'hidden_act')!r}: the bridge maps SwiGLU (silu) MLPs only")
    if model_type == "qwen2" and _get(hf_config, "use_sliding_window", False):
        raise ValueError("Qwen2 sliding-window attention is not supported by the megatron bridge")
    if model_type == "llama" and (_get(hf_config, "attention_bias", False) or _get(hf_config, "mlp_bias", False)):
        raise ValueError("Llama with attention_bias/mlp_bias is not supported (o_proj/MLP biases have no mapping)")
    heads = int(_get(hf_config, "num_attention_heads"))
    hidden = int(_get(hf_config, "hidden_size"))
    head_dim = _get(hf_config, "head_dim") or hidden // heads
    return {
        "num_layers": int(_get(hf_config, "num_hidden_layers")),
        "hidden_size": hidden,
        "ffn_hidden_size": int(_get(hf_config, "intermediate_size")),
        "num_attention_heads": heads,
        "num_query_groups": int(_get(hf_config, "num_key_value_heads") or heads),
        "kv_channels": int(head_dim),
        "norm_epsilon": float(_get(hf_config, "rms_norm_eps")),
        "rotary_base": _rope_theta(hf_config),
        # Qwen3 normalises q and k per head; Qwen2 instead has q/k/v biases (hard-wired in HF).
        "qk_layernorm": model_type == "qwen3",
        "add_qkv_bias": model_type == "qwen2",
        "untie_embeddings_and_output_weights": not bool(_get(hf_config, "tie_word_embeddings", False)),
        "vocab_size": int(_get(hf_config, "vocab_size")),
        "swiglu": True,
        "normalization": "RMSNorm",
        "disable_bias_linear": True,
        "use_rotary_position_embeddings": True,
    }


# dest -> the HF key it is checked against (for the error message)
_HF_KEY = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_key_value_heads",
    "kv_channels": "head_dim",
    "norm_epsilon": "rms_norm_eps",
    "rotary_base": "rope_theta",
    "qk_layernorm": "model_type (q/k norms)",
    "add_qkv_bias": "model_type (q/k/v biases)",
    "untie_embeddings_and_output_weights": "tie_word_embeddings (negated)",
    "vocab_size": "vocab_size",
    "swiglu": "hidden_act",
    "normalization": "model_type (RMSNorm)",
    "disable_bias_linear": "model_type (no linear biases)",
    "use_rotary_position_embeddings": "model_type (RoPE)",
}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_flags(hf_config: Any, args: Any = None) -> dict:
    """The checkpoint's architecture values; raises ValueError if an explicit flag contradicts one."""
    values = _checkpoint_values(hf_config)
    check_flags_against(values, args)
    return values


def check_flags_against(values: dict, args: Any = None) -> None:
    """Raise ValueError naming the first explicit flag in ``args`` that contradicts the checkpoint's
    architecture ``values`` (``_checkpoint_values``)."""
    from .options import MODEL_FLAGS

    for dest, expected in values.items():
        # only values that have a flag can be given (padded sizes and the like are derived, never set)
        given = getattr(args, dest, None) if args is not None and dest in MODEL_FLAGS else None
        if given is None:
            continue
        # Switch flags are store_true with default None: a given switch is True. A given switch whose
        # feature the checkpoint lacks (e.g. --qk-layernorm on Qwen2) is a contradiction.
        if isinstance(expected, float):
            same = math.isclose(float(given), expected, rel_tol=1e-12)
        else:
            same = given == expected
        if not same:
            raise ValueError(
                f"{_flag(dest)} {given!r} contradicts the HF checkpoint's {_HF_KEY[dest]} (which gives {expected!r})"
            )
    # --group-query-attention with an MHA checkpoint is harmless in Megatron only if the group
    # count equals the head count, which the num_query_groups check above already enforces.


def derive_model_config(hf_config: Any, args: Any = None) -> MegatronModelConfig:
    """HF config (+ optional explicit flags) -> MegatronModelConfig. Runs anywhere, no megatron."""
    from plugrl.core.types import option

    values = check_flags(hf_config, args)
    tp = int(option(args, "tensor_model_parallel_size", 1))
    divisor = int(option(args, "make_vocab_size_divisible_by", DEFAULT_VOCAB_DIVISOR))
    heads, groups = values["num_attention_heads"], values["num_query_groups"]
    if heads % tp or (groups % tp and tp % groups):
        raise ValueError(
            f"--tensor-model-parallel-size {tp} must divide num_attention_heads={heads} and divide or be "
            f"a multiple of num_query_groups={groups}"
        )
    if values["ffn_hidden_size"] % tp:
        raise ValueError(f"--tensor-model-parallel-size {tp} must divide ffn_hidden_size={values['ffn_hidden_size']}")
    # slime: max_position_embeddings = seq_length when unset; fall back to the checkpoint's value.
    max_pos = option(args, "max_position_embeddings", None) or option(args, "seq_length", None)
    max_pos = int(max_pos or _get(hf_config, "max_position_embeddings") or 4096)
    return MegatronModelConfig(
        model_type=_get(hf_config, "model_type"),
        num_layers=values["num_layers"],
        hidden_size=values["hidden_size"],
        ffn_hidden_size=values["ffn_hidden_size"],
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=values["kv_channels"],
        norm_epsilon=values["norm_epsilon"],
        rotary_base=values["rotary_base"],
        qk_layernorm=values["qk_layernorm"],
        add_qkv_bias=values["add_qkv_bias"],
        untie_embeddings_and_output_weights=values["untie_embeddings_and_output_weights"],
        vocab_size=values["vocab_size"],
        padded_vocab_size=padded_vocab_size(values["vocab_size"], divisor, tp),
        max_position_embeddings=max_pos,
        make_vocab_size_divisible_by=divisor,
        tensor_model_parallel_size=tp,
    )


def transformer_config_kwargs(cfg: MegatronModelConfig) -> dict:
    """Keyword arguments for megatron-core's TransformerConfig (activation filled in lazily)."""
    return {
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.ffn_hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_query_groups": cfg.num_query_groups,
        "kv_channels": cfg.kv_channels,
        "normalization": cfg.normalization,
        "layernorm_epsilon": cfg.norm_epsilon,
        "qk_layernorm": cfg.qk_layernorm,
        "gated_linear_unit": cfg.swiglu,
        "add_bias_linear": not cfg.disable_bias_linear,
        "add_qkv_bias": cfg.add_qkv_bias,
        "tensor_model_parallel_size": cfg.tensor_model_parallel_size,
    }


def gpt_model_kwargs(cfg: MegatronModelConfig) -> dict:
    """Keyword arguments for megatron-core's GPTModel besides config and layer spec."""
    return {
        "vocab_size": cfg.padded_vocab_size,
        "max_sequence_length": cfg.max_position_embeddings,
        "share_embeddings_and_output_weights": not cfg.untie_embeddings_and_output_weights,
        "position_embedding_type": "rope",
        "rotary_base": cfg.rotary_base,
        "parallel_output": True,
    }


def transformer_config(cfg: MegatronModelConfig, **overrides):
    """Build the TransformerConfig (imports megatron; runs where the model is built)."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = transformer_config_kwargs(cfg)
    kwargs["activation_func"] = F.silu  # swiglu = gated linear unit with silu, as Megatron's --swiglu sets
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_gpt_model(
    cfg: MegatronModelConfig, *, pre_process: bool = True, post_process: bool = True, layer_spec=None,
    **config_overrides
):
    """A GPTModel with megatron-core's local layer spec (the one whose names weights.py maps), or
    ``layer_spec`` (the train backend's: the local spec with a packed core attention, same names)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    spec = layer_spec or get_gpt_layer_local_spec(qk_layernorm=cfg.qk_layernorm, normalization=cfg.normalization)
    return GPTModel(
        config=transformer_config(cfg, **config_overrides),
        transformer_layer_spec=spec,
        pre_process=pre_process,
        post_process=post_process,
        **gpt_model_kwargs(cfg),
    )

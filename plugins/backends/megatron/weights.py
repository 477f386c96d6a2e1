"""HF <-> megatron-core GPTModel (local layer spec) weights for dense Qwen3 / Qwen2 / Llama.

Runs in the converter (CPU), in the megatron train actors (load from HF, export to the rollout
engines) and in tests. Pure torch on whatever device the tensors live on; no megatron import.

Layouts (megatron-core 0.16, checked against a real GPTModel's state_dict in the tests):
* ``linear_qkv.weight`` is ``[(h + 2g) * d, hidden]`` grouped per KV group: the group's h/g query
  heads, then its key head, then its value head (Attention.get_query_key_value_tensors views the
  output as ``[.., g, (h/g + 2) * d]``). TP shards it contiguously on dim 0, which hands each rank
  whole groups (or, with TP > g, a contiguous part of one group, as Megatron expects).
* ``linear_fc1.weight`` is ``[gate; up]`` per rank (the MLP chunks its local output in two), so a TP
  shard is ``[gate_r; up_r]`` and the gather re-interleaves all gates, then all ups.
* ``linear_proj`` and ``linear_fc2`` are row-parallel (dim 1); embedding and output layer are
  vocab-parallel (dim 0 of the padded vocabulary); norms are replicated.
* The local spec keeps ``input_layernorm`` / ``pre_mlp_layernorm`` as separate modules (the TE
  spec fuses them into ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

from .config_bridge import MegatronModelConfig

LAYER = "decoder.layers.{}."
HF_LAYER = "model.layers.{}."

# Per-layer tensors that map one to one, with how Megatron shards them: None = replicated,
# 0 = column-parallel (dim 0), 1 = row-parallel (dim 1).
_SIMPLE = (
    ("input_layernorm.weight", "input_layernorm.weight", None),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight", 1),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight", None),
    ("mlp.linear_fc2.weight", "mlp.down_proj.weight", 1),
)
_QK_NORMS = (
    ("self_attention.q_layernorm.weight", "self_attn.q_norm.weight"),
    ("self_attention.k_layernorm.weight", "self_attn.k_norm.weight"),
)


def _chunk(tensor: torch.Tensor, dim: int, tp_size: int, tp_rank: int) -> torch.Tensor:
    if tensor.shape[dim] % tp_size:
        raise ValueError(f"dim {dim} of shape {tuple(tensor.shape)} does not split into {tp_size} TP shards")
    return tensor.chunk(tp_size, dim=dim)[tp_rank].contiguous()


def _pad_vocab(weight: torch.Tensor, cfg: MegatronModelConfig) -> torch.Tensor:
    if weight.shape[0] != cfg.vocab_size:
        raise ValueError(f"vocabulary tensor has {weight.shape[0]} rows, the config says vocab_size={cfg.vocab_size}")
    # Padding rows are zeros: no token id reaches them and their logits are trimmed on export.
    pad = weight.new_zeros((cfg.padded_vocab_size - cfg.vocab_size, weight.shape[1]))
    return torch.cat([weight, pad], dim=0)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: MegatronModelConfig) -> torch.Tensor:
    """HF q/k/v (weights [out, hidden] or biases [out]) -> Megatron's per-group interleaved QKV."""
    g, d = cfg.num_query_groups, cfg.kv_channels
    per_group = cfg.num_attention_heads // g
    tail = q.shape[1:]
    fused = torch.cat(
        [q.reshape(g, per_group * d, *tail), k.reshape(g, d, *tail), v.reshape(g, d, *tail)], dim=1
    )
    return fused.reshape((cfg.num_attention_heads + 2 * g) * d, *tail)


def split_qkv(qkv: torch.Tensor, cfg: MegatronModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``fuse_qkv`` on the full (TP-gathered) tensor."""
    g, d = cfg.num_query_groups, cfg.kv_channels
    per_group = cfg.num_attention_heads // g
    tail = qkv.shape[1:]
    grouped = qkv.reshape(g, (per_group + 2) * d, *tail)
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return (
        q.reshape(cfg.num_attention_heads * d, *tail).contiguous(),
        k.reshape(g * d, *tail).contiguous(),
        v.reshape(g * d, *tail).contiguous(),
    )


def hf_to_megatron(
    hf_state: Mapping[str, torch.Tensor], cfg: MegatronModelConfig, tp_size: int = 1, tp_rank: int = 0
) -> dict[str, torch.Tensor]:
    """One TP rank's GPTModel state dict (no ``_extra_state``) from a full HF state dict.

    Every HF tensor must be consumed (a leftover means an unmapped parameter, which is an error,
    never silently dropped); ``lm_head.weight`` is ignored for tied models.
    """
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} outside TP size {tp_size}")
    if cfg.padded_vocab_size % tp_size:
        raise ValueError(f"padded vocab {cfg.padded_vocab_size} does not split into {tp_size} TP shards")
    remaining = dict(hf_state)

    def take(name: str) -> torch.Tensor:
        try:
            return remaining.pop(name)
        except KeyError:
            raise KeyError(f"HF state dict lacks {name!r}") from None

    out: dict[str, torch.Tensor] = {}
    embed = take("model.embed_tokens.weight")
    out["embedding.word_embeddings.weight"] = _chunk(_pad_vocab(embed, cfg), 0, tp_size, tp_rank)
    for i in range(cfg.num_layers):
        m, h = LAYER.format(i), HF_LAYER.format(i)
        for m_name, h_name, dim in _SIMPLE:
            tensor = take(h + h_name)
            out[m + m_name] = tensor.clone() if dim is None else _chunk(tensor, dim, tp_size, tp_rank)
        attn = h + "self_attn."
        qkv = fuse_qkv(take(attn + "q_proj.weight"), take(attn + "k_proj.weight"), take(attn + "v_proj.weight"), cfg)
        out[m + "self_attention.linear_qkv.weight"] = _chunk(qkv, 0, tp_size, tp_rank)
        if cfg.add_qkv_bias:
            bias = fuse_qkv(take(attn + "q_proj.bias"), take(attn + "k_proj.bias"), take(attn + "v_proj.bias"), cfg)
            out[m + "self_attention.linear_qkv.bias"] = _chunk(bias, 0, tp_size, tp_rank)
        if cfg.qk_layernorm:
            for m_name, h_name in _QK_NORMS:
                out[m + m_name] = take(h + h_name).clone()
        gate = _chunk(take(h + "mlp.gate_proj.weight"), 0, tp_size, tp_rank)
        up = _chunk(take(h + "mlp.up_proj.weight"), 0, tp_size, tp_rank)
        out[m + "mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
    out["decoder.final_layernorm.weight"] = take("model.norm.weight").clone()
    if cfg.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = _chunk(_pad_vocab(take("lm_head.weight"), cfg), 0, tp_size, tp_rank)
    else:
        remaining.pop("lm_head.weight", None)  # HF lists the tied head too; Megatron shares the embedding
    # Rotary inverse frequencies are buffers some HF versions list; Megatron recomputes them.
    leftovers = [name for name in remaining if not name.endswith("rotary_emb.inv_freq")]
    if leftovers:
        raise ValueError(f"HF tensors with no Megatron mapping: {sorted(leftovers)[:8]}")
    return out


def _gather(shards: list[Mapping[str, torch.Tensor]], name: str, dim: int | None) -> torch.Tensor:
    try:
        parts = [shard[name] for shard in shards]
    except KeyError:
        raise KeyError(f"Megatron state dict lacks {name!r}") from None
    if dim is None:
        # Replicated tensors must agree across ranks; a disagreement means mismatched shards.
        for rank, part in enumerate(parts[1:], start=1):
            if not torch.equal(part, parts[0]):
                raise ValueError(f"replicated tensor {name!r} differs between TP rank 0 and {rank}")
        return parts[0]
    return torch.cat(parts, dim=dim)


def megatron_to_hf(shards: list[Mapping[str, torch.Tensor]], cfg: MegatronModelConfig) -> dict[str, torch.Tensor]:
    """Full HF state dict from the TP shards of one model (``shards[r]`` = TP rank r's state dict).

    Vocabulary padding is trimmed; ``lm_head.weight`` is absent for tied models (HF ties it).
    """
    if not shards:
        raise ValueError("no shards given")
    out: dict[str, torch.Tensor] = {}
    out["model.embed_tokens.weight"] = _gather(shards, "embedding.word_embeddings.weight", 0)[: cfg.vocab_size]
    for i in range(cfg.num_layers):
        m, h = LAYER.format(i), HF_LAYER.format(i)
        for m_name, h_name, dim in _SIMPLE:
            out[h + h_name] = _gather(shards, m + m_name, dim)
        attn = h + "self_attn."
        q, k, v = split_qkv(_gather(shards, m + "self_attention.linear_qkv.weight", 0), cfg)
        out[attn + "q_proj.weight"], out[attn + "k_proj.weight"], out[attn + "v_proj.weight"] = q, k, v
        if cfg.add_qkv_bias:
            q, k, v = split_qkv(_gather(shards, m + "self_attention.linear_qkv.bias", 0), cfg)
            out[attn + "q_proj.bias"], out[attn + "k_proj.bias"], out[attn + "v_proj.bias"] = q, k, v
        if cfg.qk_layernorm:
            for m_name, h_name in _QK_NORMS:
                out[h + h_name] = _gather(shards, m + m_name, None)
        # Each rank holds [gate_r; up_r]: split every shard in half, then concatenate per half.
        halves = [shard[m + "mlp.linear_fc1.weight"].chunk(2, dim=0) for shard in shards]
        out[h + "mlp.gate_proj.weight"] = torch.cat([half[0] for half in halves], dim=0)
        out[h + "mlp.up_proj.weight"] = torch.cat([half[1] for half in halves], dim=0)
    out["model.norm.weight"] = _gather(shards, "decoder.final_layernorm.weight", None)
    if cfg.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = _gather(shards, "output_layer.weight", 0)[: cfg.vocab_size]
    return {name: tensor.contiguous() for name, tensor in out.items()}


def megatron_shard_shapes(cfg: MegatronModelConfig, tp_size: int = 1) -> dict[str, tuple[int, ...]]:
    """Per-rank parameter shapes of the local-spec GPTModel under TP ``tp_size`` (same for every rank)."""
    hidden, d = cfg.hidden_size, cfg.kv_channels
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * d
    vocab_rows = cfg.padded_vocab_size // tp_size
    shapes: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (vocab_rows, hidden)}
    for i in range(cfg.num_layers):
        m = LAYER.format(i)
        shapes[m + "input_layernorm.weight"] = (hidden,)
        shapes[m + "self_attention.linear_qkv.weight"] = (qkv_rows // tp_size, hidden)
        if cfg.add_qkv_bias:
            shapes[m + "self_attention.linear_qkv.bias"] = (qkv_rows // tp_size,)
        if cfg.qk_layernorm:
            shapes[m + "self_attention.q_layernorm.weight"] = (d,)
            shapes[m + "self_attention.k_layernorm.weight"] = (d,)
        shapes[m + "self_attention.linear_proj.weight"] = (hidden, cfg.num_attention_heads * d // tp_size)
        shapes[m + "pre_mlp_layernorm.weight"] = (hidden,)
        shapes[m + "mlp.linear_fc1.weight"] = (2 * cfg.ffn_hidden_size // tp_size, hidden)
        shapes[m + "mlp.linear_fc2.weight"] = (hidden, cfg.ffn_hidden_size // tp_size)
    shapes["decoder.final_layernorm.weight"] = (hidden,)
    if cfg.untie_embeddings_and_output_weights:
        shapes["output_layer.weight"] = (vocab_rows, hidden)
    return shapes


def export_hf_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group (name, tensor) pairs into lists of at most ``bucket_bytes`` (a larger tensor travels
    alone), in order; the weight push to rollout engines and the sharded HF writer consume these."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def hf_views(state: Mapping[str, torch.Tensor], cfg: MegatronModelConfig) -> list[tuple[str, torch.Tensor]]:
    """``[(hf_name, view)]`` of one TP-1 model's state dict, in ``megatron_to_hf``'s order, without a
    copy: each view lives on the state's device and its row-major order is the HF tensor's (fused
    qkv is viewed per KV group: ``[g, rows, hidden]`` slices; fc1's halves and the unpadded vocabulary
    are plain slices), so a streamed weight push (``core/weight_packing.pack``) copies each straight
    into its bucket, on the GPU, and the shapes differ from the HF shapes only by a reshape.
    The names and element order equal ``megatron_to_hf([state], cfg)`` (checked in the tests)."""
    g, d = cfg.num_query_groups, cfg.kv_channels
    per_group = cfg.num_attention_heads // g

    def get(name: str) -> torch.Tensor:
        try:
            return state[name].detach()
        except KeyError:
            raise KeyError(f"Megatron state dict lacks {name!r}") from None

    def qkv_views(qkv: torch.Tensor) -> list[torch.Tensor]:
        grouped = qkv.view(g, (per_group + 2) * d, *qkv.shape[1:])
        return [grouped[:, : per_group * d], grouped[:, per_group * d: (per_group + 1) * d],
                grouped[:, (per_group + 1) * d:]]

    out: list[tuple[str, torch.Tensor]] = [("model.embed_tokens.weight",
                                            get("embedding.word_embeddings.weight")[: cfg.vocab_size])]
    for i in range(cfg.num_layers):
        m, h = LAYER.format(i), HF_LAYER.format(i)
        simple = {h_name: get(m + m_name) for m_name, h_name, _ in _SIMPLE}
        attn = h + "self_attn."
        # the same order as megatron_to_hf's dict
        out += [(h + "input_layernorm.weight", simple["input_layernorm.weight"]),
                (h + "self_attn.o_proj.weight", simple["self_attn.o_proj.weight"]),
                (h + "post_attention_layernorm.weight", simple["post_attention_layernorm.weight"]),
                (h + "mlp.down_proj.weight", simple["mlp.down_proj.weight"])]
        q, k, v = qkv_views(get(m + "self_attention.linear_qkv.weight"))
        out += [(attn + "q_proj.weight", q), (attn + "k_proj.weight", k), (attn + "v_proj.weight", v)]
        if cfg.add_qkv_bias:
            q, k, v = qkv_views(get(m + "self_attention.linear_qkv.bias"))
            out += [(attn + "q_proj.bias", q), (attn + "k_proj.bias", k), (attn + "v_proj.bias", v)]
        if cfg.qk_layernorm:
            out += [(h + h_name, get(m + m_name)) for m_name, h_name in _QK_NORMS]
        gate, up = get(m + "mlp.linear_fc1.weight").chunk(2, dim=0)
        out += [(h + "mlp.gate_proj.weight", gate), (h + "mlp.up_proj.weight", up)]
    out.append(("model.norm.weight", get("decoder.final_layernorm.weight")))
    if cfg.untie_embeddings_and_output_weights:
        out.append(("lm_head.weight", get("output_layer.weight")[: cfg.vocab_size]))
    return out


def hf_shapes(cfg: MegatronModelConfig) -> dict[str, tuple[int, ...]]:
    """The HF shape of every name ``hf_views`` lists (its views may be shaped per KV group)."""
    hidden, d = cfg.hidden_size, cfg.kv_channels
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, hidden), "model.norm.weight": (hidden,)}
    for i in range(cfg.num_layers):
        h = HF_LAYER.format(i)
        attn = h + "self_attn."
        shapes.update({h + "input_layernorm.weight": (hidden,), h + "post_attention_layernorm.weight": (hidden,),
                       attn + "o_proj.weight": (hidden, cfg.num_attention_heads * d),
                       attn + "q_proj.weight": (cfg.num_attention_heads * d, hidden),
                       attn + "k_proj.weight": (cfg.num_query_groups * d, hidden),
                       attn + "v_proj.weight": (cfg.num_query_groups * d, hidden),
                       h + "mlp.gate_proj.weight": (cfg.ffn_hidden_size, hidden),
                       h + "mlp.up_proj.weight": (cfg.ffn_hidden_size, hidden),
                       h + "mlp.down_proj.weight": (hidden, cfg.ffn_hidden_size)})
        if cfg.add_qkv_bias:
            shapes.update({attn + "q_proj.bias": (cfg.num_attention_heads * d,),
                           attn + "k_proj.bias": (cfg.num_query_groups * d,),
                           attn + "v_proj.bias": (cfg.num_query_groups * d,)})
        if cfg.qk_layernorm:
            shapes.update({attn + "q_norm.weight": (d,), attn + "k_norm.weight": (d,)})
    if cfg.untie_embeddings_and_output_weights:
        shapes["lm_head.weight"] = (cfg.vocab_size, hidden)
    return shapes

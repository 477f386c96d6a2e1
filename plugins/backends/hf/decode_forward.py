"""The fast path's own forward for Llama-family decoders (Qwen3, Qwen2, Llama) over the HF module's weights.

Runs in the engine's decode thread. It calls the HF model's own submodules for everything that is
per token (embedding, RMSNorms, q/k/v/o projections, q_norm/k_norm, MLP, rotary embedding, lm_head)
so it reads the model's parameters in place (weight pushes and memory resume take effect without
copying anything here) and inherits their numerics; what it does itself is the part HF does with a
cache object and masks: applying RoPE, writing K/V into the slot cache at each row's own position,
attention over each row's own length, and computing logits for the last position only.

* ``prefill``: prompts packed into one row (no padding), causal attention within each prompt
  (``plugins/backends/packed_attention``: varlen flash attention on CUDA in 16 bits, SDPA per prompt
  elsewhere), K/V scattered into the slots.
* ``decode``: one token per slot for slots ``[0, B)``; attention over each row's own length within the
  first ``kv_len`` cache positions (``decode_attention.py``: sdpa, matmul or flash). Fixed shapes and
  no host synchronisation, so it can be captured in a CUDA graph (``cuda_graphs.py``).
"""

from __future__ import annotations

import torch

from ..packed_attention import attention_within_segments, default_implementation
from .decode_attention import StepInputs, attend

SUPPORTED_CLASSES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")


def unsupported_reason(model) -> str | None:
    """``None`` when ``LlamaLikeForward`` computes exactly what ``model`` does, else why not (the
    engine then keeps the generic HF-forward path)."""
    from .packed_attention import supports

    name = type(model).__name__
    if name not in SUPPORTED_CLASSES:
        return f"model class {name} (fast path: {', '.join(SUPPORTED_CLASSES)})"
    config = model.config.get_text_config()
    reason = supports(config)
    if reason:
        return reason
    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None or not hasattr(inner, "layers") or not hasattr(inner, "embed_tokens"):
        return "unexpected module layout"
    rope_type = str(getattr(rotary, "rope_type", "default"))
    if "dynamic" in rope_type or "longrope" in rope_type:  # frequencies depend on the sequence length
        return f"rope type {rope_type}"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    for layer in inner.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return "unexpected attention module layout"
    return None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # HF's apply_rotary_pos_emb (rotate-half convention), same operation order for equal rounding.
    return (x * cos) + (_rotate_half(x) * sin)


class LlamaLikeForward:
    """Holds references to the HF model's submodules (never copies of their weights)."""

    def __init__(self, model, attention: str = "sdpa", compiled_ops: bool = False):
        from .fused_decode_ops import fused_ops_reason, ops

        inner = model.model
        self.attention = attention  # decode_attention.IMPLEMENTATIONS
        # the fused elementwise ops (fused_decode_ops.py) where the model's modules are the ones they
        # reproduce; ``compiled_ops`` compiles them (else they run eagerly: same arithmetic as the modules)
        self.fused_reason = fused_ops_reason(model)
        self.ops = ops(compiled_ops) if self.fused_reason is None else None
        self.compiled_ops = bool(compiled_ops) and self.ops is not None
        self.embed, self.layers, self.norm, self.rotary = inner.embed_tokens, list(inner.layers), inner.norm, inner.rotary_emb
        self.lm_head = model.lm_head
        config = model.config.get_text_config()
        attn = self.layers[0].self_attn
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(attn, "head_dim", None) or config.hidden_size // self.heads)
        self.scale = float(getattr(attn, "scaling", self.head_dim ** -0.5))
        self.qk_norm = hasattr(attn, "q_norm") and hasattr(attn, "k_norm")
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device

    def _qkv(self, attn, h: torch.Tensor, shape: tuple[int, ...]):
        q = attn.q_proj(h).view(*shape, self.heads, self.head_dim)
        k = attn.k_proj(h).view(*shape, self.kv_heads, self.head_dim)
        v = attn.v_proj(h).view(*shape, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q, k, v

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor, slot_of_token: torch.Tensor,
                cu_seqlens: torch.Tensor, max_len: int, last: torch.Tensor, cache) -> torch.Tensor:
        """``ids/positions/slot_of_token [T]`` (prompts packed back to back), ``cu_seqlens [n+1]``,
        ``last [n]`` (index of each prompt's last token) -> next-token logits ``[n, V]``."""
        t = ids.shape[0]
        x = self.embed(ids)[None]  # [1, T, H]: HF modules expect a batch dimension
        cos, sin = self.rotary(x, positions[None])
        cos, sin = cos[0, :, None], sin[0, :, None]  # [T, 1, D]: broadcast over heads
        impl = default_implementation(ids.device.type, self.dtype)

        def attention(i, q, k, v):  # q/k with RoPE, [T, heads, D] -> [1, T, heads * D]
            cache.write(i, slot_of_token, positions, k, v)
            out = attention_within_segments(q, k, v, cu_seqlens, max_len, scale=self.scale, implementation=impl)
            return out.reshape(1, t, self.heads * self.head_dim)

        if self.ops is not None:
            return self.lm_head(self._fused_layers(x, (t,), cos, sin, attention)[0, last])
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            residual = x
            q, k, v = self._qkv(attn, layer.input_layernorm(x), (t,))
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)  # [T, heads, D]
            x = residual + attn.o_proj(attention(i, q, k, v))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        # RMSNorm is per token: normalising only the last tokens gives the same values.
        return self.lm_head(self.norm(x[0, last]))

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache, kv_len: int,
               arange: torch.Tensor) -> torch.Tensor:
        """One token per slot: ``tokens/positions [B]`` for slots ``0..B-1`` of the ``SlotKVCache``
        (position = the row's length so far, where its K/V go) -> logits ``[B, V]``. Free slots must
        hold position 0. ``arange``: ``torch.arange(n)`` with ``n >= max(B + 1, kv_len)``, owned by the
        caller so that a captured graph's view of it stays valid."""
        b = tokens.shape[0]
        rows = arange[:b]
        step = StepInputs(self.attention, positions, kv_len, arange, cache.length)
        x = self.embed(tokens)[:, None]  # [B, 1, H]
        cos, sin = self.rotary(x, positions[:, None])  # [B, 1, D]
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, 1, D]

        def attention(i, q, k, v):  # q/k with RoPE, [B, 1, heads, D] -> [B, 1, heads * D]
            cache.write(i, rows, positions, k[:, 0], v[:, 0])
            out = attend(self.attention, q[:, 0], cache, i, step, self.scale)  # [B, heads, D]
            return out.reshape(b, 1, self.heads * self.head_dim)

        if self.ops is not None:
            return self.lm_head(self._fused_layers(x, (b, 1), cos, sin, attention)[:, 0])
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            residual = x
            q, k, v = self._qkv(attn, layer.input_layernorm(x), (b, 1))  # [B, 1, heads, D]
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            x = residual + attn.o_proj(attention(i, q, k, v))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.norm(x[:, 0]))

    def _fused_layers(self, x: torch.Tensor, shape: tuple[int, ...], cos, sin, attention) -> torch.Tensor:
        """Every layer with the fused elementwise ops: the modules' GEMMs, ``attention(i, q, k, v)``
        between them; -> the final norm's output. Each residual add is fused with the norm after it."""
        ops, layers = self.ops, self.layers
        first = layers[0].input_layernorm
        h = ops["rms_norm"](x, first.weight, first.variance_epsilon)
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            q = attn.q_proj(h).view(*shape, self.heads, self.head_dim)
            k = attn.k_proj(h).view(*shape, self.kv_heads, self.head_dim)
            v = attn.v_proj(h).view(*shape, self.kv_heads, self.head_dim)
            if self.qk_norm:
                q, k = ops["qk_norm_rope"](q, k, attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.variance_epsilon,
                                           cos, sin)
            else:
                q, k = ops["qk_norm_rope"](q, k, None, None, 0.0, cos, sin)
            norm = layer.post_attention_layernorm
            x, h = ops["add_rms_norm"](x, attn.o_proj(attention(i, q, k, v)), norm.weight, norm.variance_epsilon)
            norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.norm
            x, h = ops["add_rms_norm"](x, mlp.down_proj(ops["silu_mul"](mlp.gate_proj(h), mlp.up_proj(h))),
                                       norm.weight, norm.variance_epsilon)
        return h

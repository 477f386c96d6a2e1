"""The elementwise work between the GEMMs of the fast path's forward (``decode_forward.py``), as
functions that ``torch.compile`` fuses into one kernel each (engine option ``compile_decode``; on
CUDA by default). Runs in the engine's decode thread, inside the decode step's CUDA graph.

Why: eagerly, a Qwen3 layer's RMSNorms (a float cast, a square, a mean, an rsqrt, two multiplies and
a cast back, four times per layer with q_norm/k_norm), RoPE (a rotate-half concat, negation, two
multiplies and an add, for q and k), the residual adds and SiLU-times-up are ~40 small kernels,
~1,400 per decode step of a 36-layer model. At a decode batch of 256 each is a few microseconds
of launch and tail even inside a CUDA graph, which adds up to more than the step's GEMMs and
attention. Fused, a layer runs four elementwise kernels.

The arithmetic is HF's (``Qwen3RMSNorm`` / ``LlamaRMSNorm``: normalise in fp32, cast back, then scale;
``apply_rotary_pos_emb``'s rotate-half; the residual rounded to the model dtype before the next
norm), and the compiled versions keep eager's roundings (``emulate_precision_casts``), so they
match the module calls they replace. ``fused_ops_reason`` says when a model's modules are not
these (another norm, activation or a quantised linear): the forward then calls the modules.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..compile_guard import CompileGroup


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm: ``weight * (x / rms(x))`` with the statistic and division in fp32."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """The residual add and the next norm: ``(x + delta, rms_norm(x + delta))``."""
    total = x + delta
    return total, rms_norm(total, weight, eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                 eps: float, cos: torch.Tensor, sin: torch.Tensor):
    """Qwen3's per-head q/k norms (skipped when the weights are None: Llama, Qwen2), then RoPE."""
    if q_weight is not None:
        q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


EAGER = {"rms_norm": rms_norm, "add_rms_norm": add_rms_norm, "qk_norm_rope": qk_norm_rope, "silu_mul": silu_mul}

GROUP = CompileGroup("hf engine: compiling the fused decode ops",
                     "engine option compile_decode=False skips the attempt")


@functools.cache
def _compiled() -> dict:
    # dynamic: every batch bucket and prefill length shares one graph per function (a few: size 1 is
    # specialised); emulate_precision_casts: fused kernels still round where eager rounds to bf16
    return {name: GROUP.compile(fn, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True})
            for name, fn in EAGER.items()}


def ops(compiled: bool) -> dict:
    """The four functions, compiled (unless a compile failed in this process) or eager."""
    return _compiled() if compiled and not GROUP.failed else EAGER


def _is_rms_norm(module) -> bool:
    # Qwen3RMSNorm, Qwen2RMSNorm, LlamaRMSNorm: `weight` and `variance_epsilon`, HF's arithmetic
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and \
        isinstance(getattr(module, "weight", None), torch.Tensor)


def fused_ops_reason(model) -> str | None:
    """``None`` when every norm, linear and activation of ``model`` is one the fused ops reproduce."""
    inner = model.model
    if not _is_rms_norm(inner.norm):
        return f"final norm {type(inner.norm).__name__}"
    config = model.config.get_text_config()
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {getattr(config, 'hidden_act', None)!r}"
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for norm in (layer.input_layernorm, layer.post_attention_layernorm) + (
                (attn.q_norm, attn.k_norm) if hasattr(attn, "q_norm") else ()):
            if not _is_rms_norm(norm):
                return f"norm {type(norm).__name__}"
        if hasattr(attn, "q_norm") and attn.q_norm.variance_epsilon != attn.k_norm.variance_epsilon:
            return "q_norm and k_norm with different epsilons"
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return "unexpected MLP layout"
        if type(mlp.act_fn).__name__ not in ("SiLU", "SiLUActivation"):
            return f"MLP activation {type(mlp.act_fn).__name__}"
    return None

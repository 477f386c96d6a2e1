"""The torch train backend's own flags (``--train-backend torch``, the default); read by the backend
through its view of the run config. Giving one selects the torch backend."""

from __future__ import annotations

from plugrl.core import hookimpl

from . import liger


@hookimpl
def plugrl_add_options(parser):
    g = parser.add_plugin_group("torch backend", "Owned by --train-backend torch (the embedded trainer).",
                                kind="train_backend", name="torch")
    g.add_argument(
        "--fused-log-probs", choices=("auto", "always", "never"), default=None,
        help="log-probs of the scored positions from hidden states in slices of tokens "
             "(plugins/backends/torch/fused_log_probs.py) instead of from full logits: 'auto' (default) when a "
             "micro-batch's logits would exceed one slice (large vocabularies: at 4B, ~440 tokens), 'always', "
             "or 'never' (the model's own LM head)",
    )
    g.add_argument(
        "--compile-log-prob-slices", choices=("auto", "on", "off"), default=None,
        help="compile the fused log-probs' per-slice softmax / entropy / gradient work with torch.compile "
             "(plugins/backends/torch/slice_kernels.py; one dynamic-shape graph each, no per-step recompiles): "
             "'auto' (default) on CUDA, 'on' everywhere (CPU needs a C++ compiler), 'off' runs them eagerly; "
             "a failed compile falls back to eager with a warning",
    )
    g.add_argument(
        "--log-prob-grad-cache", default=None, metavar="{auto,off,GiB}",
        help="the fused log-probs keep up to this much of their gradient basis (onehot - softmax, bf16) from a "
             "micro-batch's forward for its backward, whose LM-head work then takes two GEMMs instead of three "
             "(plugins/backends/torch/fused_log_probs.py): 'auto' (default) on CUDA up to 4 GiB and at most half "
             "the GPU memory free when the train step starts, nothing on CPU; 'off'; or a size in GiB (e.g. 2.5). "
             "Nothing is kept with a nonzero --entropy-coef, whose gradient recomputes the logits anyway",
    )
    g.add_argument(
        "--liger-kernels", choices=liger.MODES, default=None,
        help="Liger's Triton kernels for RoPE, RMSNorm and SwiGLU in the HF model (plugins/backends/torch/liger.py): "
             "'auto' (default) on CUDA when liger-kernel is installed and knows the architecture, 'on' (an error "
             "where it cannot apply), 'off'",
    )


AUTO_GRAD_CACHE_GIB = 4.0  # 'auto''s cap: the 4B shape's 9k-token micro-batch needs 2.3 GiB


def grad_cache_gib(value) -> float | None:
    """``--log-prob-grad-cache`` as GiB (None for 'auto' or unset); raises ValueError naming the flag."""
    if value is None or str(value).strip().lower() == "auto":
        return None
    if str(value).strip().lower() == "off":
        return 0.0
    try:
        gib = float(value)
    except ValueError:
        gib = float("nan")
    if not 0 <= gib < float("inf"):
        raise ValueError(f"--log-prob-grad-cache {value!r}: use auto, off or a size in GiB >= 0 (e.g. 2.5)")
    return gib


def grad_cache_bytes(value, device, entropy_coef: float) -> int:
    """The fused log-probs' ``grad_cache_bytes`` for a train step starting now on ``device``; called by the
    torch backend once per train call (the budget is read before the micro-batches allocate anything)."""
    if float(entropy_coef) != 0.0:
        return 0  # the entropy's gradient needs every logit again: a kept basis would go unused
    gib = grad_cache_gib(value)
    if gib is not None:
        return int(gib * 2**30)
    if device.type != "cuda":
        return 0
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # the allocator's spare
    return int(min(AUTO_GRAD_CACHE_GIB * 2**30, free // 2))


def optimizer_problems(config) -> list[str]:
    """The torch backend always builds AdamW (``trainer.py``): another --optimizer would be ignored; and its
    clip_grad_norm_ scales every gradient to 0 at --clip-grad 0 (Megatron reads 0 as 'no clipping')."""
    problems = []
    optimizer = getattr(config, "optimizer", None)
    if optimizer not in (None, "adam"):
        problems.append(f"--optimizer {optimizer}: the torch train backend trains with adam (AdamW: --adam-beta1, "
                        "--adam-beta2, --adam-eps, --weight-decay) only; use --optimizer adam or drop it")
    if getattr(config, "clip_grad", None) == 0:
        problems.append("--clip-grad 0: the torch train backend would clip every gradient to norm 0 (no update); "
                        "give a large value such as 1e9 to turn clipping off")
    return problems


def backend_problems(config) -> list[str]:
    """The torch backend's config check, on the driver (``--dry-run`` too)."""
    problems = liger.driver_problems(config.liger_kernels, config.device)
    problems.extend(optimizer_problems(config))
    try:
        grad_cache_gib(getattr(config, "log_prob_grad_cache", None))
    except ValueError as exc:
        problems.append(str(exc))
    return problems

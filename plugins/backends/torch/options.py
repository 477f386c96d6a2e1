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
        "--liger-kernels", choices=liger.MODES, default=None,
        help="Liger's Triton kernels for RoPE, RMSNorm and SwiGLU in the HF model (plugins/backends/torch/liger.py): "
             "'auto' (default) on CUDA when liger-kernel is installed and knows the architecture, 'on' (an error "
             "where it cannot apply), 'off'",
    )


def backend_problems(config) -> list[str]:
    """The torch backend's config check, on the driver (``--dry-run`` too)."""
    return liger.driver_problems(config.liger_kernels, config.device)

"""The torch train backend's own flags (``--train-backend torch``, the default); read by the backend
through its view of the run config. Giving one selects the torch backend."""

from __future__ import annotations

from plugrl.core import hookimpl


@hookimpl
def plugrl_add_options(parser):
    g = parser.add_plugin_group("torch backend", "Owned by --train-backend torch (the embedded trainer).",
                                kind="train_backend", name="torch")
    g.add_argument(
        "--no-fused-log-probs", action="store_true", default=None,
        help="compute the scored positions' log-probs from full logits (the model's own LM head) instead of "
             "from hidden states in slices of tokens (plugins/backends/torch/fused_log_probs.py); for "
             "comparisons, or a model whose head the fused path misreads",
    )

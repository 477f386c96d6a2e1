"""The torch train backend's own flags (``--train-backend torch``, the default); read by the backend
through its view of the run config. Giving one selects the torch backend."""

from __future__ import annotations

from plugrl.core import hookimpl


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

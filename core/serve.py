"""``plugrl serve``: one SGLang-API engine server around the embedded ``hf`` engine (runs as its own
process; see ``plugrl.plugins.backends.sglang.server``). Kept here so ``core.cli`` dispatches it like
its other commands; the server itself belongs to the sglang backend plugin."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from plugrl.plugins.backends.sglang.server import main as serve_main

    return serve_main(argv)

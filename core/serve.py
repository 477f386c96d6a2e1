"""``plugrl serve``: one SGLang-API engine server around the embedded ``hf`` engine (runs as its own
process). Kept here so ``core.cli`` dispatches it like its other commands; the server itself belongs to
the sglang backend plugin, which declares it as ``commands={"serve": ...}`` (core/plugin_commands.py)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from .plugin_commands import run_command

    return run_command("serve", argv)

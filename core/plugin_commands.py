"""Subcommands a plugin provides (``plugrl serve``, ``plugrl convert``): core's CLI dispatches them by
name to the ``commands={"name": "module:function"}`` a registration declared, so core imports no plugin.
The function takes the remaining argv and returns an exit status; it is imported only when it runs.
"""

from __future__ import annotations

import sys

from .registry import import_object


def command_providers(plugin_set=None) -> dict[str, tuple[str, str]]:
    """command name -> (the "module:function" to run, "kind 'name'" of the registration declaring it)."""
    if plugin_set is None:
        from .plugins import load_plugins

        plugin_set = load_plugins()
    found: dict[str, tuple[str, str]] = {}
    for entry in plugin_set.registries.all_entries():
        for command, target in (entry.metadata.get("commands") or {}).items():
            found.setdefault(command, (target, f"{entry.kind} '{entry.name}'"))
    return found


def run_command(name: str, argv: list[str] | None, plugin_set=None) -> int:
    """Run the plugin command ``name``; an error naming the command when no loaded plugin declares it."""
    providers = command_providers(plugin_set)
    if name not in providers:
        print(f"plugrl {name}: no loaded plugin provides this command (declared as commands={{'{name}': ...}} "
              f"at registration); `plugrl plugins list` shows what loaded and what failed", file=sys.stderr)
        return 2
    target, _ = providers[name]
    fn = target if callable(target) else import_object(target)
    try:
        return fn(list(argv or []))
    except (ValueError, OSError) as exc:  # bad flags or paths: the command's own message, not a traceback
        print(f"plugrl {name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line; what the command was writing may be incomplete
        print(f"\nplugrl {name}: interrupted; an output it was writing may be incomplete: remove it before "
              "running the command again", file=sys.stderr)
        return 130


def convert(argv: list[str] | None = None) -> int:
    """``plugrl convert``: the checkpoint converter a train backend declares (megatron's)."""
    return run_command("convert", argv)

"""The ``plugrl`` command: ``train``, ``plugins list|check``, ``score``, ``report``.

Each subcommand's module is imported only when it runs, so ``plugrl plugins list`` stays light.
"""

from __future__ import annotations

import argparse
import json
import sys

USAGE = """plugrl <command> [options]

commands:
  train            run RL post-training (plugrl train --help lists every flag, grouped by plugin)
  plugins list     list registered plugins   [--kind KIND] [--json]
  plugins check    exit non-zero on any plugin load failure or duplicate name
  score            score rows of a JSONL file with a reward plugin
  serve            one SGLang-API engine server around the hf engine (plugrl serve --hf-checkpoint DIR)
  report RUN_DIR   plot a run's metrics into report.png and report.md
  convert          hf-to-megatron | megatron-to-hf checkpoint conversion (plugrl[megatron])
"""


def _plugins_command(argv: list[str]) -> int:
    from .plugins import make_plugin_manager
    from .registry import KINDS

    parser = argparse.ArgumentParser(prog="plugrl plugins")
    sub = parser.add_subparsers(dest="action", required=True)
    list_parser = sub.add_parser("list", help="list registered plugins")
    list_parser.add_argument("--kind", choices=sorted(KINDS), help="only this kind")
    list_parser.add_argument("--json", action="store_true", help="print a JSON array")
    sub.add_parser("check", help="exit 1 on any load failure or duplicate name")
    args = parser.parse_args(argv)

    plugin_set = make_plugin_manager()
    if args.action == "check":
        problems = plugin_set.problems
        for problem in problems:
            print(f"FAIL {problem}")
        count = sum(1 for _ in plugin_set.registries.all_entries())
        print(f"{count} names registered, {len(problems)} problem(s)")
        return 1 if problems else 0

    rows = []
    for entry in plugin_set.registries.all_entries():
        if args.kind and entry.kind != args.kind:
            continue
        rows.append({"kind": entry.kind, "name": entry.name, "plugin": entry.plugin,
                     "builtin": entry.builtin, "status": entry.status})
    for failure in plugin_set.failures:
        rows.append({"kind": None, "name": None, "plugin": failure.plugin, "builtin": failure.distribution == "plugrl",
                     "status": f"failed: {failure.error}"})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max((len(r["name"] or "") for r in rows), default=4)
    current_kind = object()
    for row in rows:
        if row["kind"] != current_kind:
            current_kind = row["kind"]
            print(f"\n[{current_kind or 'load failures'}]")
        origin = "builtin" if row["builtin"] else "third-party"
        print(f"  {(row['name'] or '-'):<{width}}  {row['plugin']} ({origin})  {row['status']}")
    return 0


# command -> "module:function" taking the remaining argv; imported only when the command runs.
COMMANDS = {
    "plugins": "plugrl.core.cli:_plugins_command",
    "score": "plugrl.core.score:main",
    "train": "plugrl.core.train_cli:main",
    "serve": "plugrl.core.serve:main",
    "report": "plugrl.core.report:main",
    "convert": "plugrl.core.plugin_commands:convert",  # declared by the megatron backend
}


def dispatch(argv: list[str], usage: str, commands: dict[str, str], prog: str) -> int:
    """Run ``commands[argv[0]]`` with the rest of ``argv``; usage on no argument, -h or an unknown name."""
    from .registry import import_object

    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"{prog}: unknown command '{name}'\n\n{usage}", file=sys.stderr)
        return 2
    return import_object(commands[name])(rest)


def main(argv: list[str] | None = None) -> int:
    return dispatch(list(sys.argv[1:] if argv is None else argv), USAGE, COMMANDS, "plugrl")


if __name__ == "__main__":
    sys.exit(main())

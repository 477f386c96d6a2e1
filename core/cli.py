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
  plugins list     list registered plugins and where each comes from   [--kind KIND] [--json]
  plugins check    exit non-zero on any plugin load failure or duplicate name
  score            score rows of a JSONL file with a reward plugin
  serve            one SGLang-API engine server around the hf engine (plugrl serve --hf-checkpoint DIR)
  report RUN_DIR   plot a run's metrics into report.png and report.md
  convert          hf-to-megatron | megatron-to-hf checkpoint conversion (plugrl[megatron])
"""


def _plugins_command(argv: list[str]) -> int:
    from .plugins import make_plugin_manager, strict_from_env
    from .registry import KINDS

    parser = argparse.ArgumentParser(
        prog="plugrl plugins",
        epilog="exit status: list 0 (1 under PLUGRL_STRICT_PLUGINS=1 when a plugin failed to load or a name "
               "is registered twice); check 1 on any such problem")
    sub = parser.add_subparsers(dest="action", required=True)
    list_parser = sub.add_parser("list", help="list registered plugins with their origin")
    list_parser.add_argument("--kind", choices=[*sorted(KINDS), "hooks"],
                             help="only this kind (hooks: third-party plugins' observer, option and configure hooks)")
    list_parser.add_argument("--json", action="store_true", help="print a JSON array")
    sub.add_parser("check", help="exit 1 on any load failure or duplicate name")
    args = parser.parse_args(argv)

    plugin_set = make_plugin_manager()
    for warning in plugin_set.warnings:
        print(f"plugrl plugins: warning: {warning}", file=sys.stderr)
    if args.action == "check":
        problems = plugin_set.problems
        for problem in problems:
            print(f"FAIL {problem}")
        count = sum(1 for _ in plugin_set.registries.all_entries())
        print(f"{count} names registered, {len(problems)} problem(s)")
        return 1 if problems else 0

    rows = _plugin_rows(plugin_set, args.kind)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_plugin_table(rows)
    if strict_from_env() and plugin_set.problems:
        print("plugrl plugins: error: plugin problems (PLUGRL_STRICT_PLUGINS=1):\n  " + "\n  ".join(plugin_set.problems),
              file=sys.stderr)
        return 1
    return 0


def _plugin_rows(plugin_set, kind: str | None) -> list[dict]:
    """One row per registered name (both rows of a duplicate), then one per plugin that failed to load."""
    rows = []
    for entry in plugin_set.registries.all_entries():
        if kind and entry.kind != kind:
            continue
        registry = plugin_set.registries[entry.kind]
        status = entry.status
        if entry.name not in registry:  # registered twice: only the qualified name selects it
            status = f"duplicate name: select as {entry.qualified_name}"
        rows.append({"kind": entry.kind, "name": entry.name, "plugin": entry.plugin, "builtin": entry.builtin,
                     "origin": entry.origin, "distribution": "plugrl" if entry.builtin else entry.distribution,
                     "version": entry.version, "qualified_name": entry.qualified_name, "status": status})
    if not kind or kind == "hooks":
        rows.extend(_hook_rows(plugin_set))
    for failure in plugin_set.failures:
        rows.append({"kind": None, "name": None, "plugin": failure.plugin, "builtin": failure.distribution == "plugrl",
                     "origin": failure.distribution or failure.plugin, "distribution": failure.distribution,
                     "version": None, "qualified_name": None, "status": f"failed: {failure.error}"})
    return rows


def _hook_rows(plugin_set) -> list[dict]:
    """One row (kind ``hooks``) per third-party plugin that implements hooks other than the registration
    ones (observers, options, configure, model bridges), so a plugin that registers no name shows it loaded."""
    from .registry import KINDS, plugin_origin

    registration = set(KINDS.values())
    rows = []
    for name, plugin in plugin_set.pm.list_name_plugin():
        if name in plugin_set.builtin_names or plugin is None:
            continue
        hooks = sorted(caller.name for caller in plugin_set.pm.get_hookcallers(plugin) or []
                       if caller.name not in registration)
        if not hooks:
            continue
        distribution, version = plugin_set.distributions.get(name) or None, plugin_set.versions.get(name)
        rows.append({"kind": "hooks", "name": name, "plugin": name, "builtin": False,
                     "origin": plugin_origin(name, False, distribution, version), "distribution": distribution,
                     "version": version, "qualified_name": None, "status": "ok: " + ", ".join(hooks)})
    return rows


def _print_plugin_table(rows: list[dict]) -> None:
    width = max((len(r["name"] or f"'{r['plugin']}'") for r in rows), default=4)
    origin_width = max((len(r["origin"]) for r in rows), default=6)
    current_kind = object()
    for row in rows:
        if row["kind"] != current_kind:
            current_kind = row["kind"]
            print(f"\n[{current_kind or 'load failures'}]")
        name = row["name"] or f"'{row['plugin']}'"  # a load failure: the entry point (or module) that failed
        print(f"  {name:<{width}}  {row['origin']:<{origin_width}}  {row['status']}")


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

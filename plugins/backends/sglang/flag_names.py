"""Do the passed-through ``--sglang-<flag>`` and ``--router-<flag>`` words name flags that the installed
SGLang server and router accept? Checked on the driver by ``options.backend_problems`` (``plugrl train
--dry-run`` too), so a misspelling stops the run before any engine starts instead of killing each
server at launch.

Neither is imported for it: the server's flags are read from the source of the installed SGLang (the
``ServerArgs`` field names, which SGLang turns into ``--field-name``, plus every ``"--..."`` string: aliases
and hand-written flags). Up to 0.5.19 the fields are declared in ``sglang/srt/server_args.py``; from 0.5.20
``ServerArgs`` collects them from the field classes in ``sglang/srt/arg_groups/fields/*.py``, so those files
are read too. The router's come from
``sglang_router``'s own ``RouterArgs.add_cli_args`` parser. When a package is not installed on the
driver nothing is checked for it (its processes would then be launched elsewhere, or fail to start
with their own message).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import functools
import importlib.util
import re
from pathlib import Path

_FLAG = re.compile(r"^--[a-z0-9][a-z0-9-]*$")


def _package_dir(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)  # a top-level name: located, not imported
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def server_source_files(srt: Path) -> tuple[Path, ...]:
    """The files of one SGLang ``srt`` package that declare server flags: ``server_args.py`` and, from
    0.5.20 on, every ``arg_groups/fields/*.py`` (each class there contributes its fields to ``ServerArgs``)."""
    files = [srt / "server_args.py"] if (srt / "server_args.py").is_file() else []
    fields_dir = srt / "arg_groups" / "fields"
    if fields_dir.is_dir():
        files += sorted(fields_dir.glob("*.py"))
    return tuple(files)


def _is_class_var(annotation: ast.expr) -> bool:
    target = annotation.value if isinstance(annotation, ast.Subscript) else annotation
    return getattr(target, "id", getattr(target, "attr", None)) == "ClassVar"


@functools.cache
def server_flags_from_source(path: Path, every_class: bool = False) -> frozenset[str]:
    """The long flags declared in one file: the annotated fields of ``ServerArgs`` (of every class with
    ``every_class``: SGLang's ``arg_groups/fields`` files) as ``--field-name``, and each ``"--..."`` string."""
    flags: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ClassDef) and (every_class or node.name == "ServerArgs"):
            flags.update("--" + item.target.id.replace("_", "-") for item in node.body
                         if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                         and not item.target.id.startswith("_") and not _is_class_var(item.annotation))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _FLAG.match(node.value):
            flags.add(node.value)
    return frozenset(flags)


def server_flags_from_package(srt: Path) -> frozenset[str]:
    """Every long flag of the SGLang server whose ``srt`` package is at ``srt``."""
    flags: set[str] = set()
    for path in server_source_files(srt):
        flags |= server_flags_from_source(path, every_class=path.parent.name == "fields")
    return frozenset(flags)


def installed_server_flags() -> tuple[frozenset[str], Path] | None:
    """(flags, the ``srt`` folder they are read from) of the installed SGLang server, or None without SGLang."""
    package = _package_dir("sglang")
    srt = package / "srt" if package else None
    if srt is None or not server_source_files(srt):
        return None
    return server_flags_from_package(srt), srt


@functools.cache
def installed_router_flags() -> frozenset[str] | None:
    """The long flags of ``python -m sglang_router.launch_router``, or None without sglang_router."""
    if _package_dir("sglang_router") is None:
        return None
    try:
        from sglang_router.router_args import RouterArgs
    except ImportError:
        return None
    parser = argparse.ArgumentParser(add_help=False)
    RouterArgs.add_cli_args(parser, use_router_prefix=False)
    return frozenset(s for action in parser._actions for s in action.option_strings if s.startswith("--"))


def unknown_flag_problems(passthrough: dict | None, known: frozenset[str], prefix: str, target: str) -> list[str]:
    """One problem per passed-through key whose flag ``known`` lacks, with the closest known flag."""
    problems = []
    for key in passthrough or {}:
        flag = "--" + key.replace("_", "-")
        if flag in known:
            continue
        close = difflib.get_close_matches(flag, sorted(known), n=1)
        hint = f"; did you mean {prefix}{close[0][2:]}?" if close else ""
        problems.append(f"{prefix}{flag[2:]}: {target} has no flag {flag}{hint}")
    return problems


def passthrough_problems(args) -> list[str]:
    """Misspelled ``--sglang-*`` / ``--router-*`` passthrough words, against what is installed here."""
    problems = []
    server_words = getattr(args, "sglang_passthrough", None)
    server = installed_server_flags() if server_words else None
    if server is not None:
        flags, path = server
        problems += unknown_flag_problems(server_words, flags, "--sglang-", f"the installed SGLang server ({path})")
    router_words = getattr(args, "router_passthrough", None)
    router = installed_router_flags() if router_words else None  # (imports sglang_router: only when needed)
    if router is not None:
        problems += unknown_flag_problems(router_words, router, "--router-", "the installed sglang_router")
    return problems

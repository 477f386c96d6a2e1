"""The design rule (docs/plugin-options.md): core imports no plugin module and branches on no plugin name. An AST scan of core/."""

from __future__ import annotations

import ast
import re
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "core"
# The name-selecting config attributes: comparing one of them to a literal is branching on a plugin name.
SELECTORS = {"train_backend", "rollout_backend", "advantage_estimator", "rm_type", "dynamic_sampling_filter",
             "buffer_filter", "reward_post_process", "placement"}
PLUGIN_PATH = re.compile(r"^plugrl\.plugins(\.[A-Za-z_][\w.]*)?(:[\w.]+)?$")


def _selector(node: ast.AST) -> bool:
    if isinstance(node, ast.Attribute):
        return node.attr in SELECTORS
    if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "getattr":
        return len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value in SELECTORS
    return False


def _literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return True
    return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(_literal(e) for e in node.elts)


def violations(source: str, filename: str) -> list[str]:
    """Plugin imports, plugin import paths and name branches in one core module's source."""
    tree = ast.parse(source, filename)
    found = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.startswith("plugrl.plugins")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.startswith("plugrl.plugins") or (node.level >= 2 and module.split(".")[0] == "plugins") or (
                    node.level >= 2 and not module and any(a.name == "plugins" for a in node.names)):
                found.append(f"{where}: from {'.' * node.level}{module} import ...")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and PLUGIN_PATH.match(node.value):
            found.append(f"{where}: plugin import path {node.value!r}")
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_selector(s) for s in sides) and any(_literal(s) for s in sides):
                found.append(f"{where}: branches on a plugin name ({ast.unparse(node)})")
    return found


def test_core_imports_no_plugin_and_branches_on_no_plugin_name():
    found = [v for path in sorted(CORE.glob("*.py")) for v in violations(path.read_text(), str(path))]
    assert not found, "core must reach plugins through the registry (docs/plugin-options.md):\n" + "\n".join(found)


def test_the_scan_catches_each_kind_of_violation():
    cases = {
        "import plugrl.plugins.rewards.dapo": "import plugrl.plugins",
        "from plugrl.plugins.backends import tiny_default": "from plugrl.plugins",
        "from ..plugins.filters import fifo": "from ..plugins",
        "from .. import plugins": "from ..",
        "X = import_object('plugrl.plugins.backends.megatron.convert:main')": "plugin import path",
        "if args.train_backend == 'megatron': pass": "branches on a plugin name",
        "ok = getattr(args, 'rollout_backend', None) in ('hf', 'x')": "branches on a plugin name",
    }
    for source, expected in cases.items():
        found = violations(source, "core/example.py")
        assert len(found) == 1 and expected in found[0], (source, found)
    assert not violations("from .registry import import_object\nif args.device == 'x': pass", "core/x.py")
    # the built-in manifest lives with the plugins (plugins/__init__.py), not in core
    assert violations("BUILTIN_PLUGINS = ('plugrl.plugins.rewards.dapo',)", "core/plugins.py")


def test_no_core_file_names_a_plugin_module_even_in_text():
    """The issue's measure, `grep -F plugrl.plugins core/`: no code, string, comment or docstring."""
    hits = [f"{path.name}:{n}" for path in sorted(CORE.glob("*.py"))
            for n, line in enumerate(path.read_text().splitlines(), 1) if "plugrl.plugins" in line]
    assert not hits, hits


def test_the_builtin_manifest_comes_from_plugrls_entry_point_in_registration_order():
    import importlib.metadata

    from plugrl.core.plugins import BUILTIN_GROUP, builtin_plugin_modules, make_plugin_manager
    from plugrl.plugins import BUILTIN_MODULES

    (ep,) = [e for e in importlib.metadata.entry_points(group=BUILTIN_GROUP) if e.dist.name == "plugrl"]
    assert ep.value == "plugrl.plugins:BUILTIN_MODULES"
    assert builtin_plugin_modules() == BUILTIN_MODULES
    plugin_set = make_plugin_manager(entry_points=False)
    assert plugin_set.builtin_names == set(BUILTIN_MODULES) and not plugin_set.problems
    # every built-in module is in the manifest: a module that registers plugins but is left out
    # would silently vanish from every run
    plugins_dir = CORE.parent / "plugins"
    hook_modules = {
        "plugrl." + ".".join(path.relative_to(CORE.parent).with_suffix("").parts)
        for path in plugins_dir.rglob("*.py") if "@hookimpl" in path.read_text()
    }
    assert hook_modules == set(BUILTIN_MODULES)


def test_a_missing_manifest_is_a_load_error_that_says_to_reinstall(monkeypatch):
    import importlib.metadata

    import pytest

    from plugrl.core import plugins

    plugins.builtin_plugin_modules.cache_clear()
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [])
    try:
        with pytest.raises(plugins.PluginLoadError, match="reinstall plugrl"):
            plugins.builtin_plugin_modules()
    finally:
        monkeypatch.undo()
        plugins.builtin_plugin_modules.cache_clear()


def test_core_reads_no_flag_that_a_plugin_owns():
    """A backend's flags (Megatron's parallel sizes, SGLang's router address) reach core only through
    the backend's declared traits (``parallel_sizes``, ``external_engines``, ...), never by name."""
    from plugrl.core.config import build_parser
    from plugrl.core.plugin_config import flag_owners

    owners = flag_owners(build_parser())
    found = []
    for path in sorted(CORE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            name = None
            if isinstance(node, ast.Attribute) and ast.unparse(node.value) in ("args", "self.args", "config"):
                name = node.attr
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("getattr", "hasattr")
                  and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
                name = node.args[1].value
            if name in owners:
                found.append(f"{path.name}:{node.lineno} reads {owners[name][2]} of the {owners[name][1]} plugin")
    assert not found, "\n".join(found)

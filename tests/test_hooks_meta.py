"""Meta-tests: every hook is documented (docstring and README.md) and exercised by a test."""

import inspect
import re
from pathlib import Path

import pytest

from plugrl.core import hookspecs

ROOT = Path(__file__).resolve().parents[1]
HOOKS = sorted(name for name, fn in vars(hookspecs).items()
               if name.startswith("plugrl_") and hasattr(fn, "plugrl_spec"))


def test_hookspecs_found():
    assert len(HOOKS) >= 14
    assert {"plugrl_register_rewards", "plugrl_configure", "plugrl_model_bridge"} <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_docstring(hook):
    doc = inspect.getdoc(getattr(hookspecs, hook))
    assert doc and len(doc.split()) >= 5, f"{hook} needs a docstring saying when, where and its contract"


def _hooks_table():
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        match = re.match(r"\|\s*`(plugrl_\w+)\(([^)]*)\)`\s*\|(.*)\|\s*$", line)
        if match:
            rows[match.group(1)] = (match.group(2), [cell.strip() for cell in re.split(r"(?<!\\)\|", match.group(3))])
    return rows


def test_hooks_table_has_the_expected_columns():
    text = (ROOT / "README.md").read_text()
    assert "| hook | when | where (process) | contract |" in text


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_in_the_docs_table_with_its_arguments(hook):
    rows = _hooks_table()
    assert hook in rows, f"README.md has no table row for {hook}"
    args, cells = rows[hook]
    spec_args = list(inspect.signature(getattr(hookspecs, hook)).parameters)
    assert [a.strip() for a in args.split(",") if a.strip()] == spec_args
    assert len(cells) == 3 and all(cells), f"{hook}: fill when, where and contract"


def test_docs_table_lists_no_unknown_hook():
    assert set(_hooks_table()) <= set(HOOKS)


def _test_sources():
    here = Path(__file__).resolve()
    return {p.name: p.read_text() for p in sorted(here.parent.glob("test_*.py")) if p != here}


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook):
    users = [name for name, source in _test_sources().items() if re.search(rf"\b{hook}\b", source)]
    assert users, f"no test in tests/ mentions {hook}"

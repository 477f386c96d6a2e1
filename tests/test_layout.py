"""The plugin layout: one folder per kind and per backend; modules that moved keep their old import
paths as the same module objects (a third party's import or monkeypatch keeps working)."""

import importlib
import subprocess
import sys

import pytest

from plugrl.plugins import MOVED


@pytest.mark.parametrize("old,new", sorted(MOVED.items()))
def test_old_paths_are_the_moved_modules(old, new):
    if "megatron" in new:
        pytest.importorskip("megatron.core")
    pytest.importorskip("torch")
    assert importlib.import_module(old) is importlib.import_module(new)


def test_old_from_imports_work_in_a_fresh_process():
    code = ("from plugrl.plugins.backends.hf_engine import HFRolloutEngine\n"
            "from plugrl.plugins.backends.hf.engine import HFRolloutEngine as New\n"
            "from plugrl.plugins.filters.fifo import FifoBuffer\n"
            "assert HFRolloutEngine is New and FifoBuffer.__module__ == 'plugrl.plugins.buffers.fifo'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_unknown_names_still_fail():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("plugrl.plugins.backends.hf_nothing")

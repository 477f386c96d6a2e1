"""The wheel maps the repository root onto ``plugrl/`` and installs a working ``plugrl`` package.

Built from a copy of the source tree (pip builds a local project in place, and other builds may
run in the repository at the same time).
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]
SKIP = ("build", "dist", "*.egg-info", "__pycache__", ".git", ".venv*", "runs", ".pytest_cache", ".devkit")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*SKIP), symlinks=True)
    out = tmp / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--no-index", "-w", str(out), str(source)],
        check=True, capture_output=True, text=True,
    )
    (path,) = out.glob("plugrl-*.whl")
    return path


@pytest.fixture(scope="module")
def names(wheel):
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_every_package_is_in_the_wheel(names):
    packages = find_packages(str(ROOT), include=["core", "core.*", "plugins", "plugins.*"])
    assert "core" in packages and "plugins.filters" in packages
    for package in packages:
        init = f"plugrl/{package.replace('.', '/')}/__init__.py"
        assert init in names, f"{init} missing from the wheel"
    modules = [p.relative_to(ROOT).as_posix() for top in ("core", "plugins") for p in (ROOT / top).rglob("*.py")
               if "__pycache__" not in p.parts]
    missing = sorted(m for m in modules if f"plugrl/{m}" not in names)
    assert not missing, f"modules missing from the wheel: {missing}"


def test_root_init_but_not_setup_or_tests(names):
    assert "plugrl/__init__.py" in names
    assert "plugrl/setup.py" not in names
    assert not [n for n in names if n.startswith(("plugrl/tests/", "tests/"))]
    assert not [n for n in names if n.startswith(("plugrl/examples/", "examples/"))]
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_console_script_entry_point(wheel, names):
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    with zipfile.ZipFile(wheel) as archive:
        text = archive.read(entry_points).decode()
    assert "[console_scripts]" in text
    assert "plugrl = plugrl.core.cli:main" in text


def test_installed_wheel_imports_outside_the_repo(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
                    "--no-index", "--target", str(target), str(wheel)], check=True, capture_output=True, text=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLUGRL_")}
    env["PYTHONPATH"] = str(target)
    code = ("import plugrl, plugrl.core.cli, plugrl.plugins.filters.fifo\n"
            "from plugrl import hookimpl\n"
            "print(plugrl.__file__)\n"
            "print(plugrl.core.cli.main(['plugins', 'check']))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert Path(lines[0]).parent == target / "plugrl"  # the wheel's copy, not the editable checkout
    assert lines[-1] == "0" and "0 problem(s)" in lines[-2], result.stdout

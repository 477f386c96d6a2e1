"""A real third-party plugin, pip-installed: discovery, failure isolation, `plugrl` commands, its own tests.

The example packages are copied out of the repository (pip builds a local project in place) and
installed with ``pip install --target``; subprocesses see them through ``PYTHONPATH``.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
EXAMPLE_NAMES = {"contains_42": "reward", "mean_baseline": "advantage_estimator", "min_reward_spread": "filter"}


def pip_install(package: str, tmp: Path) -> tuple[Path, Path]:
    """(install target, source copy) for one example package."""
    source = tmp / "src" / package
    shutil.copytree(EXAMPLES / package, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp / "site" / package
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--no-index", "--target", str(target), str(source)],
        check=True, capture_output=True, text=True,
    )
    return target, source


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plugins")
    example, example_src = pip_install("plugrl-example-plugin", tmp)
    broken, _ = pip_install("plugrl-broken-plugin", tmp)
    return {"example": example, "broken": broken, "example_src": example_src, "tmp": tmp}


def run(installed, *args, sites=("example",), env=None, cwd=None, module=("-m", "plugrl.core.cli")):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PLUGRL_") and k != "PYTHONPATH"}
    environ["PYTHONPATH"] = os.pathsep.join(str(installed[site]) for site in sites)
    environ.update(env or {})
    return subprocess.run([sys.executable, *module, *args], env=environ, cwd=cwd or installed["tmp"],
                          capture_output=True, text=True, timeout=300)


def plugins_list(installed, **kwargs):
    result = run(installed, "plugins", "list", "--json", **kwargs)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_installed_from_the_target_dir(installed):
    result = run(installed, "-c", "import plugrl_example_plugin as m, plugrl; print(m.__file__); print(plugrl.__file__)",
                 module=())
    example_file, plugrl_file = result.stdout.split()
    assert Path(example_file).is_relative_to(installed["example"])
    assert Path(plugrl_file).resolve().parent == ROOT  # the plugrl under test, not a copy
    dist_info = list(installed["example"].glob("plugrl_example_plugin-0.1.0.dist-info"))
    assert dist_info and "example = plugrl_example_plugin" in (dist_info[0] / "entry_points.txt").read_text()


def test_plugins_list_shows_the_example_plugin(installed):
    rows = plugins_list(installed)
    mine = {row["name"]: row for row in rows if row["plugin"] == "example"}
    assert {name: row["kind"] for name, row in mine.items()} == EXAMPLE_NAMES
    assert all(row["builtin"] is False and row["status"] == "ok" for row in mine.values())
    assert not [row for row in rows if row["status"].startswith("failed")]
    assert any(row["name"] == "deepscaler" and row["builtin"] for row in rows)


def test_broken_plugin_is_reported_and_isolated(installed):
    rows = plugins_list(installed, sites=("example", "broken"))
    (failed,) = [row for row in rows if row["plugin"] == "broken"]
    assert failed["status"].startswith("failed: ImportError: plugrl_broken_plugin needs")
    assert failed["builtin"] is False
    assert {row["name"] for row in rows if row["plugin"] == "example"} == set(EXAMPLE_NAMES)
    assert any(row["name"] == "grpo" for row in rows)


def test_plugins_check_exit_status(installed):
    bad = run(installed, "plugins", "check", sites=("example", "broken"))
    assert bad.returncode != 0
    assert "FAIL plugin 'broken' (distribution plugrl-broken-plugin) failed to load: ImportError" in bad.stdout
    good = run(installed, "plugins", "check")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "0 problem(s)" in good.stdout


def test_disable_hides_the_plugin(installed):
    rows = plugins_list(installed, env={"PLUGRL_DISABLE_PLUGINS": "example"})
    assert not {row["name"] for row in rows} & set(EXAMPLE_NAMES)
    assert not [row for row in rows if row["plugin"] == "example"]
    kinds = plugins_list(installed, env={"PLUGRL_LOAD_PLUGINS": "plugrl-example-plugin"})
    assert {row["name"] for row in kinds if row["plugin"] == "example"} == set(EXAMPLE_NAMES)


def test_score_with_the_plugin_reward(installed, tmp_path):
    rows = [{"response": "it is 42", "label": "42"}, {"response": "it is 41", "label": "42"},
            {"response": "42 and 42", "label": None}, {"response": "", "label": "42"}]
    source, output = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = run(installed, "score", "--rm-type", "contains_42", "--input", str(source), "--output", str(output))
    assert result.returncode == 0, result.stdout + result.stderr
    scored = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["reward"] for row in scored] == [1.0, 0.0, 1.0, 0.0]
    assert [row["response"] for row in scored] == [row["response"] for row in rows]
    assert "count: 4" in result.stdout and "mean: 0.5" in result.stdout and "errors: 0" in result.stdout
    unknown = run(installed, "score", "--rm-type", "contains_43", "--input", str(source))
    assert unknown.returncode == 2 and "Did you mean 'contains_42'?" in unknown.stderr


def test_example_package_own_tests(installed, tmp_path):
    source = installed["example_src"]
    result = run(installed, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(source / "pyproject.toml"),
                 "--rootdir", str(source), str(source / "tests"), module=(), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout and "failed" not in result.stdout


EXAMPLE_TRAIN = ["train", "--dry-run", "--rm-type", "contains_42", "--advantage-estimator", "mean_baseline",
                 "--dynamic-sampling-filter", "min_reward_spread"]


def test_train_dry_run_checks_the_example_plugins_options(installed):
    ok = run(installed, *EXAMPLE_TRAIN, "--adv-opt", "scale=2", "--filter-opt", "spread=0.3")
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    bad = run(installed, *EXAMPLE_TRAIN, "--adv-opt", "scael=2", "--filter-opt", "sprad=0.3")
    assert bad.returncode == 2, bad.stdout[-2000:] + bad.stderr[-2000:]
    assert ("--adv-opt scael=2: advantage estimator 'mean_baseline' (plugin example) has no option 'scael'; "
            "allowed: scale; did you mean 'scale'?") in bad.stderr
    assert ("--filter-opt sprad=0.3: filter 'min_reward_spread' (plugin example) has no option 'sprad'; "
            "allowed: spread; did you mean 'spread'?") in bad.stderr
    assert "Traceback" not in bad.stderr
    checked = run(installed, *EXAMPLE_TRAIN, "--adv-opt", "scale=0", "--filter-opt", "spread=-1")
    assert checked.returncode == 2
    assert "advantage estimator 'mean_baseline' (plugin example): option 'scale' must be > 0, got 0" in checked.stderr
    assert "filter 'min_reward_spread' (plugin example): option 'spread' must be >= 0, got -1" in checked.stderr

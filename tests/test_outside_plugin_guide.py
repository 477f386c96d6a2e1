"""The plugin author's guide (docs/plugin-guide.md) and the README's "Writing a plugin" example, as an
outside author uses them: their files are copied out of the Markdown, pip-installed into a fresh
virtual environment (which sees this plugrl through its system site-packages), and run: the
package's own tests, `plugins list`, `score`, `train --dry-run` and a short `train`."""

import json
import os
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "plugin-guide.md"
README = ROOT / "README.md"
FILE_BLOCK = re.compile(r"```(?:python|toml)\n# (?:file: )?(\S+\.(?:py|toml))\n(.*?)```", re.DOTALL)
GUIDE_NAMES = {"keyword": "reward", "mean_baseline": "advantage_estimator", "min_spread": "filter",
               "newest_first": "buffer_policy", "length_cost": "reward_post_processor",
               "rollout_first": "placement"}


def write_files(markdown: str, dest: Path) -> list[str]:
    """Every code block whose first line names a file (``# file: path`` or ``# path``), written under ``dest``."""
    written = []
    for path, body in FILE_BLOCK.findall(markdown):
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(body)
        written.append(path)
    return written


def make_venv(where: Path) -> Path:
    """A fresh venv that also sees this interpreter's site-packages (the installed plugrl, pip, setuptools,
    pytest), added by a ``.pth`` file after its own. (``--system-site-packages`` would expose the base
    interpreter's instead, which lacks plugrl when the tests run from a virtual environment, as in CI.)"""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, capture_output=True,
                   text=True)
    python = where / "bin" / "python"
    own_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
    # an "import" line runs, so addsitedir also reads the .pth files there (editable installs need them)
    lines = [f"import site; site.addsitedir({path!r})\n" for path in site.getsitepackages()]
    (Path(own_site) / "_parent_site.pth").write_text("".join(lines))
    return python


def pip_install(python: Path, *args) -> None:
    result = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                             "--disable-pip-version-check", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLUGRL_") and k != "PYTHONPATH"}
    return {**env, **extra}


def plugrl(python: Path, *args, env=None, cwd=None, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "plugrl.core.cli", *args], capture_output=True, text=True,
                          env=env or clean_env(), cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def guide(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guide")
    source = tmp / "plugrl-guide-example"
    files = write_files(GUIDE.read_text(), source)
    assert "pyproject.toml" in files and "tests/test_conformance.py" in files, files
    python = make_venv(tmp / "venv")
    pip_install(python, str(source))
    return {"python": python, "source": source, "tmp": tmp}


def test_every_kind_with_an_example_has_one_in_the_guide():
    files = FILE_BLOCK.findall(GUIDE.read_text())
    modules = {path for path, _ in files}
    for module in ("rewards", "estimators", "filters", "buffers", "post", "placements", "observers"):
        assert f"plugrl_guide_example/{module}.py" in modules


def test_the_guide_package_is_listed_with_its_origin(guide):
    result = plugrl(guide["python"], "plugins", "list", "--json")
    assert result.returncode == 0, result.stderr
    mine = [row for row in json.loads(result.stdout) if (row["distribution"] or "") == "plugrl-guide-example"]
    rows = {row["name"]: row for row in mine if row["kind"] != "hooks"}
    assert {name: row["kind"] for name, row in rows.items()} == GUIDE_NAMES
    hooks = {row["name"]: row["status"] for row in mine if row["kind"] == "hooks"}  # the observer's entry point too
    assert hooks["guide_observers"] == "ok: plugrl_on_rollout_end", hooks
    assert rows["keyword"]["origin"] == "plugrl-guide-example 0.1.0 (entry point 'guide_rewards')"
    assert rows["keyword"]["qualified_name"] == "guide_rewards:keyword"
    assert all(row["status"] == "ok" for row in rows.values())
    check = plugrl(guide["python"], "plugins", "check")
    assert check.returncode == 0 and "0 problem(s)" in check.stdout, check.stdout


def test_the_guide_package_passes_its_own_tests(guide):
    source = guide["source"]
    result = subprocess.run([str(guide["python"]), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
                             str(source), str(source / "tests")], capture_output=True, text=True,
                            env=clean_env(), cwd=guide["tmp"], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "4 passed" in result.stdout, result.stdout


def test_score_with_the_guide_reward_and_its_options(guide, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"response": r, "label": None}) + "\n" for r in ("I think so", "42", "")))
    result = plugrl(guide["python"], "score", "--rm-type", "keyword", "--rm-opt", "keyword=think", "--rm-opt",
                    "weight=3", "--input", str(rows), "--output", str(tmp_path / "out.jsonl"))
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["reward"] for line in (tmp_path / "out.jsonl").read_text().splitlines()] == [3.0, 0.0, 0.0]
    bad = plugrl(guide["python"], "score", "--rm-type", "keyword", "--rm-opt", "keywrd=think", "--input", str(rows))
    assert bad.returncode == 2 and "has no option 'keywrd'" in bad.stderr, bad.stderr


TRAIN = ["train", "--rm-type", "keyword", "--rm-opt", "keyword=boxed", "--advantage-estimator", "mean_baseline",
         "--guide-baseline-scale", "2", "--dynamic-sampling-filter", "min_spread", "--filter-opt", "spread=0.5",
         "--partial-rollout", "--buffer-filter", "newest_first", "--reward-post-process", "length_cost"]


def test_train_dry_run_checks_the_guide_plugins_options(guide, tmp_path):
    env = clean_env(PLUGRL_CACHE=str(tmp_path / "cache"))
    ok = plugrl(guide["python"], *TRAIN, "--dry-run", env=env)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    bad = plugrl(guide["python"], *TRAIN, "--rm-opt", "keywrd=x", "--guide-baseline-scale", "0", "--dry-run", env=env)
    assert bad.returncode == 2, bad.stdout[-2000:] + bad.stderr[-2000:]
    assert ("--rm-opt keywrd='x': reward 'keyword' (plugin guide_rewards) has no option 'keywrd'; allowed: keyword, "
            "weight; did you mean 'keyword'?") in bad.stderr
    assert "--guide-baseline-scale must be > 0, got 0.0" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.slow
def test_a_short_run_uses_every_guide_plugin(guide, tmp_path):
    """Two rollouts of the embedded default with the guide's reward, estimator, filter, buffer,
    post-processor and observer; what the guide says about their metrics is in metrics.jsonl."""
    out = tmp_path / "run"
    result = plugrl(guide["python"], *TRAIN, "--num-rollout", "2", "--sft-warmup-steps", "0", "--rollout-batch-size",
                    "4", "--n-samples-per-prompt", "4", "--global-batch-size", "16", "--eval-interval", "0",
                    "--over-sampling-batch-size", "8", "--output-dir", str(out),
                    env=clean_env(PLUGRL_CACHE=str(tmp_path / "cache")), timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (meta,) = [r for r in rows if r["phase"] == "meta"]
    assert (meta["reward"], meta["advantage_estimator"], meta["filter"]) == ("keyword", "mean_baseline", "min_spread")
    assert meta["plugins"]["buffer_policy"]["origin"] == "plugrl-guide-example 0.1.0 (entry point 'guide_buffers')"
    assert meta["rm_opt"] == {"keyword": "boxed"} and meta["filter_opt"] == {"spread": 0.5}
    train = [r for r in rows if r["phase"] == "train"]
    assert [r["rollout_id"] for r in train] == [0, 1]
    for row in train:
        assert row["guide/reward_percent"] == pytest.approx(100 * row["rollout/raw_reward"])
        assert row["rollout/submitted_groups"] >= 4
        drops = {k for k in row if k.startswith("rollout/dynamic_filter/")}
        assert drops <= {"rollout/dynamic_filter/drop_no_spread"}, drops


# ---- the README's "Writing a plugin" example, installed as written --------------------------------


def readme_section() -> str:
    text = README.read_text()
    start = text.index("## Writing a plugin")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def install_the_readme_example(tmp_path) -> Path:
    section = readme_section()
    assert "docs/plugin-guide.md" in section
    source = tmp_path / "plugrl-mine"
    files = write_files(section, source)
    assert sorted(files) == ["plugrl_mine/__init__.py", "pyproject.toml"], files
    python = make_venv(tmp_path / "venv")
    pip_install(python, "-e", str(source))  # the README says `pip install -e .`
    return python


def test_the_readme_example_installs_as_written(tmp_path):
    python = install_the_readme_example(tmp_path)
    listed = plugrl(python, "plugins", "list", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    mine = {row["name"]: row["kind"] for row in json.loads(listed.stdout) if row["distribution"] == "plugrl-mine"}
    assert mine == {"contains_42": "reward", "has_spread": "filter"}
    code = ("from plugrl.core.testing import check_reward, check_filter\n"
            "assert check_reward('contains_42') == [1.0, 1.0, 0.0, 0.0, 1.0]\n"
            "assert [d.keep for d in check_filter('has_spread')] == [True, False, False, True]\n")
    checked = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=clean_env(), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr


@pytest.mark.slow
def test_the_readme_example_command_finishes_on_the_default_model(tmp_path):
    """The README's command with its own filter: the tiny default model never writes 42, so no group has
    a spread; the filter's keep_when_insufficient keeps the rollout to the groups it needs (without it the
    rollout would sample forever)."""
    python = install_the_readme_example(tmp_path)
    out = tmp_path / "run"
    result = plugrl(python, "train", "--rm-type", "contains_42", "--dynamic-sampling-filter", "has_spread",
                    "--filter-opt", "spread=0.3", "--num-rollout", "1", "--sft-warmup-steps", "0",
                    "--rollout-batch-size", "4", "--n-samples-per-prompt", "2", "--global-batch-size", "8",
                    "--eval-interval", "0", "--output-dir", str(out),
                    env=clean_env(PLUGRL_CACHE=str(tmp_path / "cache")), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (meta,) = [r for r in rows if r["phase"] == "meta"]
    assert (meta["reward"], meta["filter"], meta["filter_opt"]) == ("contains_42", "has_spread", {"spread": 0.3})
    (train,) = [r for r in rows if r["phase"] == "train"]
    assert train["rollout/submitted_groups"] == 4  # the 4 groups it needs, none sampled again

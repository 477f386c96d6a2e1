"""What a user with third-party plugins installed sees from the `plugrl` command: strict and lenient
loading, blocked plugins, a plugin reusing a built-in's name, and the help texts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BROKEN = "raise ImportError('plugrl_cli_broken needs sympy99')\n"
SHADOW = '''
from plugrl import hookimpl

@hookimpl
def plugrl_register_rewards(register):
    register("deepscaler", lambda sample: 1.0)
'''


OBSERVER_ONLY = '''
from plugrl import hookimpl

@hookimpl
def plugrl_on_rollout_end(rollout_id, metrics):
    return None

@hookimpl
def plugrl_configure(config):
    pass
'''


def install(site: Path, dist: str, entry_point: str, module: str, source: str) -> None:
    """A distribution as pip leaves it: a module and a dist-info holding the entry point."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(source)
    info = site / f"{dist.replace('-', '_')}-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text(f"[plugrl]\n{entry_point} = {module}\n")


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    install(root / "broken", "plugrl-cli-broken", "clibroken", "plugrl_cli_broken", BROKEN)
    install(root / "shadow", "plugrl-cli-shadow", "clishadow", "plugrl_cli_shadow", SHADOW)
    install(root / "observer", "plugrl-cli-observer", "cliobserver", "plugrl_cli_observer", OBSERVER_ONLY)
    return {"broken": root / "broken", "shadow": root / "shadow", "observer": root / "observer", "cache": root / "cache"}


def plugrl(sites, *args, site=None, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PLUGRL_") and k != "PYTHONPATH"}
    environ.update(PLUGRL_CACHE=str(sites["cache"]), **env)
    if site:
        environ["PYTHONPATH"] = str(sites[site])
    return subprocess.run([sys.executable, "-m", "plugrl.core.cli", *args], capture_output=True, text=True,
                          env=environ, timeout=600)


DRY_RUN = ("train", "--dry-run", "--num-rollout", "1")


def test_strict_mode_fails_plugins_list_and_stops_train_cleanly(sites):
    listed = plugrl(sites, "plugins", "list", site="broken", PLUGRL_STRICT_PLUGINS="1")
    assert listed.returncode == 1
    assert "[load failures]" in listed.stdout  # the table is still printed
    assert "plugin 'clibroken' (distribution plugrl-cli-broken) failed to load: ImportError" in listed.stderr
    assert plugrl(sites, "plugins", "list", site="broken").returncode == 0  # lenient by default

    train = plugrl(sites, *DRY_RUN, site="broken", PLUGRL_STRICT_PLUGINS="1")
    assert train.returncode == 2, train.stderr
    assert train.stderr.startswith("plugrl train: error: plugin problems (PLUGRL_STRICT_PLUGINS=1):")
    assert "plugrl_cli_broken needs sympy99" in train.stderr and "Traceback" not in train.stderr


def test_lenient_train_warns_once_about_a_broken_plugin(sites):
    train = plugrl(sites, *DRY_RUN, site="broken")
    assert train.returncode == 0, train.stderr[-2000:]
    warnings = [line for line in train.stderr.splitlines() if "clibroken" in line]
    assert len(warnings) == 1, train.stderr
    assert warnings[0].startswith("plugrl train: warning: plugin 'clibroken' (distribution plugrl-cli-broken) "
                                  "failed to load: ImportError: plugrl_cli_broken needs sympy99")
    assert "PLUGRL_STRICT_PLUGINS=1 makes them fatal" in warnings[0]
    assert "warning" not in plugrl(sites, "train", "--help", site="broken").stderr  # no noise on --help


def test_disable_names_are_checked_and_blocked_plugins_named(sites):
    typo = plugrl(sites, "plugins", "list", PLUGRL_DISABLE_PLUGINS="plugrl.plugins.rewards.deepscalr")
    assert typo.returncode == 0
    assert ("warning: PLUGRL_DISABLE_PLUGINS: 'plugrl.plugins.rewards.deepscalr' matches no plugin (entry point, "
            "distribution or built-in module); did you mean 'plugrl.plugins.rewards.deepscaler'?") in typo.stderr
    by_dist = plugrl(sites, "plugins", "list", "--json", site="broken", PLUGRL_DISABLE_PLUGINS="plugrl-cli-broken")
    assert by_dist.returncode == 0 and "matches no plugin" not in by_dist.stderr
    assert not [row for row in json.loads(by_dist.stdout) if row["plugin"] == "clibroken"]

    blocked = plugrl(sites, *DRY_RUN, "--rm-type", "dapo", PLUGRL_DISABLE_PLUGINS="plugrl.plugins.rewards.dapo")
    assert blocked.returncode == 2
    assert "--rm-type: unknown reward 'dapo'." in blocked.stderr
    assert "PLUGRL_DISABLE_PLUGINS blocks plugrl.plugins.rewards.dapo; a blocked plugin may provide it" in blocked.stderr


def test_a_plugin_reusing_a_builtin_name_must_be_selected_explicitly(sites):
    listed = plugrl(sites, "plugins", "list", "--json", "--kind", "reward", site="shadow")
    rows = [row for row in json.loads(listed.stdout) if row["name"] == "deepscaler"]
    assert [(row["origin"], row["status"]) for row in rows] == [
        ("plugrl-cli-shadow 1.2 (entry point 'clishadow')", "duplicate name: select as clishadow:deepscaler"),
        ("plugrl built-in (plugrl.plugins.rewards.deepscaler)", "duplicate name: select as plugrl:deepscaler"),
    ]
    check = plugrl(sites, "plugins", "check", site="shadow")
    assert check.returncode == 1 and "FAIL reward 'deepscaler' is registered by both" in check.stdout

    ambiguous = plugrl(sites, *DRY_RUN, "--rm-type", "deepscaler", site="shadow")
    assert ambiguous.returncode == 2, ambiguous.stderr[-2000:]
    assert ("--rm-type: reward 'deepscaler' is registered by both plugrl built-in (plugrl.plugins.rewards.deepscaler) "
            "and plugrl-cli-shadow 1.2 (entry point 'clishadow'): select one explicitly (--rm-type plugrl:deepscaler "
            "or --rm-type clishadow:deepscaler), or block one with PLUGRL_DISABLE_PLUGINS=clishadow") in ambiguous.stderr
    for choice in ("plugrl:deepscaler", "plugrl-cli-shadow:deepscaler"):
        chosen = plugrl(sites, *DRY_RUN, "--rm-type", choice, site="shadow")
        assert chosen.returncode == 0, chosen.stderr[-2000:]


def test_help_texts_say_what_the_run_requires_and_refuses(sites):
    score = plugrl(sites, "score", "--help")
    assert score.returncode == 0
    assert "required in every row" in score.stdout and "--label-key" in score.stdout
    train = plugrl(sites, "train", "--help")
    assert train.returncode == 0
    assert "§" not in train.stdout
    text = " ".join(train.stdout.split())
    assert "--custom-loss-function-path MODULE.ATTR not implemented: refused" in text
    assert "custom_loss is not implemented: refused" in text


def test_plugins_list_names_a_failed_entry_point_and_shows_hook_only_plugins(sites):
    broken = plugrl(sites, "plugins", "list", site="broken")
    (row,) = [line for line in broken.stdout.splitlines() if "failed:" in line]
    assert row.split()[:2] == ["'clibroken'", "plugrl-cli-broken"]
    listed = plugrl(sites, "plugins", "list", "--json", "--kind", "hooks", site="observer")
    assert listed.returncode == 0, listed.stderr
    assert [(r["name"], r["origin"], r["status"]) for r in json.loads(listed.stdout)] == [
        ("cliobserver", "plugrl-cli-observer 1.2 (entry point 'cliobserver')",
         "ok: plugrl_configure, plugrl_on_rollout_end")]
    assert "[hooks]" in plugrl(sites, "plugins", "list", site="observer").stdout

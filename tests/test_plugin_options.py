"""Plugins own their options: declared dataclasses filled and checked on the driver, --dry-run too."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from plugrl.core import hookimpl
from plugrl.core.config import ConfigError, check_config, parse_config
from plugrl.core.plugin_options import as_kwargs, build_options, option_problems
from plugrl.core.plugins import make_plugin_manager

DRY = ["--dry-run", "--recipe", "tiny-default", "--hf-checkpoint", "/nonexistent"]


@pytest.fixture(scope="module")
def ps():
    return make_plugin_manager(entry_points=False)


def problems(ps, *argv) -> str:
    args = parse_config([*DRY, *argv], ps)
    with pytest.raises(ConfigError) as info:
        check_config(args, ps)
    return str(info.value)


# every bundled reward and filter with options: a misspelled key names the plugin, the key and what is allowed
MISSPELLED = [
    ("deepscaler", "--rm-opt", "timout=3", "timeout"),
    ("math", "--rm-opt", "timout=3", "timeout"),
    ("math_verify", "--rm-opt", "require_boxd=false", "require_boxed"),
    ("dapo", "--rm-opt", "strict_box=true", "strict_box_verify"),
    ("remote_rm", "--rm-opt", "ulr=http://x", "url"),
    ("nonzero_std", "--filter-opt", "reward_kye=acc", "reward_key"),
    ("nonzero_std_with_fallback", "--filter-opt", "reward_kye=acc", "reward_key"),
]


@pytest.mark.parametrize("name,flag,pair,allowed", MISSPELLED)
def test_a_misspelled_option_of_a_bundled_plugin_fails_the_dry_run(ps, name, flag, pair, allowed):
    select = ["--rm-type", name] if flag == "--rm-opt" else ["--dynamic-sampling-filter", name]
    message = problems(ps, *select, flag, pair)
    key = pair.split("=")[0]
    assert f"{flag} {pair.split('=')[0]}=" in message and f"'{name}'" in message
    assert f"no option '{key}'" in message and f"allowed: " in message and allowed in message


def test_pairs_for_a_kind_with_nothing_selected_are_refused(ps):
    """--filter-opt without a filter went nowhere, silently; a --*-path function of the kind may take them."""
    message = problems(ps, "--filter-opt", "spread=1")
    assert "--filter-opt spread=1: no filter is selected, so nothing reads these pairs; select one with " \
           "--dynamic-sampling-filter NAME or drop them" in message
    parse = parse_config([*DRY, "--dynamic-sampling-filter-path", "os:getcwd", "--filter-opt", "spread=1"], ps)
    assert "--filter-opt" not in " ".join(option_problems(parse, [], ps))


def test_wrong_types_and_failed_checks_name_the_plugin_and_key(ps):
    message = problems(ps, "--rm-type", "remote_rm", "--rm-opt", "url=http://h", "--rm-opt", "max_attempts=two")
    assert "option 'max_attempts' of reward 'remote_rm'" in message and "expected an integer" in message
    message = problems(ps, "--rm-type", "remote_rm", "--rm-opt", "url=http://h", "--rm-opt", "max_attempts=0")
    assert "reward 'remote_rm'" in message and "max_attempts' must be >= 1" in message
    assert "needs the reward server's URL" in problems(ps, "--rm-type", "remote_rm")
    assert "option 'timeout' must be seconds or none" in problems(ps, "--rm-opt", "timeout=soon")


def test_options_object_has_defaults_given_pairs_and_owned_flags(ps):
    args = parse_config([*DRY, "--rm-type", "remote_rm", "--rm-url", "http://h:1", "--rm-opt", "timeout=5"], ps)
    options = build_options(ps.entry("reward", "remote_rm"), args)
    assert (options.url, options.timeout, options.max_attempts) == ("http://h:1", 5, 10)
    args = parse_config([*DRY, "--dynamic-sampling-filter", "nonzero_std", "--reward-key", "acc"], ps)
    assert as_kwargs(build_options(ps.entry("filter", "nonzero_std"), args)) == {"reward_key": "acc"}


def test_ppo_needs_a_critic_that_no_bundled_backend_supplies(ps):
    message = problems(ps, "--advantage-estimator", "ppo")
    assert "--advantage-estimator ppo needs critic values" in message and "--train-backend torch" in message


@dataclasses.dataclass
class ToyOptions:
    level: int = dataclasses.field(default=1, metadata={"help": "how strict"})


class ToyPlugin:
    configured = []

    @hookimpl
    def plugrl_register_rewards(self, register):
        register("toy", lambda sample, level=1: 1.0, options=ToyOptions,
                 check_options=lambda o: [] if o.level in (1, 2) else [f"level must be 1 or 2, got {o.level}"])
        register("bare", lambda sample, strict=False: 1.0)  # no options type: its keywords still bound the keys

    @hookimpl
    def plugrl_configure(self, config):
        ToyPlugin.configured.append(config.rm_type)
        if config.rm_opt.get("level") == 2:
            raise ValueError("toy: level 2 is refused by plugrl_configure")


def test_third_party_options_check_and_configure_run_in_the_dry_run():
    ps = make_plugin_manager(entry_points=False, extra_plugins={"toy": ToyPlugin()})
    assert "reward 'toy' (plugin toy): level must be 1 or 2, got 3" in problems(ps, "--rm-type", "toy",
                                                                                   "--rm-opt", "level=3")
    assert "no option 'strict_'" in problems(ps, "--rm-type", "bare", "--rm-opt", "strict_=1")
    # a function's own keywords get the same suggestion as a declared options type's fields
    assert "--rm-opt strikt=1: reward 'bare' (plugin toy) has no option 'strikt'; allowed: strict; did you mean " \
           "'strict'?" in problems(ps, "--rm-type", "bare", "--rm-opt", "strikt=1")
    assert "plugrl_configure of plugin 'toy': toy: level 2 is refused" in problems(ps, "--rm-type", "toy",
                                                                                   "--rm-opt", "level=2")
    assert ToyPlugin.configured == ["toy"]


class BuggyConfigure:
    @hookimpl
    def plugrl_configure(self, config):
        return config.no_such_setting  # a bug in the plugin, not a ValueError


def test_a_configure_hook_that_raises_anything_is_a_problem_naming_its_plugin():
    ps = make_plugin_manager(entry_points=False, extra_plugins={"buggy": BuggyConfigure(), "toy": ToyPlugin()})
    found = problems(ps, "--rm-type", "toy", "--rm-opt", "level=2")
    assert "plugrl_configure of plugin 'toy': toy: level 2 is refused by plugrl_configure" in found
    assert ("plugrl_configure of plugin 'buggy' raised AttributeError: 'Namespace' object has no attribute "
            "'no_such_setting'") in found


def test_cli_dry_run_exits_2_naming_the_option():
    run = subprocess.run([sys.executable, "-m", "plugrl.core.cli", "train", "--dry-run", "--rm-opt", "timout=3"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "reward 'deepscaler'" in run.stderr and "'timout'" in run.stderr



@dataclasses.dataclass
class NoDefaultOptions:
    needed: int  # no default: the guide says every field needs one


class AuthorMistakes:
    @hookimpl
    def plugrl_register_rewards(self, register):
        register("nodefault", lambda sample, needed: 1.0, options=NoDefaultOptions)

    @hookimpl
    def plugrl_register_filters(self, register):
        register("strict_filter", lambda group, spread=0.5: True)  # takes no reward_key


def test_author_mistakes_are_config_problems_not_tracebacks():
    ps = make_plugin_manager(entry_points=False, extra_plugins={"oops": AuthorMistakes()})
    assert ("reward 'nodefault' (plugin oops): option(s) needed have no default and were not given; the plugin must "
            "give every field of its options dataclass a default") in problems(ps, "--rm-type", "nodefault")
    check_config(parse_config([*DRY, "--rm-type", "nodefault", "--rm-opt", "needed=1"], ps), ps)  # given: filled
    found = problems(ps, "--rm-type", "deepscaler", "--dynamic-sampling-filter", "strict_filter",
                     "--reward-key", "score")
    assert ("--reward-key score: filter 'strict_filter' is called with reward_key= when --reward-key is set, but its "
            "function takes no such keyword (nor **kwargs)") in found
    check_config(parse_config([*DRY, "--rm-type", "deepscaler", "--dynamic-sampling-filter", "strict_filter"], ps), ps)

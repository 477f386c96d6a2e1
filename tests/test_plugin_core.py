"""Plugin loading, registries and every hook's calling convention, on fresh plugin managers."""

import argparse
import dataclasses
import subprocess
import sys
import textwrap
import types

import pluggy
import pytest
from plugrl.core.protocols import PlacementRequest

from plugrl.core import hookimpl as core_hookimpl
from plugrl.core.hookspecs import plugrl_configure
from plugrl.core.plugins import BUILTIN_PLUGINS, PluginLoadError, load_plugins, make_plugin_manager, reset_plugins
from plugrl.core.registry import (
    DuplicatePluginError,
    LoadFailure,
    Registry,
    UnavailablePluginError,
    UnknownPluginError,
)
from plugrl.core.testing import (
    check_buffer_policy,
    check_estimator,
    check_filter,
    check_placement,
    check_reward,
)
from plugrl.core.testing import plugin_set  # noqa: F401  (fixture)

PLUGRL_ENV = ("PLUGRL_DISABLE_PLUGINS", "PLUGRL_LOAD_PLUGINS", "PLUGRL_STRICT_PLUGINS", "PLUGRL_TRACE_PLUGINS")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """CI exports PLUGRL_STRICT_PLUGINS=1; each test here sets exactly the controls it is about."""
    for name in PLUGRL_ENV:
        monkeypatch.delenv(name, raising=False)
    reset_plugins()
    yield
    reset_plugins()


def fresh(**extra):
    """Built-ins off, no entry points: only the plugins the test passes."""
    return make_plugin_manager(entry_points=False, builtins=False, extra_plugins=extra)


# ---------------------------------------------------------------------------------------------------
# Registries: duplicate and unknown names
# ---------------------------------------------------------------------------------------------------


class RewardPlugin:
    def __init__(self, *names):
        self.names = names

    @core_hookimpl
    def plugrl_register_rewards(self, register):
        for name in self.names:
            register(name, lambda sample: 0.0)


def test_duplicate_names_name_both_providers():
    plugin_set = fresh(first_plugin=RewardPlugin("shared", "only_first"), second_plugin=RewardPlugin("shared"))
    (message,) = plugin_set.registries.duplicates
    assert message == ("reward 'shared' is registered by both plugin 'first_plugin' and plugin 'second_plugin': "
                       "select one explicitly (--rm-type first_plugin:shared or --rm-type second_plugin:shared), "
                       "or block one with PLUGRL_DISABLE_PLUGINS=second_plugin")
    assert plugin_set.problems == [message]
    registry = plugin_set.registries["reward"]
    # Neither plugin silently wins: the bare name is an error naming both, a qualified name selects one.
    assert "shared" not in registry and "first_plugin:shared" in registry
    with pytest.raises(DuplicatePluginError, match="registered by both plugin 'first_plugin' and plugin 'second_plugin'"):
        plugin_set.get("reward", "shared")
    assert registry.unknown_message("shared") == message
    assert plugin_set.entry("reward", "second_plugin:shared").plugin == "second_plugin"
    assert plugin_set.entry("reward", "only_first").plugin == "first_plugin"
    assert plugin_set.entry("reward", "first_plugin:only_first").plugin == "first_plugin"
    with pytest.raises(UnknownPluginError, match="No plugin 'second_plugin' registers 'only_first' "
                                                 "\\(registered as first_plugin:only_first\\)"):
        plugin_set.get("reward", "second_plugin:only_first")
    # replace=True replaces the same plugin's earlier registration, never another plugin's.
    registry = Registry("reward")
    registry.add("x", 1, plugin="a", builtin=False)
    registry.add("x", 2, plugin="a", builtin=False, replace=True)
    assert registry.get("x") == 2 and not registry.duplicates
    registry.add("x", 3, plugin="b", builtin=False, replace=True)
    assert "x" not in registry and registry.get("b:x") == 3 and registry.get("a:x") == 2
    with pytest.raises(Exception, match="invalid name 'a:b'"):
        registry.add("a:b", 1, plugin="a", builtin=False)


class ShadowingPlugin:
    """A third-party plugin reusing a built-in's name."""

    @core_hookimpl
    def plugrl_register_rewards(self, register):
        register("deepscaler", lambda sample: 1.0)


def test_a_third_party_plugin_cannot_replace_a_builtin():
    plugin_set = make_plugin_manager(entry_points=False, extra_plugins={"shadow": ShadowingPlugin()})
    (problem,) = plugin_set.registries.duplicates
    assert problem.startswith("reward 'deepscaler' is registered by both plugrl built-in "
                              "(plugrl.plugins.rewards.deepscaler) and plugin 'shadow'")
    assert "--rm-type plugrl:deepscaler or --rm-type shadow:deepscaler" in problem
    assert "PLUGRL_DISABLE_PLUGINS=shadow" in problem
    with pytest.raises(DuplicatePluginError, match="plugrl built-in"):
        plugin_set.get("reward", "deepscaler")
    assert plugin_set.get("reward", "plugrl:deepscaler").__module__ == "plugrl.plugins.rewards.deepscaler"
    assert plugin_set.get("reward", "plugrl.plugins.rewards.deepscaler:deepscaler") is \
        plugin_set.get("reward", "plugrl:deepscaler")  # the plugin's own name qualifies too
    assert plugin_set.get("reward", "shadow:deepscaler")(None) == 1.0
    with pytest.raises(PluginLoadError, match="(?s)PLUGRL_STRICT_PLUGINS=1.*'deepscaler' is registered by both"):
        plugin_set.raise_if_strict(strict=True)


def test_unknown_name_lists_choices_suggests_and_mentions_failures():
    failure = LoadFailure("plugrl-math2", "plugrl-math2", "ImportError: no module named sympy2")
    registry = Registry("reward", failures=[failure])
    for name in ("deepscaler", "math", "f1"):
        registry.add(name, object(), plugin="p", builtin=True)
    with pytest.raises(UnknownPluginError) as info:
        registry.get("deepscalr")
    message = str(info.value)
    assert message.startswith("unknown reward 'deepscalr'. Available: deepscaler, f1, math.")
    assert "Did you mean 'deepscaler'?" in message
    assert "plugin 'plugrl-math2' (distribution plugrl-math2) failed to load: ImportError: no module named sympy2" in message
    assert "plugrl plugins list" in message
    assert "Did you mean" not in Registry("reward").unknown_message("zzz")
    assert "Available: (none)." in Registry("reward").unknown_message("zzz")


# ---------------------------------------------------------------------------------------------------
# Failure isolation, strictness, environment controls
# ---------------------------------------------------------------------------------------------------


class MisspelledHook:
    @core_hookimpl
    def plugrl_register_reward(self, register):  # missing the final "s"
        register("never", lambda sample: 0.0)


def test_misspelled_hook_fails_check_pending():
    with pytest.raises(pluggy.PluginValidationError, match="unknown hook 'plugrl_register_reward'"):
        fresh(typo=MisspelledHook())


class RaisingPlugin:
    @core_hookimpl
    def plugrl_register_rewards(self, register):
        raise RuntimeError("boom")


class HalfFailingPlugin:
    """Registers a reward under a built-in's name, then its filter hook raises: none of it may stay."""

    @core_hookimpl
    def plugrl_register_rewards(self, register):
        register("deepscaler", lambda sample: 1.0)
        register("half_reward", lambda sample: 1.0)

    @core_hookimpl
    def plugrl_register_filters(self, register):
        register("half_filter", lambda group, reward_key=None: True)
        raise RuntimeError("needs a package")

    @core_hookimpl
    def plugrl_register_advantage_estimators(self, register):
        register("bad:name", object)  # refused when called, inside the hook: one more failure of this plugin


def test_a_plugin_whose_registration_fails_registers_none_of_its_names():
    plugin_set = make_plugin_manager(entry_points=False, extra_plugins={"half": HalfFailingPlugin()})
    assert sorted(f.error for f in plugin_set.failures if f.plugin == "half") == [
        "plugrl_register_advantage_estimators raised PluginError: plugin 'half' registered a advantage_estimator "
        "with an invalid name 'bad:name' (a non-empty string without ':'); none of its names are registered",
        "plugrl_register_filters raised RuntimeError: needs a package; none of its names are registered"]
    assert "half_reward" not in plugin_set.registries["reward"].names()
    assert "half_filter" not in plugin_set.registries["filter"].names()
    assert plugin_set.entry("reward", "deepscaler").builtin and not plugin_set.registries.duplicates


def test_raising_register_hook_is_recorded_and_isolated():
    plugin_set = make_plugin_manager(entry_points=False, extra_plugins={
        "good": RewardPlugin("good_reward"), "bad": RaisingPlugin(), "also_good": RewardPlugin("other_reward")})
    assert [f.describe() for f in plugin_set.failures if f.plugin == "bad"] == [
        "plugin 'bad' failed to load: plugrl_register_rewards raised RuntimeError: boom; none of its names are "
        "registered"]
    assert {"good_reward", "other_reward"} <= set(plugin_set.registries["reward"].names())
    assert "nonzero_std" in plugin_set.registries["filter"]  # built-ins unaffected
    with pytest.raises(UnknownPluginError, match="plugin 'bad' failed to load: plugrl_register_rewards raised"):
        plugin_set.get("reward", "bad_reward")


def test_disable_blocks_a_builtin_and_an_extra_plugin(monkeypatch):
    monkeypatch.setenv("PLUGRL_DISABLE_PLUGINS", "plugrl.plugins.filters.nonzero_std, blocked_extra")
    plugin_set = make_plugin_manager(entry_points=False, extra_plugins={"blocked_extra": RewardPlugin("hidden")})
    assert "nonzero_std" not in plugin_set.registries["filter"]
    assert "hidden" not in plugin_set.registries["reward"]
    assert "fifo" in plugin_set.registries["buffer_policy"]
    assert "plugrl.plugins.filters.nonzero_std" not in plugin_set.builtin_names
    assert not [f for f in plugin_set.failures if "nonzero_std" in f.plugin]  # blocked is not failed


def test_disable_warns_about_names_that_match_nothing(monkeypatch):
    monkeypatch.setenv("PLUGRL_DISABLE_PLUGINS", "plugrl.plugins.rewards.dapo,plugrl.plugins.rewards.deepscalr,"
                                                 "math,zzz_nothing")
    plugin_set = make_plugin_manager(entry_points=False)
    assert "dapo" not in plugin_set.registries["reward"]  # the one real plugin name is blocked
    assert plugin_set.warnings == [
        "PLUGRL_DISABLE_PLUGINS: 'plugrl.plugins.rewards.deepscalr' matches no plugin (entry point, distribution "
        "or built-in module); did you mean 'plugrl.plugins.rewards.deepscaler'?",
        "PLUGRL_DISABLE_PLUGINS: 'math' matches no plugin (entry point, distribution or built-in module); "
        "'math' is a reward name: block its plugin 'plugrl.plugins.rewards.math_answer'",
        "PLUGRL_DISABLE_PLUGINS: 'zzz_nothing' matches no plugin (entry point, distribution or built-in module)",
    ]
    assert not plugin_set.problems  # a warning, not a load problem


def test_unknown_name_says_a_blocked_plugin_may_provide_it(monkeypatch):
    monkeypatch.setenv("PLUGRL_DISABLE_PLUGINS", "plugrl.plugins.rewards.dapo")
    plugin_set = make_plugin_manager(entry_points=False)
    with pytest.raises(UnknownPluginError, match="PLUGRL_DISABLE_PLUGINS blocks plugrl.plugins.rewards.dapo; "
                                                 "a blocked plugin may provide it"):
        plugin_set.get("reward", "dapo")
    assert "blocks" not in make_plugin_manager(entry_points=False, builtins=False).registries["reward"].unknown_message("x")


def test_strict_mode_raises(monkeypatch):
    plugin_set = fresh(bad=RaisingPlugin())
    plugin_set.raise_if_strict()  # not strict by default: reported, not fatal
    monkeypatch.setenv("PLUGRL_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match="(?s)PLUGRL_STRICT_PLUGINS=1.*plugin 'bad' failed to load"):
        plugin_set.raise_if_strict()
    plugin_set.raise_if_strict(strict=False)
    monkeypatch.setenv("PLUGRL_STRICT_PLUGINS", "0")
    plugin_set.raise_if_strict()
    with pytest.raises(PluginLoadError):
        plugin_set.raise_if_strict(strict=True)
    with pytest.raises(PluginLoadError, match="registered by both"):
        fresh(a=RewardPlugin("x"), b=RewardPlugin("x")).raise_if_strict(strict=True)


def test_load_plugins_is_idempotent():
    first = load_plugins(strict=False)
    assert load_plugins(strict=False) is first
    assert "fifo" in first.registries["buffer_policy"]
    reset_plugins()
    assert load_plugins(strict=False) is not first


def test_lazy_backends_report_unavailable_megatron(plugin_set, monkeypatch):
    # Simulate a laptop without megatron-core (dev/CI installs it for tests/test_megatron_*.py):
    # a None entry in sys.modules makes find_spec("megatron.core") raise ImportError.
    monkeypatch.setitem(sys.modules, "megatron", None)
    monkeypatch.setitem(sys.modules, "megatron.core", None)  # in case an earlier test imported it
    entry = plugin_set.entry("train_backend", "megatron")
    assert isinstance(entry.obj, str) and ":" in entry.obj  # nothing imported at registration
    assert entry.status.startswith("unavailable: megatron.core not importable")
    assert "pip install plugrl[megatron]" in entry.status
    with pytest.raises(UnavailablePluginError, match="train_backend 'megatron' needs megatron.core"):
        entry.load()
    with pytest.raises(UnavailablePluginError):
        plugin_set.get("train_backend", "megatron")


def test_public_hookimpl_marker():
    from plugrl import hookimpl

    assert hookimpl is core_hookimpl
    plugin = types.SimpleNamespace()

    @hookimpl
    def plugrl_register_filters(register):
        register("always", lambda group, **options: True)

    plugin.plugrl_register_filters = plugrl_register_filters
    plugin_set = fresh(public=plugin)
    assert plugin_set.entry("filter", "always").plugin == "public"
    check_filter(plugin_set.get("filter", "always"))


def test_builtin_modules_import_no_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom plugrl.core.plugins import make_plugin_manager\n"
            "make_plugin_manager(entry_points=False)\n"
            "heavy = sorted(m for m in ('torch', 'ray', 'megatron', 'sglang', 'transformers') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------------
# Entry points, discovered without pip: a module plus a .dist-info folder on sys.path
# ---------------------------------------------------------------------------------------------------

PLUGIN_SOURCE = '''
from plugrl import hookimpl

@hookimpl
def plugrl_register_rewards(register):
    register("{reward}", lambda sample: 1.0)
'''


def write_dist(root, dist, ep_name, module, source=None, reward=None, version="0.1"):
    """An installed distribution as importlib.metadata sees it."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(source or PLUGIN_SOURCE.format(reward=reward or f"{module}_r")))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[plugrl]\n{ep_name} = {module}\n")


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    """A folder on sys.path; modules get names unique to the test (sys.modules outlives it)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    tag = "".join(c if c.isalnum() else "_" for c in tmp_path.name)
    return types.SimpleNamespace(path=tmp_path, tag=tag)


def test_entry_point_discovery(fake_site):
    module = f"plugrl_fake_{fake_site.tag}"
    write_dist(fake_site.path, "plugrl-fake", "fake", module, reward="fake_reward")
    plugin_set = make_plugin_manager(builtins=False)
    entry = plugin_set.entry("reward", "fake_reward")
    assert (entry.plugin, entry.builtin) == ("fake", False)
    assert plugin_set.distributions["fake"] == "plugrl-fake"
    assert plugin_set.get("reward", "fake_reward")(None) == 1.0
    check_reward("fake_reward")  # by name, through the entry point
    assert "fake_reward" not in make_plugin_manager(entry_points=False, builtins=False).registries["reward"]


def test_broken_entry_point_is_reported_not_fatal(fake_site):
    good, bad = f"plugrl_good_{fake_site.tag}", f"plugrl_bad_{fake_site.tag}"
    write_dist(fake_site.path, "plugrl-good", "good", good, reward="good_reward")
    write_dist(fake_site.path, "plugrl-bad", "bad", bad, source="raise ImportError('needs sympy2')\n")
    plugin_set = make_plugin_manager()
    assert "good_reward" in plugin_set.registries["reward"] and "deepscaler" in plugin_set.registries["reward"]
    (failure,) = [f for f in plugin_set.failures if f.plugin == "bad"]
    assert failure.distribution == "plugrl-bad" and failure.error == "ImportError: needs sympy2"
    with pytest.raises(UnknownPluginError, match="plugin 'bad' \\(distribution plugrl-bad\\) failed to load"):
        plugin_set.get("reward", "bad_reward")


def test_strict_load_plugins_raises_on_broken_entry_point(fake_site, monkeypatch):
    write_dist(fake_site.path, "plugrl-bad", "bad", f"plugrl_bad_{fake_site.tag}", source="raise ImportError('x')\n")
    monkeypatch.setenv("PLUGRL_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match="plugin 'bad' \\(distribution plugrl-bad\\) failed to load"):
        load_plugins()
    monkeypatch.setenv("PLUGRL_DISABLE_PLUGINS", "bad")
    reset_plugins()
    assert "bad" not in [f.plugin for f in load_plugins().failures]


def test_entry_point_origin_duplicates_and_blocking_by_distribution(fake_site, monkeypatch):
    module = f"plugrl_shadow_{fake_site.tag}"
    write_dist(fake_site.path, "plugrl-shadow", "shadow", module, reward="deepscaler", version="2.3")
    plugin_set = make_plugin_manager()
    third_party = plugin_set.entry("reward", "shadow:deepscaler")
    assert third_party.origin == "plugrl-shadow 2.3 (entry point 'shadow')"
    assert plugin_set.entry("reward", "plugrl-shadow:deepscaler") is third_party  # the distribution name too
    (problem,) = plugin_set.registries.duplicates
    assert problem == ("reward 'deepscaler' is registered by both plugrl built-in (plugrl.plugins.rewards.deepscaler) "
                       "and plugrl-shadow 2.3 (entry point 'shadow'): select one explicitly "
                       "(--rm-type plugrl:deepscaler or --rm-type shadow:deepscaler), "
                       "or block one with PLUGRL_DISABLE_PLUGINS=shadow")
    monkeypatch.setenv("PLUGRL_DISABLE_PLUGINS", "plugrl_shadow")  # a distribution name, PEP 503-normalised
    blocked = make_plugin_manager()
    assert not blocked.problems and not blocked.warnings
    assert blocked.entry("reward", "deepscaler").builtin
    assert blocked.registries.blocked == ["shadow (plugrl-shadow)"]


def test_load_plugins_allow_list(fake_site, monkeypatch):
    one, two = f"plugrl_one_{fake_site.tag}", f"plugrl_two_{fake_site.tag}"
    write_dist(fake_site.path, "plugrl-one", "one", one, reward="one_reward")
    write_dist(fake_site.path, "plugrl-two", "two", two, reward="two_reward")

    def rewards(allow):
        monkeypatch.setenv("PLUGRL_LOAD_PLUGINS", allow)
        return set(make_plugin_manager(builtins=False).registries["reward"].names())

    assert rewards("plugrl-one") == {"one_reward"}  # a distribution name
    assert rewards("two") == {"two_reward"}  # an entry-point name
    assert rewards("plugrl-one, two") == {"one_reward", "two_reward"}
    assert rewards("") == set()  # empty: no third-party plugins at all
    monkeypatch.delenv("PLUGRL_LOAD_PLUGINS")
    assert {"one_reward", "two_reward"} <= set(make_plugin_manager(builtins=False).registries["reward"].names())


def test_load_plugins_allow_list_warns_about_a_name_that_matches_nothing(fake_site, monkeypatch):
    write_dist(fake_site.path, "plugrl-one", "one", f"plugrl_one_{fake_site.tag}", reward="one_reward")
    monkeypatch.setenv("PLUGRL_LOAD_PLUGINS", "plugrl_one, onee")  # a normalised distribution name, a typo
    plugin_set = make_plugin_manager(builtins=False)
    assert set(plugin_set.registries["reward"].names()) == {"one_reward"}
    assert plugin_set.warnings == ["PLUGRL_LOAD_PLUGINS: 'onee' matches no installed plugin (entry-point or "
                                   "distribution name; `plugrl plugins list` shows them); did you mean 'one'?"]


MISSPELLED_HOOK_SOURCE = '''
from plugrl import hookimpl

@hookimpl
def plugrl_on_rollout_ends(rollout_id, metrics):
    return {}
'''


def test_a_misspelled_hook_in_an_entry_point_fails_that_plugin_only(fake_site):
    write_dist(fake_site.path, "plugrl-typo", "typo", f"plugrl_typo_{fake_site.tag}", source=MISSPELLED_HOOK_SOURCE)
    write_dist(fake_site.path, "plugrl-good", "good", f"plugrl_good_{fake_site.tag}", reward="good_reward")
    plugin_set = make_plugin_manager()
    assert [f.describe() for f in plugin_set.failures] == [
        "plugin 'typo' (distribution plugrl-typo) failed to load: unknown hook(s) plugrl_on_rollout_ends (misspelled?)"]
    assert "good_reward" in plugin_set.registries["reward"] and "deepscaler" in plugin_set.registries["reward"]


def test_entry_point_name_collision_between_distributions(fake_site):
    write_dist(fake_site.path / "a", "plugrl-alpha", "same", f"plugrl_alpha_{fake_site.tag}", reward="alpha_reward")
    write_dist(fake_site.path / "b", "plugrl-beta", "same", f"plugrl_beta_{fake_site.tag}", reward="beta_reward")
    import sys

    sys.path[:0] = [str(fake_site.path / "a"), str(fake_site.path / "b")]
    try:
        plugin_set = make_plugin_manager(builtins=False)
    finally:
        del sys.path[:2]
    loaded = {"alpha_reward", "beta_reward"} & set(plugin_set.registries["reward"].names())
    assert len(loaded) == 1
    winner = "plugrl-alpha" if loaded == {"alpha_reward"} else "plugrl-beta"
    loser = "plugrl-beta" if winner == "plugrl-alpha" else "plugrl-alpha"
    (failure,) = [f for f in plugin_set.failures if f.plugin == "same"]
    assert failure.distribution == loser
    assert failure.error == f"entry-point name also used by distribution '{winner}'"
    assert plugin_set.problems  # `plugrl plugins check` fails on it


# ---------------------------------------------------------------------------------------------------
# Every hook's calling convention
# ---------------------------------------------------------------------------------------------------


class EveryKind:
    """One name of every registered kind, through the register_* hooks."""

    @core_hookimpl
    def plugrl_register_rewards(self, register):
        register("k_reward", lambda sample: 0.5, batched=False)

    @core_hookimpl
    def plugrl_register_advantage_estimators(self, register):
        from plugrl.plugins.estimators.grpo import GRPOEstimator

        register("k_estimator", GRPOEstimator)

    @core_hookimpl
    def plugrl_register_filters(self, register):
        register("k_filter", lambda group, **options: True)

    @core_hookimpl
    def plugrl_register_buffer_policies(self, register):
        from plugrl.plugins.filters.fifo import FifoBuffer

        register("k_buffer", FifoBuffer)

    @core_hookimpl
    def plugrl_register_placements(self, register):
        from plugrl.plugins.backends.placement import colocate

        register("k_placement", colocate)

    @core_hookimpl
    def plugrl_register_train_backends(self, register):
        register("k_train", "plugrl.plugins.filters.fifo:FifoBuffer", requires=("json",))

    @core_hookimpl
    def plugrl_register_rollout_backends(self, register):
        register("k_rollout", "plugrl.plugins.filters.fifo:FifoBuffer", requires=("plugrl_no_such_module",))

    @core_hookimpl
    def plugrl_register_reward_post_processors(self, register):
        register("k_post", lambda samples, args: None)


def test_register_hooks_fill_one_registry_each():
    plugin_set = fresh(every=EveryKind())
    names = {e.kind: e.name for e in plugin_set.registries.all_entries()}
    assert names == {"reward": "k_reward", "advantage_estimator": "k_estimator", "filter": "k_filter",
                     "buffer_policy": "k_buffer", "placement": "k_placement", "train_backend": "k_train",
                     "rollout_backend": "k_rollout", "reward_post_processor": "k_post"}
    assert all(e.plugin == "every" and not e.builtin for e in plugin_set.registries.all_entries())
    assert plugin_set.entry("reward", "k_reward").metadata == {"batched": False}
    from plugrl.plugins.filters.fifo import FifoBuffer

    assert plugin_set.get("train_backend", "k_train") is FifoBuffer  # lazy "module:attr" imported on get
    assert plugin_set.entry("rollout_backend", "k_rollout").status == (
        "unavailable: plugrl_no_such_module not importable (pip install plugrl_no_such_module)")


class OptionsPlugin:
    @core_hookimpl
    def plugrl_add_options(self, parser):
        group = parser.add_argument_group("myplug", "options of the myplug plugin")
        group.add_argument("--myplug-temperature", type=float, default=1.0)


def test_add_options_adds_a_prefixed_group():
    plugin_set = fresh(myplug=OptionsPlugin())
    parser = argparse.ArgumentParser()
    assert plugin_set.pm.hook.plugrl_add_options(parser=parser) == []
    assert parser.parse_args(["--myplug-temperature", "0.7"]).myplug_temperature == 0.7
    assert "myplug" in [g.title for g in parser._action_groups]


class ConfigRecorder:
    def __init__(self):
        self.seen = []

    @core_hookimpl
    def plugrl_configure(self, config):
        self.seen.append(config)


def test_configure_is_historic():
    assert plugrl_configure.plugrl_spec["historic"] is True
    early = ConfigRecorder()
    plugin_set = fresh(early=early)
    config = types.SimpleNamespace(rm_type="deepscaler")
    plugin_set.pm.hook.plugrl_configure.call_historic(kwargs={"config": config})
    late = ConfigRecorder()
    plugin_set.pm.register(late, name="late")  # registered after the call: still configured
    assert early.seen == [config] and late.seen == [config]


class Observer:
    def __init__(self, prefix, answer=True):
        self.prefix, self.answer = prefix, answer

    def _metrics(self, rollout_id, metrics):
        return {f"{self.prefix}/double": 2 * metrics["loss"], f"{self.prefix}/id": rollout_id} if self.answer else None

    @core_hookimpl
    def plugrl_on_rollout_end(self, rollout_id, metrics):
        return self._metrics(rollout_id, metrics)

    @core_hookimpl
    def plugrl_on_train_step_end(self, rollout_id, metrics):
        return self._metrics(rollout_id, metrics)

    @core_hookimpl
    def plugrl_on_eval_end(self, rollout_id, metrics):
        return self._metrics(rollout_id, metrics)


@pytest.mark.parametrize("hook", ["plugrl_on_rollout_end", "plugrl_on_train_step_end", "plugrl_on_eval_end"])
def test_observer_hooks_collect_metric_dicts(hook):
    plugin_set = fresh(a=Observer("a"), quiet=Observer("q", answer=False), b=Observer("b"))
    results = getattr(plugin_set.pm.hook, hook)(rollout_id=3, metrics={"loss": 0.25})
    merged = {k: v for result in results for k, v in result.items()}  # pluggy drops the None answers
    assert merged == {"a/double": 0.5, "a/id": 3, "b/double": 0.5, "b/id": 3}


class BadObserver:
    def __init__(self, answer):
        self.answer = answer

    @core_hookimpl
    def plugrl_on_train_step_end(self, metrics):  # takes only one of the hook's arguments, as pluggy allows
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_observe_merges_new_numbers_and_warns_about_everything_else(capsys):
    from plugrl.core.observers import observe

    plugin_set = fresh(good=Observer("g"), raising=BadObserver(RuntimeError("wandb is down")), floaty=BadObserver(1.5),
                       clash=BadObserver({"loss": -999, "c/text": "hi", "c/ok": 7}))
    metrics = {"loss": 0.25}
    observe(plugin_set.pm.hook.plugrl_on_train_step_end, 4, metrics)
    assert metrics == {"loss": 0.25, "g/double": 0.5, "g/id": 4, "c/ok": 7}  # core's loss kept
    where = "plugrl train: warning: plugin '{}' plugrl_on_train_step_end (rollout 4)"
    assert capsys.readouterr().err.splitlines() == [
        # pluggy's order: the plugin registered last is called first
        f"{where.format('clash')} returned 'loss', which the step's metrics already hold; kept the existing value "
        "(name your metrics '<yourplugin>/<name>')",
        f"{where.format('clash')} returned 'c/text': 'hi' is not a number; left out",
        f"{where.format('floaty')} returned a float; an observer returns a dict of metrics or None",
        f"{where.format('raising')} raised RuntimeError: wandb is down; its metrics are left out of this line"]


class Bridge:
    def __init__(self, arch, answer):
        self.arch, self.answer = arch, answer

    @core_hookimpl
    def plugrl_model_bridge(self, hf_config):
        return self.answer if hf_config.architectures == [self.arch] else None


def test_model_bridge_first_non_none_wins():
    plugin_set = fresh(qwen=Bridge("Qwen3ForCausalLM", "qwen-bridge"), llama=Bridge("LlamaForCausalLM", "llama-bridge"))
    hook = plugin_set.pm.hook.plugrl_model_bridge
    assert hook(hf_config=types.SimpleNamespace(architectures=["Qwen3ForCausalLM"])) == "qwen-bridge"
    assert hook(hf_config=types.SimpleNamespace(architectures=["LlamaForCausalLM"])) == "llama-bridge"
    assert hook(hf_config=types.SimpleNamespace(architectures=["GPT2LMHeadModel"])) is None
    plugin_set.pm.register(Bridge("Qwen3ForCausalLM", "newer-qwen-bridge"), name="newer")
    # firstresult: the most recently registered plugin is asked first and its answer ends the call.
    assert hook(hf_config=types.SimpleNamespace(architectures=["Qwen3ForCausalLM"])) == "newer-qwen-bridge"


# ---------------------------------------------------------------------------------------------------
# Built-ins pass the conformance kit (plugrl.core.testing)
# ---------------------------------------------------------------------------------------------------

_BUILTINS = make_plugin_manager(entry_points=False)
# Estimators that refuse to run without a flag get the config they ask for.
ESTIMATOR_ARGS = {
    "reinforce_plus_plus": types.SimpleNamespace(normalize_advantages=True, n_samples_per_prompt=4),
    "reinforce_plus_plus_baseline": types.SimpleNamespace(normalize_advantages=True, n_samples_per_prompt=4),
}
# Rewards that call a server are exercised by their own tests against a loopback server.
NETWORK_REWARDS = {"remote_rm"}


def _builtin(kind):
    return [e.name for e in _BUILTINS.registries[kind] if e.builtin]


def test_every_builtin_module_loads():
    builtins = make_plugin_manager(entry_points=False)
    assert not builtins.problems, builtins.problems
    assert builtins.builtin_names == set(BUILTIN_PLUGINS)


@pytest.mark.parametrize("name", sorted(set(_builtin("reward")) - NETWORK_REWARDS))
def test_builtin_reward_conforms(name):
    rewards = check_reward(name)
    assert len(rewards) == 5


@pytest.mark.parametrize("name", _builtin("advantage_estimator"))
def test_builtin_estimator_conforms(name):
    check_estimator(name, args=ESTIMATOR_ARGS.get(name))


@pytest.mark.parametrize("name", _builtin("filter"))
def test_builtin_filter_conforms(name):
    check_filter(name)


@pytest.mark.parametrize("name", _builtin("buffer_policy"))
def test_builtin_buffer_policy_conforms(name):
    check_buffer_policy(name)


@pytest.mark.parametrize("name", _builtin("placement"))
def test_builtin_placement_conforms(name):
    check_placement(name)


def test_conformance_failures_name_the_plugin_and_the_rule():
    with pytest.raises(AssertionError, match="reward 'half': sample 0 .* returned str"):
        check_reward(_named("half", lambda sample: "0.5"))
    with pytest.raises(AssertionError, match="filter 'mutating': group 0: the filter modified the group"):
        check_filter(_named("mutating", lambda group, **o: group.pop() is None))
    with pytest.raises(AssertionError, match="filter 'noisy': group 0: not deterministic"):
        check_filter(_named("noisy", _flipper()))

    class Leaky:
        name = "leaky"

        def __init__(self, n_samples_per_prompt=None):
            self.groups = []

        def add(self, groups):
            if any(len(g) != 2 for g in groups):
                raise ValueError("size")
            self.groups += groups

        def take(self, n, rollout_id=None):
            return self.groups[:n]  # forgets to remove them

        def __len__(self):
            return len(self.groups)

        def state_dict(self):
            return {"groups": self.groups}  # Samples are not JSON

        def load_state_dict(self, state):
            self.groups = state["groups"]

    with pytest.raises(AssertionError, match="buffer_policy 'leaky': len\\(\\) is 5 after taking 2 of 5 groups"):
        check_buffer_policy(Leaky)

    def overlapping(request):
        from plugrl.plugins.backends.placement import colocate

        plan = colocate(request)
        return type(plan)(**{**plan.__dict__, "colocated": False})

    with pytest.raises(AssertionError, match="not colocated, yet bundles"):
        check_placement(overlapping)

    def no_engines_when_unset(request):  # as an author who reads rollout_num_gpus as 0 when it is None
        from plugrl.plugins.backends.placement import decoupled

        if request.rollout_num_gpus is None:
            return type(decoupled(PlacementRequest(1, 2, 2)))(2, (0, 1), 0, (), (), False)
        return decoupled(request)

    with pytest.raises(AssertionError, match="rollout_bundles is empty \\(--rollout-num-gpus is unset"):
        check_placement(no_engines_when_unset)

    class NoName:
        pass

    with pytest.raises(AssertionError, match="needs a non-empty class attribute `name`"):
        check_estimator(NoName)


def _named(name, fn):
    fn.__qualname__ = name
    return fn


def _flipper():
    state = {"calls": 0}

    def noisy(group, **options):
        state["calls"] += 1
        return state["calls"] % 2 == 1

    return _named("noisy", noisy)


# ---------------------------------------------------------------------------------------------------
# The kit calls rewards and filters with their options the way core does
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ScaleOptions:
    scale: float = 2.0


class OptionedPlugin:
    """A reward that declares ``scale`` but forgot to accept it, and one that takes it."""

    @core_hookimpl
    def plugrl_register_rewards(self, register):
        register("forgetful", lambda sample: 1.0, options=ScaleOptions)
        register("scaled", lambda sample, scale: scale, options=ScaleOptions)

    @core_hookimpl
    def plugrl_register_filters(self, register):
        register("spread_at_least", lambda group, spread=0.5, reward_key=None: max(s.reward for s in group) - min(
            s.reward for s in group) >= spread)
        register("no_reward_key", lambda group, spread=0.5: True)


def test_check_reward_passes_declared_options_as_core_does(monkeypatch):
    import plugrl.core.plugins as plugins_module

    plugin_set = make_plugin_manager(entry_points=False, builtins=False, extra_plugins={"opt": OptionedPlugin()})
    monkeypatch.setattr(plugins_module, "make_plugin_manager", lambda **kw: plugin_set)
    # Core passes every declared field (defaults too): a reward that cannot take them fails here.
    with pytest.raises(AssertionError, match="reward 'forgetful' \\(plugin opt\\): raised TypeError: .*'scale'"):
        check_reward("forgetful")
    assert check_reward("scaled") == [2.0] * 5
    assert check_reward("scaled", options={"scale": 0.5}) == [0.5] * 5
    with pytest.raises(AssertionError, match="refused as core would refuse them: .*has no option 'scael'; "
                                             "allowed: scale; did you mean 'scale'"):
        check_reward("scaled", options={"scael": 1})
    with pytest.raises(AssertionError, match="option 'scale' of .*expected a number"):
        check_reward("scaled", options={"scale": "big"})
    # No options type: keys are checked against the function's keywords.
    assert [d.keep for d in check_filter("spread_at_least", options={"spread": 0.3})] == [True, False, False, True]
    with pytest.raises(AssertionError, match="has no option 'sprad'; allowed: spread"):
        check_filter("spread_at_least", options={"sprad": 0.3})
    with pytest.raises(AssertionError, match="filter 'no_reward_key' \\(plugin opt\\): takes no reward_key keyword"):
        check_filter("no_reward_key")
    # A bare function with its options type given directly.
    with pytest.raises(AssertionError, match="raised TypeError"):
        check_reward(_named("bare", lambda sample: 1.0), options_type=ScaleOptions)


def test_the_plugrl_package_exports_what_plugin_authors_need():
    code = ("import sys, plugrl; from plugrl.core import protocols, hookspecs;"
            "assert plugrl.AdvantageEstimator is protocols.AdvantageEstimator;"
            "assert plugrl.AdvantageInputs is protocols.AdvantageInputs;"
            "assert plugrl.Register is hookspecs.Register;"
            "assert {'BufferPolicy', 'PlacementPlan', 'PlacementRequest', 'TrainBackend', 'RolloutEngine',"
            "        'FilterDecision', 'Sample', 'hookimpl'} <= set(plugrl.__all__);"
            "assert 'torch' not in sys.modules, 'import plugrl must stay light'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_install_hint_names_the_distribution_that_owns_the_extra():
    from plugrl.core.registry import Entry

    def entry(**kw):
        return Entry("train_backend", "t", "m:a", "ep", metadata={"extra": "gpu"}, **kw)

    assert entry(builtin=True).install_hint(["x"]) == "pip install plugrl[gpu]"
    assert entry(builtin=False, distribution="plugrl-thing").install_hint(["x"]) == "pip install plugrl-thing[gpu]"
    assert entry(builtin=False).install_hint(["x", "y"]) == "pip install x y"  # not installed from a distribution


class MisspelledKeywords:
    @core_hookimpl
    def plugrl_register_rewards(self, register):
        register("typo_opts", lambda sample, keyword=1: 0.0, option=dict, batch=True)
        register("fine", lambda samples: [0.0], batched=True, description="ok")

    @core_hookimpl
    def plugrl_register_rollout_backends(self, register):
        register("typo_backend", "plugrl.plugins.filters.fifo:FifoBuffer", engine_pol="external", zzz=1)


def test_a_register_keyword_plugrl_does_not_read_is_warned_about():
    plugin_set = fresh(kw=MisspelledKeywords())
    assert plugin_set.warnings == [
        "plugin 'kw' registered reward 'typo_opts' with keyword 'option', which plugrl does not read; "
        "did you mean 'options'?",
        "plugin 'kw' registered reward 'typo_opts' with keyword 'batch', which plugrl does not read; "
        "did you mean 'batched'?",
        "plugin 'kw' registered rollout backend 'typo_backend' with keyword 'engine_pol', which plugrl does not "
        "read; did you mean 'engine_pool'?",
        "plugin 'kw' registered rollout backend 'typo_backend' with keyword 'zzz', which plugrl does not read; "
        "a rollout backend may declare: options, check_options, requires, extra, description, commands, check, "
        "machine_check, engine_pool, external_engines, drops_released_weights"]
    assert "typo_opts" in plugin_set.registries["reward"]  # still registered: a warning, not a load failure


def test_every_builtin_registers_with_keywords_plugrl_reads():
    assert make_plugin_manager(entry_points=False).warnings == []

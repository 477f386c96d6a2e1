"""The example plugin passes plugrl's conformance checks, found by name through its entry point."""

import types

import pytest

from plugrl.core.testing import check_estimator, check_filter, check_reward, fake_samples
from plugrl_example_plugin import min_reward_spread


def test_contains_42_by_name():
    assert check_reward("contains_42") == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_mean_baseline_by_name():
    check_estimator("mean_baseline")


def test_mean_baseline_options():
    # --adv-opt pairs arrive in the run config's adv_opt, as `plugrl train` parses them
    check_estimator("mean_baseline", args=types.SimpleNamespace(adv_opt={"scale": 2.0}))
    with pytest.raises(AssertionError, match="option 'scale' must be > 0, got 0"):
        check_estimator("mean_baseline", args=types.SimpleNamespace(adv_opt={"scale": 0}))
    with pytest.raises(AssertionError, match="has no option 'scael'; allowed: scale"):
        check_estimator("mean_baseline", args=types.SimpleNamespace(adv_opt={"scael": 2.0}))


def test_min_reward_spread_by_name():
    decisions = check_filter("min_reward_spread")
    assert [d.keep for d in decisions] == [True, False, False, True]


@pytest.mark.parametrize("spread, keep", [(0.5, False), (0.3, True)])
def test_spread_option(spread, keep):
    group = fake_samples(rewards=[0.1, 0.3, 0.45])
    assert check_filter(min_reward_spread, groups=[group], options={"spread": spread})[0].keep is keep


def test_spread_option_is_checked():
    with pytest.raises(AssertionError, match="option 'spread' must be >= 0"):
        check_filter("min_reward_spread", options={"spread": -1})
    with pytest.raises(AssertionError, match="has no option 'sprad'; allowed: spread"):
        check_filter("min_reward_spread", options={"sprad": 0.3})


def test_fixtures(plugin_set, make_samples):
    assert "nonzero_std" in plugin_set.registries["filter"]
    assert len(make_samples(3)) == 3

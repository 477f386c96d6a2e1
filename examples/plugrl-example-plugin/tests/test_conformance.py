"""The example plugin passes plugrl's conformance checks, found by name through its entry point."""

import pytest

from plugrl.core.testing import check_estimator, check_filter, check_reward, fake_samples
from plugrl_example_plugin import min_reward_spread


def test_contains_42_by_name():
    assert check_reward("contains_42") == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_mean_baseline_by_name():
    check_estimator("mean_baseline")


def test_min_reward_spread_by_name():
    decisions = check_filter("min_reward_spread")
    assert [d.keep for d in decisions] == [True, False, False, True]


@pytest.mark.parametrize("spread, keep", [(0.5, False), (0.3, True)])
def test_spread_option(spread, keep):
    group = fake_samples(rewards=[0.1, 0.3, 0.45])
    assert check_filter(min_reward_spread, groups=[group], options={"spread": spread})[0].keep is keep


def test_fixtures(plugin_set, make_samples):
    assert "nonzero_std" in plugin_set.registries["filter"]
    assert len(make_samples(3)) == 3

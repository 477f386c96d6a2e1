"""Fixtures shared by several test files."""

import pytest


@pytest.fixture
def tiny_config_problems():
    """``problems(argv)``: the driver's config check of the tiny default run with ``argv`` added, as
    one string ("" when it passes)."""
    from plugrl.core.config import ConfigError, check_config, parse_config
    from plugrl.core.plugins import load_plugins

    plugin_set = load_plugins()

    def problems(argv: list[str]) -> str:
        args = parse_config(["--recipe", "tiny-default", *argv], plugin_set)
        try:
            check_config(args, plugin_set)
        except ConfigError as exc:
            return str(exc)
        return ""

    return problems


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The embedded default's tiny Qwen3-architecture checkpoint, built once per test module."""
    from plugrl.plugins.backends.tiny_default import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def no_ray_started():
    """For driver-side checks: the test must not have started Ray (they run before any actor)."""
    yield
    import sys

    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized(), "a check started Ray"

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

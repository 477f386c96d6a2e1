"""Traits the bundled backends declare, read through the registry the way core reads them on the
driver (core/loop.py starts engines by ``engine_pool``: a GPU-only code path, so CPU tests check it here)."""

from types import SimpleNamespace

import pytest

from plugrl.core.plugin_traits import engine_pool, entry_trait
from plugrl.core.plugins import load_plugins


def test_hf_engines_are_started_as_actors():
    # "actors" is a plain value, not an import path: reading it must not try to import it
    assert engine_pool(SimpleNamespace(rollout_backend="hf")) == "actors"


def test_sglang_engine_pool_is_a_callable_trait_resolved_from_the_config():
    args = SimpleNamespace(rollout_backend="sglang", sglang_router_ip=None, sglang_router_port=None,
                           rollout_external_engine_addrs=None)
    assert engine_pool(args) in ("actors", "processes", "external")


def test_callable_traits_given_as_import_paths_are_imported():
    entry = load_plugins().entry("rollout_backend", "sglang")
    assert callable(entry_trait(entry, "engine_pool"))


def test_an_undeclared_pool_value_is_refused():
    class Entry:
        metadata = {"engine_pool": "threads"}

    plugin_set = SimpleNamespace(entry=lambda kind, name: Entry())
    with pytest.raises(ValueError, match="engine_pool 'threads'"):
        engine_pool(SimpleNamespace(rollout_backend="x"), plugin_set)

"""Pins the SGLang names plugrl uses (endpoints, request fields, launch flags) to the list verified in
sgl-project/sglang's source (``plugins/backends/sglang/sglang_names.json``, with commits), and the
router flags to the installed ``sglang_router``'s own parser."""

from __future__ import annotations

import argparse
import ast
import base64
import io
import json
import re
from pathlib import Path

import pytest
from plugrl.plugins.backends.sglang import launch

PKG = Path(launch.__file__).parent
NAMES = json.loads((PKG / "sglang_names.json").read_text())
ENDPOINTS = set(NAMES["endpoints"]["POST"]) | set(NAMES["endpoints"]["GET"])
REQUEST_FIELDS = {f for fields in NAMES["requests"].values() for f in fields}
ROUTER_PATHS = {"/workers"}  # sglang_router's worker API (exercised in test_sglang_backend.py)


def _tree(name):
    return ast.parse((PKG / name).read_text())


def _paths(tree):
    return {n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith("/")
            and " " not in n.value and len(n.value) > 1}


def _payload_dicts(tree):
    """Dict literals sent to a server: ``json=`` arguments, values bound to ``payload``, and dicts passed
    to ``_post``/``_all_ok``/``_each`` helpers."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            found += [k.value for k in node.keywords if k.arg == "json" and isinstance(k.value, ast.Dict)]
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            if name in {"_post", "_all_ok", "_each", "submit"}:
                found += [a for a in node.args if isinstance(a, ast.Dict)]
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and any(
                getattr(t, "id", None) == "payload" for t in node.targets):
            found.append(node.value)
    return found


def _keys(d):
    return {k.value for k in d.keys if isinstance(k, ast.Constant)}


@pytest.mark.parametrize("module", ["engine.py", "weights.py"])
def test_client_uses_only_verified_endpoints_and_fields(module):
    tree = _tree(module)
    assert _paths(tree) <= ENDPOINTS | ROUTER_PATHS
    dicts = _payload_dicts(tree)
    assert dicts, "found no payloads: the scan is broken"
    for d in dicts:
        keys = _keys(d)
        if "url" in keys:  # router registration body
            assert keys <= {"url", "worker_type"}
            continue
        assert keys <= REQUEST_FIELDS, sorted(keys - REQUEST_FIELDS)
        for k, v in zip(d.keys, d.values):
            if isinstance(k, ast.Constant) and k.value == "sampling_params" and isinstance(v, ast.Dict):
                assert _keys(v) <= set(NAMES["requests"]["SamplingParams"])


def test_server_routes_are_sglang_endpoints():
    from plugrl.plugins.backends.sglang.server import EngineServer

    class _Engine:
        pass

    app = EngineServer(_Engine(), model_path="m", device="cpu").app()
    routes = {(r.method, r.resource.canonical) for r in app.router.routes()}
    for method, path in routes:
        assert path in ENDPOINTS, path
        if method in ("POST", "GET"):
            assert path in NAMES["endpoints"][method], (method, path)


def test_launch_flags_are_server_args_fields():
    values = launch.server_args(model_path="m", host="h", port=1, tp_size=1, base_gpu_id=0, seed=0,
                                memory_saver=True, device="cpu")
    assert set(values) <= set(NAMES["server_args"]["fields"])
    with pytest.raises(ValueError, match="computed by plugrl"):
        launch.server_args(model_path="m", host="h", port=1, tp_size=1, base_gpu_id=0, seed=0,
                           memory_saver=False, device=None, overrides={"port": 2})
    # plugrl serve accepts exactly the SGLang spelling the backend passes
    from plugrl.plugins.backends.sglang.server import SERVE_ONLY_FLAGS, build_parser

    dests = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert dests - set(SERVE_ONLY_FLAGS) <= set(NAMES["server_args"]["fields"])
    assert not set(SERVE_ONLY_FLAGS) & set(NAMES["server_args"]["fields"])
    build_parser().parse_args(launch.flag_words(values))


def test_router_flags_parse_with_the_installed_router():
    router_args = pytest.importorskip("sglang_router.router_args")
    parser = argparse.ArgumentParser()
    router_args.RouterArgs.add_cli_args(parser)
    argv = launch.router_argv(host="127.0.0.1", port=3000, settings={"balance_abs_threshold": 10,
                              "balance_rel_threshold": 1.2, "log_level": "warn", "policy": "cache_aware"},
                              request_timeout_secs=14400, prometheus_port=3001)
    parsed = parser.parse_args(argv[len(launch.ROUTER_LAUNCH):])
    assert parsed.port == 3000 and parsed.request_timeout_secs == 14400 and parsed.log_level == "warn"
    assert parsed.disable_circuit_breaker and parsed.disable_health_check and parsed.balance_abs_threshold == 10


def test_names_file_records_commits():
    for path, commit in NAMES["sources"].items():
        assert path.startswith("python/sglang/") and len(commit) == 40
    for release in NAMES["wheel_sources"]:  # names read in a released wheel instead: its exact version
        assert re.fullmatch(r"sglang==\d+\.\d+\.\d+(\.post\d+)?", release), release


def test_flattened_bucket_names_and_classes_are_sglangs():
    """The tensor payload uses SGLang's load_format, bucket keys and metadata fields, and pickles only
    classes SGLang's ``SafeUnpickler`` lets through (so a real engine accepts what plugrl sends)."""
    import dataclasses
    import pickle

    torch = pytest.importorskip("torch")
    from plugrl.plugins.backends.sglang import wire

    sync = NAMES["weight_sync"]
    assert wire.FLATTENED_BUCKET in sync["load_formats"]["UpdateWeightsFromTensorReqInput"]
    assert list(wire.BUCKET_KEYS) == sync["flattened_bucket_keys"]
    assert list(wire.METADATA_FIELDS) == sync["FlattenedTensorMetadata"]
    assert [f.name for f in dataclasses.fields(wire.FlattenedTensorMetadata)] == sync["FlattenedTensorMetadata"]
    assert "wire.FLATTENED_BUCKET" in (PKG / "weights.py").read_text()  # what push_tensor sends

    shared = wire.SharedBucket([("w", torch.ones(2, 3, dtype=torch.bfloat16)), ("b", torch.zeros(3))])
    seen = []

    class Recording(wire._PayloadUnpickler):
        def find_class(self, module, name):
            seen.append((module, name))
            return super().find_class(module, name)

    try:
        for part in shared.parts:
            assert sorted(part) == sorted(sync["flattened_bucket_keys"])
            entry = shared.entries(part, 1)[0]
            rebuilt = Recording(io.BytesIO(base64.b64decode(entry))).load()  # consumes the handle's reference
            assert torch.equal(rebuilt["flattened_tensor"], part["flattened_tensor"])
            del rebuilt
    finally:
        shared.release()
    assert seen
    for module, name in seen:
        assert any((module + ".").startswith(p) for p in sync["safe_unpickler_prefixes"]), (module, name)
    with pytest.raises(pickle.UnpicklingError):
        wire.deserialize(base64.b64encode(pickle.dumps(print)).decode())

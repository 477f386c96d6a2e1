"""Every bundled backend against the protocol core calls it through (core/protocols.py): each required
method exists and accepts the arguments core passes (checked by binding the protocol's own
signature), optional ones likewise where present; and core calls no private method of a backend."""

import ast
import inspect
from pathlib import Path

import pytest

from plugrl.core.protocols import RolloutEngine, TrainBackend, protocol_methods

ROOT = Path(__file__).resolve().parents[1]


def _load(path: str):
    module, attr = path.split(":")
    pytest.importorskip("torch")
    if "megatron" in module:
        pytest.importorskip("megatron.core")
    if "sglang" in module:
        pytest.importorskip("httpx")
    return getattr(__import__(module, fromlist=[attr]), attr)


def _conforms(cls, protocol) -> list[str]:
    """What ``cls`` lacks or cannot accept of ``protocol`` (empty when it conforms)."""
    problems = []
    optional = getattr(protocol, "OPTIONAL_METHODS", ())
    for name, declared in protocol_methods(protocol).items():
        impl = getattr(cls, name, None)
        if impl is None:
            if name not in optional:
                problems.append(f"{cls.__name__} lacks {name}()")
            continue
        if inspect.iscoroutinefunction(declared) != inspect.iscoroutinefunction(impl):
            problems.append(f"{cls.__name__}.{name}: async must match the protocol")
        wanted = inspect.signature(declared)
        args = [object() for p in wanted.parameters.values()
                if p.kind == p.POSITIONAL_OR_KEYWORD and p.default is p.empty]
        kwargs = {p.name: object() for p in wanted.parameters.values() if p.kind == p.KEYWORD_ONLY}
        try:
            inspect.signature(impl).bind(*args, **kwargs)  # args[0] stands for self
        except TypeError as exc:
            problems.append(f"{cls.__name__}.{name}{inspect.signature(impl)} does not take the protocol's "
                            f"arguments {wanted}: {exc}")
    return problems


@pytest.mark.parametrize("path", [
    "plugrl.plugins.backends.torch_trainer:TorchTrainBackend",
    "plugrl.plugins.backends.megatron.backend:MegatronTrainBackend",
])
def test_train_backends_conform(path):
    assert _conforms(_load(path), TrainBackend) == []


@pytest.mark.parametrize("path", [
    "plugrl.plugins.backends.hf_engine:HFRolloutEngine",
    "plugrl.plugins.backends.hf_pool:HFEnginePool",
    "plugrl.plugins.backends.sglang.engine:SGLangRolloutBackend",
])
def test_rollout_engines_conform(path):
    assert _conforms(_load(path), RolloutEngine) == []


def test_the_check_catches_a_missing_method_and_a_wrong_signature():
    class Broken:
        async def generate(self, input_ids):  # lacks sampling_params
            return {}

        def abort_all(self):  # not async
            return None

    problems = _conforms(Broken, RolloutEngine)
    assert any("lacks update_weights" in p for p in problems)
    assert any("generate" in p and "does not take" in p for p in problems)
    assert any("abort_all: async" in p for p in problems)
    assert not any("state_dict" in p for p in problems)  # optional


def test_core_calls_no_private_backend_method():
    """``backend._x`` / ``engine._x`` attribute access in core/ (a private method of a plugin)."""
    offenders = []
    for path in (ROOT / "core").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
                if name in ("backend", "engine"):
                    offenders.append(f"{path.name}:{node.lineno} {name}.{node.attr}")
    assert offenders == []


def _called_names(owner: str) -> dict[str, str]:
    """Every ``self.<owner>.X`` / ``getattr(self.<owner>, "X", ...)`` that core reads -> where."""
    found = {}
    for path in (ROOT / "core").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and ast.unparse(node.value) == f"self.{owner}":
                found.setdefault(node.attr, f"{path.name}:{node.lineno}")
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("getattr", "hasattr")
                  and len(node.args) >= 2 and ast.unparse(node.args[0]) == f"self.{owner}"
                  and isinstance(node.args[1], ast.Constant)):
                found.setdefault(node.args[1].value, f"{path.name}:{node.lineno}")
    return found


@pytest.mark.parametrize("owner,protocol", [("backend", TrainBackend), ("engine", RolloutEngine)])
def test_the_protocol_lists_everything_core_reads_of_a_backend(owner, protocol):
    """core/protocols.py is the whole contract: a method or attribute core probes for must be declared
    there (required, or optional in OPTIONAL_METHODS / as an annotated attribute)."""
    declared = set(protocol_methods(protocol)) | set(getattr(protocol, "__annotations__", {}))
    missing = {name: where for name, where in _called_names(owner).items() if name not in declared}
    assert missing == {}
    assert set(getattr(protocol, "OPTIONAL_METHODS", ())) <= set(protocol_methods(protocol))

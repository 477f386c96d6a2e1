"""Colocated memory release/resume against SGLang's own tag bookkeeping
(managers/scheduler_components/weight_updater.py ``SchedulerWeightUpdaterManager``), loaded from the
installed wheel's source: resuming a tag that is not released raises KeyError there, which kills a
real server. ``plugrl serve`` must behave the same, and the training loop must never do it."""

from __future__ import annotations

import ast
import asyncio
import enum
import types
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("aiohttp")

from plugrl.plugins.backends.sglang import launch
from plugrl.plugins.backends.sglang.weights import custom_group, destroy_group

from .test_sglang_source import sglang_module

LOOP = Path(__file__).resolve().parents[1] / "core" / "loop.py"


def _io_struct_stub() -> types.ModuleType:
    """Request/response structs of io_struct.py (it imports msgspec and more): plain attribute bags."""
    module = types.ModuleType("sglang.srt.managers.io_struct")

    def make(name):
        return type(name, (), {"__init__": lambda self, **kw: self.__dict__.update(kw)})

    module.__getattr__ = make  # PEP 562: ``from io_struct import X`` gets a class named X
    return module


def _disaggregation_stub() -> types.ModuleType:
    module = types.ModuleType("sglang.srt.disaggregation.utils")
    module.DisaggregationMode = enum.Enum("DisaggregationMode", ["NULL", "PREFILL", "DECODE"])
    return module


class _Adapter:
    """Stands in for torch_memory_saver: records what SGLang pauses and resumes."""

    def __init__(self):
        self.calls = []

    def pause(self, tag):
        self.calls.append(("pause", tag))

    def resume(self, tag):
        self.calls.append(("resume", tag))


@pytest.fixture(scope="module")
def sglang_manager():
    """A factory of SGLang's ``SchedulerWeightUpdaterManager`` (its code, CPU collaborators)."""
    updater = sglang_module("sglang.srt.managers.scheduler_components.weight_updater", stubs={
        "sglang.srt.managers.io_struct": _io_struct_stub(),
        "sglang.srt.disaggregation.utils": _disaggregation_stub()})
    group = custom_group("gloo", "127.0.0.1", launch.free_port(), 0, 1, "tags-test-tp-cpu", 30.0)
    model = torch.nn.Linear(2, 2)
    worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=model))

    def make():
        adapter = _Adapter()
        manager = updater.SchedulerWeightUpdaterManager(
            tp_worker=worker, draft_worker=None, tp_cpu_group=group, memory_saver_adapter=adapter,
            flush_cache=lambda **_: True, is_fully_idle=lambda: True)
        return manager, adapter

    yield make
    destroy_group(group)


def _request(tags):
    return types.SimpleNamespace(tags=tags)


def loop_memory_calls() -> list[tuple[str, object]]:
    """The colocated loop's engine memory calls, in source order: ``("release"|"resume", tags)``
    read from core/loop.py (``cluster.rollout.<op>_memory.remote(<tags>)``)."""
    calls = []
    for node in ast.walk(ast.parse(LOOP.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "remote"):
            continue
        target = node.func.value
        if isinstance(target, ast.Attribute) and target.attr in ("release_memory", "resume_memory"):
            tags = ast.literal_eval(node.args[0]) if node.args else None
            calls.append((target.attr.removesuffix("_memory"), tags, node.lineno))
    return [(op, tags) for op, tags, _ in sorted(calls, key=lambda c: c[2])]


def test_the_loops_colocated_sequence_runs_on_sglangs_bookkeeping(sglang_manager):
    """Release everything before training, resume weights before the push, then the rest after it:
    replayed through SGLang's own release/resume, nothing may raise and every tag comes back once."""
    make = sglang_manager
    calls = loop_memory_calls()
    assert [op for op, _ in calls] == ["release", "resume", "resume"], calls  # the loop's shape changed
    manager, adapter = make()
    for op, tags in calls:
        # the rollout manager releases with tags=None; the sglang backend sends every tag then
        getattr(manager, f"{op}_memory_occupation")(_request(tags))  # KeyError = a dead SGLang server
    assert manager.offload_tags == set()
    resumed = [tag for kind, tag in adapter.calls if kind == "resume"]
    assert sorted(resumed) == ["cuda_graph", "kv_cache", "weights"]
    assert calls[1][1] == ["weights"]  # weights first, so the push has somewhere to go


# (calls, outcome of each until the server dies), read off weight_updater.py's code.
SEQUENCES = [
    ([("release", None), ("resume", ["weights"]), ("resume", None)], ["ok", "ok", "dead"]),  # what crashed
    ([("release", None), ("resume", ["weights"]), ("resume", ["kv_cache", "cuda_graph"])], ["ok", "ok", "ok"]),
    ([("release", ["kv_cache"]), ("resume", ["kv_cache"]), ("resume", ["kv_cache"])], ["ok", "ok", "dead"]),
    ([("release", ["weights"]), ("release", ["weights"]), ("resume", ["weights"]), ("resume", [])],
     ["ok", "ok", "ok", "dead"]),
    ([("release", []), ("resume", ["cuda_graph"]), ("resume", ["weights", "kv_cache"])], ["ok", "ok", "ok"]),
]
IDS = ["-".join(f"{op}:{tags}" for op, tags in calls) for calls, _ in SEQUENCES]


def _sglang_outcomes(make, sequence) -> list[str]:
    manager, _ = make()
    outcomes = []
    for op, tags in sequence:
        try:
            getattr(manager, f"{op}_memory_occupation")(_request(tags))
        except KeyError:
            outcomes.append("dead")
            break
        outcomes.append("ok")
    return outcomes


async def _serve_outcomes(engine, sequence) -> list[str]:
    from aiohttp.test_utils import TestClient, TestServer

    from plugrl.plugins.backends.sglang.server import EngineServer

    server = EngineServer(engine, model_path="tiny", device="cpu")
    outcomes = []
    async with TestClient(TestServer(server.app())) as client:
        for op, tags in sequence:
            response = await client.post(f"/{op}_memory_occupation", json={"tags": tags})
            if response.status == 500:
                assert "KeyError" in (await response.json())["error"]["message"]
                assert (await client.get("/health")).status == 503  # and stays dead
                assert (await client.post("/generate", json={"input_ids": [1]})).status == 500
                outcomes.append("dead")
                break
            assert response.status == 200, await response.text()
            outcomes.append("ok")
    return outcomes


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from plugrl.plugins.backends.hf_engine import HFRolloutEngine
    from plugrl.plugins.backends.tiny_default import build_tiny_checkpoint

    e = HFRolloutEngine(str(build_tiny_checkpoint(tmp_path_factory.mktemp("tags") / "tiny")), device="cpu", seed=0)
    yield e
    e.close()


@pytest.mark.parametrize("calls,expected", SEQUENCES, ids=IDS)
def test_sglangs_bookkeeping_gives_the_recorded_outcomes(sglang_manager, calls, expected):
    assert _sglang_outcomes(sglang_manager, calls) == expected


@pytest.mark.parametrize("calls,expected", SEQUENCES, ids=IDS)
def test_plugrl_serve_keeps_tags_as_sglang(engine, calls, expected):
    """Runs without SGLang too: the same outcomes from ``plugrl serve`` (a dead server stays dead)."""
    assert asyncio.run(_serve_outcomes(engine, calls)) == expected
    engine.resume_memory(None)  # the next sequence starts from a serving engine


def test_the_loops_colocated_sequence_keeps_plugrl_serve_alive(engine):
    calls = loop_memory_calls()
    assert asyncio.run(_serve_outcomes(engine, calls)) == ["ok"] * len(calls)
    engine.resume_memory(None)

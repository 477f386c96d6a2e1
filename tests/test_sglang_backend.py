"""The ``sglang`` rollout backend end to end on CPU: the real ``sglang_router`` in front of two
``plugrl serve`` engines, started through the backend's launch path (``launch_command``). Weight
pushes go through both transports: ``tensor`` (shared memory, ``flattened_bucket``) and
``distributed`` (gloo broadcast)."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("sglang_router")
pytest.importorskip("aiohttp")
httpx = pytest.importorskip("httpx")
torch = pytest.importorskip("torch")

from plugrl.plugins.backends.sglang.engine import (
    SGLangRolloutBackend,
    _count_requests,
    _options_from_args,
)

SERVE = f"{sys.executable} -m plugrl.plugins.backends.sglang.server"
PROMPT = [5, 17, 42, 9]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from plugrl.plugins.backends.tiny_default import build_tiny_checkpoint

    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("sgb") / "tiny"))


@pytest.fixture(scope="module")
def backend(checkpoint):
    # The engines behave as SGLang 0.5.21 on: weight updates only inside a begin/end weight-update session.
    b = SGLangRolloutBackend(checkpoint, device="cpu", seed=0, num_engines=2,
                             launch_command=SERVE + " --weight-update-session required",
                             startup_timeout=180, request_retries=3, retry_interval=0.2,
                             update_weight_buffer_size=64 << 10, router_settings={"log_level": "warn"})
    try:
        yield b
    finally:
        b.close()  # kills engines and router even when a test failed
        assert all(not c.alive() for c in b._children)


@pytest.fixture(scope="module")
def reference(checkpoint):
    from plugrl.plugins.backends.hf_engine import HFRolloutEngine

    engine = HFRolloutEngine(checkpoint, device="cpu", seed=0)
    yield engine
    engine.close()


def _per_engine_logprobs(backend, seq, n):
    return [backend.log_probs_of([seq], [n], worker=i)[0] for i in range(len(backend.worker_urls))]


def test_launch_flags_and_router_registration(backend):
    assert len(backend.worker_urls) == 2
    argv = backend._children[0].process.args
    for flag in ("--model-path", "--port", "--tp-size", "--base-gpu-id", "--random-seed", "--trust-remote-code",
                 "--skip-server-warmup", "--device"):
        assert flag in argv
    assert "--enable-memory-saver" not in argv  # not colocated
    workers = httpx.get(backend.router_url + "/workers", trust_env=False).json()
    assert {w["url"] for w in workers["workers"]} == set(backend.worker_urls)
    assert backend.health()


def test_generate_through_router(backend, reference):
    async def many():
        params = {"max_new_tokens": 5, "temperature": 1.0}
        return await asyncio.gather(*(backend.generate(PROMPT, params) for _ in range(6)))

    outs = asyncio.run(many())
    for out in outs:
        assert set(out) >= {"tokens", "log_probs", "text", "finish_reason", "prompt_tokens", "completion_tokens",
                            "weight_version"}
        assert len(out["tokens"]) == len(out["log_probs"]) == out["completion_tokens"] <= 5
        assert out["prompt_tokens"] == len(PROMPT) and out["finish_reason"]["type"] in ("stop", "length")
        seq = PROMPT + out["tokens"]
        assert out["log_probs"] == pytest.approx(reference.log_probs_of([seq], [len(out["tokens"])])[0], abs=1e-4)
    assert backend.load_stats() == {"num_running": 0, "num_waiting": 0}


def test_abort_all_returns_partial_outputs(backend):
    async def run():
        params = {"max_new_tokens": 240, "ignore_eos": True}
        tasks = [asyncio.ensure_future(backend.generate(PROMPT, params)) for _ in range(4)]
        for _ in range(3000):  # until requests are decoding (bounded: a failure must not hang)
            if backend.load_stats()["num_running"] >= 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        await backend.abort_all()
        return await asyncio.gather(*tasks)

    outs = asyncio.run(run())
    assert all(o["finish_reason"]["type"] == "abort" for o in outs)
    assert all(len(o["tokens"]) < 240 and len(o["tokens"]) == len(o["log_probs"]) for o in outs)
    assert backend.load_stats() == {"num_running": 0, "num_waiting": 0}
    assert _count_requests({"loads": [{"num_running_reqs": 1, "num_waiting_reqs": 2}, {"num_reqs": 3}]}) == 6


@pytest.mark.parametrize("transport,version", [("tensor", 1), ("distributed", 2)])
def test_weight_update_reaches_both_engines(backend, reference, transport, version):
    torch.manual_seed(version)
    new = {n: p.detach() + 0.05 * torch.randn_like(p) for n, p in reference.model.named_parameters()}
    seq = PROMPT + [7, 8, 9]
    backend.transport = transport
    backend.update_weights(new, version)
    reference.update_weights(new, version)
    expected = reference.log_probs_of([seq], [3])[0]
    for got in _per_engine_logprobs(backend, seq, 3):
        assert got == pytest.approx(expected, abs=1e-4)
    assert backend.weight_version == str(version)
    for url in backend.worker_urls:
        assert httpx.get(url + "/get_model_info", trust_env=False).json()["weight_version"] == str(version)
    out = asyncio.run(backend.generate(PROMPT, {"max_new_tokens": 2}))
    assert out["weight_version"] == str(version)
    if transport == "tensor":  # both engines mapped each bucket's /dev/shm file; all of them are gone now
        assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"torch_{os.getpid()}_")]


def test_weight_updates_run_inside_sessions_that_are_always_closed(backend, reference):
    """SGLang 0.5.21 on refuses an update outside a session (400, before reading anything); the backend
    opens one per push, closes it after a failed push too, and closes a session that a dead run left open."""
    from plugrl.plugins.backends.sglang import wire

    url = backend.worker_urls[0]
    outside = httpx.post(url + "/update_weights_from_tensor", trust_env=False, json={
        "serialized_named_tensors": ["unread"], "load_format": wire.FLATTENED_BUCKET})
    assert outside.status_code == 400 and "between begin_weight_update() and end_weight_update()" in outside.text
    assert backend._sessionless == set()  # both engines have sessions
    new = {n: p.detach().clone() for n, p in reference.model.named_parameters()}
    bad = {**new, "model.no_such_layer.weight": torch.zeros(2)}
    backend.transport = "tensor"
    with pytest.raises(RuntimeError, match="no_such_layer"):
        backend.update_weights(bad, 30)
    for engine in backend.worker_urls:  # the failed push closed its sessions: a new one opens (then close it)
        assert httpx.post(engine + "/begin_weight_update", json={}, trust_env=False).status_code == 200
        assert httpx.post(engine + "/end_weight_update", json={}, trust_env=False).status_code == 200
    assert httpx.post(url + "/begin_weight_update", json={}, trust_env=False).status_code == 200  # left open
    backend.update_weights(new, 31)
    assert backend.weight_version == "31"
    assert httpx.post(url + "/end_weight_update", json={}, trust_env=False).status_code == 400  # none left open


def test_engines_without_sessions_are_pushed_to_directly(checkpoint, reference):
    """SGLang before 0.5.21 has no /begin_weight_update (404): the engine is remembered as sessionless."""
    b = SGLangRolloutBackend(checkpoint, device="cpu", seed=0, num_engines=1, startup_timeout=120,
                             launch_command=SERVE + " --weight-update-session absent", weight_transport="tensor")
    original = {n: p.detach().clone() for n, p in reference.model.named_parameters()}
    try:
        torch.manual_seed(5)
        new = {n: p + 0.05 * torch.randn_like(p) for n, p in original.items()}
        b.update_weights(new, 4)
        assert b._sessionless == set(b.worker_urls)
        seq = PROMPT + [7, 8, 9]
        reference.update_weights(new, 4)
        assert _per_engine_logprobs(b, seq, 3)[0] == pytest.approx(reference.log_probs_of([seq], [3])[0], abs=1e-4)
        with pytest.raises(ValueError, match="temperature 1"):
            b.log_probs_of([seq], [3], 0.8)
    finally:
        reference.update_weights(original, "restored")  # the module's reference is shared by later tests
        b.close()


def test_release_and_resume_memory(backend):
    backend.release_memory()
    backend.resume_memory(["weights"])
    backend.resume_memory(["kv_cache", "cuda_graph"])
    assert asyncio.run(backend.generate(PROMPT, {"max_new_tokens": 1}))["completion_tokens"] == 1


def test_resume_sends_only_released_tags(backend):
    """plugrl serve dies like SGLang when asked to resume a tag that is not released; the client
    resumes only what it released, so weights-then-everything (what the loop once did) is safe."""
    backend.release_memory()
    backend.resume_memory(["weights"])
    backend.resume_memory(None)  # everything still released: kv_cache and cuda_graph
    backend.resume_memory(["weights"])  # nothing released: no request
    assert backend.health()
    assert asyncio.run(backend.generate(PROMPT, {"max_new_tokens": 1}))["completion_tokens"] == 1
    assert backend.reproducible_sampling  # plugrl serve honours sampling_seed (and says so)


def test_abort_refuses_to_read_a_missing_v1_loads_as_idle(backend):
    """A server without /v1/loads (SGLang < 0.5.9) answers 404: the abort must fail, not report idle."""
    from .test_sglang_compat import FakeServer

    old = FakeServer({"/abort_request": (200, {})})
    try:
        with pytest.raises(RuntimeError, match=r"/v1/loads answered 404.*>=0\.5\.9"):
            asyncio.run(backend._abort_worker("http://" + old.addr))
    finally:
        old.close()


def test_external_engines_share_a_new_router(backend, checkpoint):
    addrs = [u.removeprefix("http://") for u in backend.worker_urls]
    other = SGLangRolloutBackend(checkpoint, external_engine_addrs=addrs, request_retries=2, retry_interval=0.2)
    try:
        assert other.worker_urls == backend.worker_urls and other._children == []
        assert asyncio.run(other.generate(PROMPT, {"max_new_tokens": 2}))["completion_tokens"] == 2
    finally:
        other.close()
    assert backend.health()  # closing the second backend left the engines it did not start alone


def test_killed_engines_give_a_clear_error(backend):
    """Runs last in this module: it kills the fixture's engines."""
    backend._children[0].stop()
    health = backend.engine_health()
    assert health == {backend.worker_urls[0]: False, backend.worker_urls[1]: True}
    assert not backend.health()
    backend._children[1].stop()
    with pytest.raises(RuntimeError, match=r"sglang router .*/generate failed after 3 attempt\(s\).*engine health"):
        asyncio.run(backend.generate(PROMPT, {"max_new_tokens": 1}))


def test_startup_failure_reports_the_engine_log(checkpoint):
    with pytest.raises(RuntimeError, match=r"(?s)engine0 exited .*unrecognized arguments: --bogus-flag") as info:
        SGLangRolloutBackend(checkpoint, device="cpu", launch_command=SERVE, startup_timeout=60,
                             server_overrides={"bogus_flag": True})
    log = Path(str(info.value).split("; log ")[1].split(":\n")[0])
    assert log.exists()  # kept for the user, who reads the rest of it; the test cleans up
    shutil.rmtree(log.parent)


def test_options_from_run_config():
    from types import SimpleNamespace

    args = SimpleNamespace(rollout_num_gpus=8, rollout_num_gpus_per_engine=2, colocate=True,
                           sglang_mem_fraction_static=0.7, sglang_passthrough={"attention_backend": "fa3"},
                           router_policy="round_robin", sglang_router_ip="10.0.0.1", sglang_router_port=3000)
    options = _options_from_args(args)
    assert options["num_engines"] == 4 and options["gpus_per_engine"] == 2
    assert options["memory_saver"] and options["weight_transport"] == "tensor"
    assert options["server_overrides"] == {"mem_fraction_static": 0.7, "attention_backend": "fa3"}
    assert options["router_settings"]["policy"] == "round_robin"
    assert options["router_settings"]["balance_abs_threshold"] == 10  # slime's router defaults
    assert options["router_url"] == "http://10.0.0.1:3000"
    assert _options_from_args(SimpleNamespace())["weight_transport"] == "distributed"


def test_launched_engines_see_the_gpus_the_placement_gave_them(checkpoint, tmp_path):
    """On GPU the driver passes each engine's physical GPU ids (placement.engine_gpu_ids): the engine
    process gets them as CUDA_VISIBLE_DEVICES and counts from --base-gpu-id 0, whatever single GPU Ray
    showed the rollout manager. A wrapper records what each launched process saw, then serves."""
    wrapper = tmp_path / "record_then_serve.sh"
    wrapper.write_text('#!/bin/sh\necho "$CUDA_VISIBLE_DEVICES $*" >> "' + str(tmp_path / "seen.txt") + '"\n'
                       f'exec {SERVE} "$@"\n')
    wrapper.chmod(0o755)
    b = SGLangRolloutBackend(checkpoint, device="cpu", seed=0, num_engines=2, gpus_per_engine=1,
                             launch_command=str(wrapper), engine_gpu_ids=[[5], [7]], startup_timeout=120)
    try:
        seen = sorted((tmp_path / "seen.txt").read_text().splitlines())
    finally:
        b.close()
    assert [line.split()[0] for line in seen] == ["5", "7"]
    assert all("--base-gpu-id 0" in line for line in seen)


def test_colocated_engines_get_slimes_memory_saver_setup(checkpoint, tmp_path, monkeypatch):
    """memory_saver (colocated): --enable-memory-saver, SGLANG_MEMORY_SAVER_CUDA_GRAPH and the TP
    imbalance check off in the engine's environment, PYTORCH_CUDA_ALLOC_CONF removed, the prefill CUDA
    graph disabled where the installed SGLang has the flag; every engine gets its own --nccl-port."""
    from plugrl.plugins.backends.sglang import compat

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    wrapper = tmp_path / "record_then_serve.sh"
    seen = tmp_path / "seen.txt"
    wrapper.write_text('#!/bin/sh\necho "${PYTORCH_CUDA_ALLOC_CONF:-unset} $SGLANG_MEMORY_SAVER_CUDA_GRAPH '
                       '$SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK $*" >> "' + str(seen) + '"\n'
                       f'exec {SERVE} "$@"\n')
    wrapper.chmod(0o755)
    b = SGLangRolloutBackend(checkpoint, device="cpu", seed=0, num_engines=2, launch_command=str(wrapper),
                             memory_saver=True, startup_timeout=120)
    try:
        lines = sorted(seen.read_text().splitlines())
    finally:
        b.close()
    assert [line.split()[:3] for line in lines] == [["unset", "true", "false"]] * 2
    assert all("--enable-memory-saver" in line for line in lines)
    ports = [line.split("--nccl-port ")[1].split()[0] for line in lines]
    assert len(set(ports)) == 2
    has_flag = "disable_prefill_cuda_graph" in compat.installed_server_fields()
    assert all(("--disable-prefill-cuda-graph" in line) == has_flag for line in lines)


def test_engine_gpu_ids_follow_the_sorted_bundles():
    from plugrl.plugins.backends.placement import engine_gpu_ids, sort_bundles

    # Ray's bundle order: bundle b reports (node, gpu); sorted order puts GPU 0 first.
    infos = [("10.0.0.1", 3), ("10.0.0.1", 0), ("10.0.0.1", 2), ("10.0.0.1", 1)]
    physical = [1, 3, 2, 0]  # logical bundle i -> the bundle holding GPU i
    assert sort_bundles(infos) == physical
    assert engine_gpu_ids([(0, 1), (2, 3)], physical, infos, launcher_bundle=0) == [[0, 1], [2, 3]]
    two_nodes = [("10.0.0.1", 0), ("10.0.0.2", 0)]
    with pytest.raises(ValueError, match="rollout engine 0 has GPUs on .*--rollout-external-engine-addrs"):
        engine_gpu_ids([(0, 1)], [0, 1], two_nodes, launcher_bundle=0)


def test_launch_flags_follow_the_installed_sglangs_field_names(checkpoint, tmp_path, monkeypatch):
    """With SGLang 0.5.20 on installed (fields read from arg_groups/fields, ``cuda_graph_bs`` split per phase),
    ``--sglang-cuda-graph-bs`` reaches the server as ``--cuda-graph-bs-decode`` (the old flag would kill it)
    and colocated engines get ``--disable-prefill-cuda-graph``. The installed fields are stood in for here."""
    from plugrl.plugins.backends.sglang import compat

    monkeypatch.setattr(compat, "installed_server_fields",
                        lambda: frozenset({"cuda_graph_bs_decode", "cuda_graph_bs_prefill", "disable_prefill_cuda_graph"}))
    seen = tmp_path / "argv.txt"
    wrapper = tmp_path / "record_then_serve.sh"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> "{seen}"\nexec {SERVE} "$@"\n')
    wrapper.chmod(0o755)
    b = SGLangRolloutBackend(checkpoint, device="cpu", seed=0, num_engines=1, launch_command=str(wrapper),
                             memory_saver=True, startup_timeout=120, server_overrides={"cuda_graph_bs": [1, 2, 4]})
    try:
        (line,) = seen.read_text().splitlines()
    finally:
        b.close()
    assert "--cuda-graph-bs-decode 1 2 4" in line and "--cuda-graph-bs " not in line
    assert "--disable-prefill-cuda-graph" in line

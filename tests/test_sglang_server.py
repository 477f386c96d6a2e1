"""``plugrl serve`` (plugins/backends/sglang/server.py) over real HTTP on loopback: every endpoint
with SGLang's field names, log-prob consistency, abort with partial output, weight pushes."""

from __future__ import annotations

import concurrent.futures
import json
import re
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")
httpx = pytest.importorskip("httpx")
torch = pytest.importorskip("torch")

from plugrl.plugins.backends.sglang import launch, wire
from plugrl.plugins.backends.sglang.weights import DistributedPusher

NAMES = json.loads((Path(launch.__file__).parent / "sglang_names.json").read_text())
SERVER = [sys.executable, "-m", "plugrl.plugins.backends.sglang.server"]
PROMPT = [5, 17, 42, 9]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from plugrl.plugins.backends.tiny_default import build_tiny_checkpoint

    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("sg") / "tiny"))


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    port = launch.free_port()
    child = launch.start("server", [*SERVER, "--model-path", checkpoint, "--port", str(port), "--device", "cpu"],
                         log_dir=tmp_path_factory.mktemp("logs"))
    url = f"http://127.0.0.1:{port}"
    try:
        launch.wait_until(lambda: _ok(url + "/health_generate"), timeout=120, interval=0.3, what="server", child=child)
        with httpx.Client(base_url=url, timeout=120, trust_env=False) as client:
            client.server_log = child.log_path  # for the tests of what the server prints
            yield client
    finally:
        child.stop()


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The same engine in-process: what the server must reproduce."""
    from plugrl.plugins.backends.hf_engine import HFRolloutEngine

    engine = HFRolloutEngine(checkpoint, device="cpu", seed=0)
    yield engine
    engine.close()


def _ok(url):
    try:
        return httpx.get(url, timeout=30, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def _input_logprobs(client, seq, n):
    """The last ``n`` tokens' log-probs, asked as of a real SGLang: its entry at ``logprob_start_len`` is None."""
    body = client.post("/generate", json={"input_ids": seq, "return_logprob": True,
                                          "logprob_start_len": len(seq) - n - 1,
                                          "sampling_params": {"max_new_tokens": 0}}).json()
    entries = body["meta_info"]["input_token_logprobs"]
    assert len(entries) == n + 1 and entries[0][0] is None
    return [p[0] for p in entries[1:]]


def _perturbed(reference, scale):
    return {name: p.detach() + scale * torch.randn_like(p) for name, p in reference.model.named_parameters()}


def test_generate_fields_and_logprobs(server, reference):
    body = server.post("/generate", json={"input_ids": PROMPT, "return_logprob": True,
                                          "sampling_params": {"max_new_tokens": 6, "temperature": 1.0}}).json()
    assert set(body) == {"text", "output_ids", "meta_info"}
    meta = body["meta_info"]
    assert {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "weight_version",
            "output_token_logprobs"} <= set(meta)
    assert set(meta) <= set(NAMES["responses"]["generate_meta_info"])  # only SGLang's names
    assert meta["prompt_tokens"] == len(PROMPT) and meta["completion_tokens"] == len(body["output_ids"])
    assert meta["finish_reason"]["type"] in ("stop", "length")
    triples = meta["output_token_logprobs"]
    assert [t[1] for t in triples] == body["output_ids"] and all(t[2] is None for t in triples)
    got = [t[0] for t in triples]
    seq, n = PROMPT + body["output_ids"], len(got)
    # generation log-probs == the engine's teacher-forced ones, on the server and in-process
    assert got == pytest.approx(reference.log_probs_of([seq], [n])[0], abs=1e-4)
    assert got == pytest.approx(_input_logprobs(server, seq, n), abs=1e-4)
    assert meta["weight_version"] == "default"


def test_input_token_logprobs_have_sglangs_shape(server, reference):
    """SGLang (managers/scheduler_components/logprob_result_processor.py: ``[None] + computed[:-1]``): one
    entry per token from ``logprob_start_len`` on, the first None, scored at temperature 1 whatever the
    request's temperature (a plain log-softmax); a start past the prompt is refused."""
    seq = PROMPT + [3, 4, 8]
    for start in (0, 2, len(seq) - 1):
        body = server.post("/generate", json={"input_ids": seq, "return_logprob": True, "logprob_start_len": start,
                                              "sampling_params": {"max_new_tokens": 0, "temperature": 0.5}}).json()
        entries = body["meta_info"]["input_token_logprobs"]
        assert [e[1] for e in entries] == seq[start:] and entries[0][0] is None
        n = len(seq) - start - 1
        expected = reference.log_probs_of([seq], [n], 1.0)[0] if n else []
        assert [e[0] for e in entries[1:]] == pytest.approx(expected, abs=1e-4)
    too_far = server.post("/generate", json={"input_ids": seq, "return_logprob": True,
                                             "logprob_start_len": len(seq) + 1, "sampling_params": {"max_new_tokens": 0}})
    assert too_far.status_code == 400 and "logprob_start_len" in too_far.text


def test_generate_defaults_text_and_stop(server):
    body = server.post("/generate", json={"text": "What is 12 - 12 + 3?",
                                          "sampling_params": {"temperature": 0, "max_new_tokens": 3}}).json()
    assert "output_token_logprobs" not in body["meta_info"]  # return_logprob defaults to off
    assert body["meta_info"]["completion_tokens"] <= 3
    greedy = server.post("/generate", json={"input_ids": PROMPT, "sampling_params": {"temperature": 0,
                                            "max_new_tokens": 4, "ignore_eos": True}}).json()
    first = greedy["output_ids"][0]
    stopped = server.post("/generate", json={"input_ids": PROMPT, "sampling_params": {
        "temperature": 0, "max_new_tokens": 4, "stop_token_ids": [first], "no_stop_trim": True}}).json()
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": first}
    assert stopped["output_ids"] == [first]
    default_len = server.post("/generate", json={"input_ids": PROMPT, "sampling_params": {"ignore_eos": True}}).json()
    assert default_len["meta_info"]["completion_tokens"] == 128  # SGLang's max_new_tokens default
    bad = server.post("/generate", json={"input_ids": [[1, 2], [3]]})
    assert bad.status_code == 400 and "batch" in bad.json()["error"]["message"]


def test_status_endpoints(server):
    assert server.get("/health").status_code == 200
    assert server.get("/health_generate").status_code == 200
    info = server.get("/get_server_info").json()
    assert info["tp_size"] == 1 and info["model_path"].endswith("tiny")
    loads = server.get("/v1/loads", params={"include": "core"}).json()
    assert set(loads) >= {"timestamp", "version", "loads"}
    assert loads["loads"][0]["num_running_reqs"] == 0 and loads["loads"][0]["num_waiting_reqs"] == 0
    assert server.post("/flush_cache").status_code == 200 and server.get("/flush_cache").status_code == 200
    assert "weight_version" in server.get("/get_model_info").json()  # SGLang's place for it


def test_abort_mid_generation_returns_partial(server):
    payload = {"input_ids": PROMPT, "return_logprob": True,
               "sampling_params": {"max_new_tokens": 240, "ignore_eos": True}}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(server.post, "/generate", json=payload)
        launch.wait_until(lambda: server.get("/v1/loads").json()["loads"][0]["num_running_reqs"] == 1,
                          timeout=30, interval=0.01, what="the request to run")
        time.sleep(0.05)
        assert server.post("/abort_request", json={"abort_all": True}).status_code == 200
        body = future.result(60).json()
    meta = body["meta_info"]
    assert meta["finish_reason"]["type"] == "abort"
    assert 0 < len(body["output_ids"]) < 240 and len(meta["output_token_logprobs"]) == len(body["output_ids"])
    assert server.post("/abort_request", json={"rid": "x"}).status_code == 400  # only abort_all is supported


def test_pause_holds_new_requests_until_continue(server):
    assert server.post("/pause_generation", json={}).json()["status"] == "ok"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # ignore_eos: a sampled EOS would end it with "stop" (the CI flake this once was)
        future = pool.submit(server.post, "/generate",
                             json={"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2, "ignore_eos": True}})
        launch.wait_until(lambda: server.get("/v1/loads").json()["loads"][0]["num_waiting_reqs"] == 1,
                          timeout=30, interval=0.02, what="the request to wait")
        assert not future.done()
        assert server.post("/continue_generation", json={}).json()["status"] == "ok"
        assert future.result(60).json()["meta_info"]["finish_reason"]["type"] == "length"


def test_release_and_resume_memory(server):
    assert server.post("/release_memory_occupation", json={}).status_code == 200
    refused = server.post("/generate", json={"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 1}})
    assert refused.status_code == 400 and "released" in refused.json()["error"]["message"]
    assert server.post("/resume_memory_occupation", json={"tags": ["weights"]}).status_code == 200
    assert server.post("/resume_memory_occupation", json={"tags": ["kv_cache", "cuda_graph"]}).status_code == 200
    # (resuming a tag that is not released kills the server, as SGLang: test_sglang_memory_tags.py)
    assert server.post("/generate", json={"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 1}}).status_code == 200


def test_update_weights_from_tensor(server, reference):
    """SGLang's flattened_bucket format, as ``push_tensor`` sends it: per bucket and dtype one request
    carrying /dev/shm handles; the memory is released only after the server answered."""
    torch.manual_seed(1)
    new = _perturbed(reference, 0.05)
    seq = PROMPT + [7, 8, 9]
    before = _input_logprobs(server, seq, 3)
    buckets = wire.bucket_by_size(list(new.items()), 64 << 10)
    assert len(buckets) > 1
    requests = 0
    for bucket in buckets:  # one request per bucket and dtype, as slime does
        shared = wire.SharedBucket(bucket)
        try:
            for part in shared.parts:
                reply = server.post("/update_weights_from_tensor", json={
                    "serialized_named_tensors": shared.entries(part, 1), "load_format": wire.FLATTENED_BUCKET,
                    "flush_cache": False, "weight_version": "7"})
                assert reply.status_code == 200 and reply.json()["success"], reply.text
                requests += 1
        finally:
            shared.release()
    assert requests == len(buckets)  # the tiny model is all fp32: one part per bucket
    reference.update_weights(new, 7)
    after = _input_logprobs(server, seq, 3)
    assert after == pytest.approx(reference.log_probs_of([seq], [3])[0], abs=1e-4)
    assert after != pytest.approx(before, abs=1e-4)
    assert server.get("/get_model_info").json()["weight_version"] == "7"
    # No load_format, or plugrl's removed by-value one: refused before the payload is read, naming the
    # format it takes. (The payload is a placeholder: a real handle that nobody opens would keep its
    # /dev/shm file until this process exits, which later tests would count as a leak.)
    for load_format in (None, "plugrl_torch"):
        wrong = server.post("/update_weights_from_tensor", json={"serialized_named_tensors": ["unread"],
                                                                 "load_format": load_format})
        assert wrong.status_code == 400 and not wrong.json()["success"]
        assert wire.FLATTENED_BUCKET in wrong.json()["message"]
    assert server.get("/get_model_info").json()["weight_version"] == "7"  # refusals changed nothing


def test_backend_refuses_remote_engines_for_tensor_transport_at_start(checkpoint):
    """``weight_transport='tensor'`` with an engine on another host fails in the constructor (before
    any health wait or launch), naming the option and the transport to use instead."""
    from plugrl.plugins.backends.sglang.engine import SGLangRolloutBackend

    started = time.monotonic()
    with pytest.raises(ValueError, match=r"weight_transport='distributed'") as info:
        # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never an address of this host.
        SGLangRolloutBackend(checkpoint, device="cpu", external_engine_addrs=["192.0.2.1:30000"],
                             weight_transport="tensor", startup_timeout=60)
    assert "192.0.2.1" in str(info.value) and "weight_transport='tensor'" in str(info.value)
    assert time.monotonic() - started < 10  # refused up front, not after the 60 s health wait


def test_update_weights_from_distributed(server, reference):
    torch.manual_seed(2)
    new = _perturbed(reference, 0.05)
    url = str(server.base_url).rstrip("/")
    with httpx.Client(timeout=120, trust_env=False) as client:
        pusher = DistributedPusher(client, [url], host="127.0.0.1", port=launch.free_port(), backend="gloo")
        try:
            pusher.push(wire.bucket_by_size(list(new.items()), 64 << 10), "8")
        finally:
            pusher.close()
    reference.update_weights(new, 8)
    seq = PROMPT + [3, 4]
    assert _input_logprobs(server, seq, 2) == pytest.approx(reference.log_probs_of([seq], [2])[0], abs=1e-4)
    assert server.get("/get_model_info").json()["weight_version"] == "8"
    body = server.post("/generate", json={"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 1}}).json()
    assert body["meta_info"]["weight_version"] == "8"
    nccl = server.post("/init_weights_update_group", json={"master_address": "127.0.0.1", "master_port": 1,
                                                           "rank_offset": 1, "world_size": 2})
    assert nccl.status_code == 400 and "gloo" in nccl.json()["message"]  # SGLang's default backend is nccl


def test_serve_names_a_model_path_that_is_not_a_folder(tmp_path):
    """No hub: a missing path is named, instead of transformers' 'Repo id must use alphanumeric chars'."""
    from plugrl.plugins.backends.sglang.server import main

    with pytest.raises(SystemExit, match=rf"--model-path {tmp_path / 'nope'} is not a directory; give a Hugging Face"):
        main(["--model-path", str(tmp_path / "nope")])


def test_serve_says_where_it_listens_and_answers_a_non_json_body_with_400(server):
    assert "plugrl serve: listening on http://127.0.0.1:" in server.server_log.read_text()
    bad = server.post("/abort_request", content=b"garbage", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "request body is not JSON" in bad.json()["error"]["message"]
    assert server.get("/health_generate").status_code == 200  # still serving


def test_serve_refuses_bad_flags_before_loading_the_model(checkpoint, tmp_path):
    from plugrl.plugins.backends.sglang.server import main

    not_hf = tmp_path / "ckpt" / "rollout_000001"
    not_hf.mkdir(parents=True)
    cases = [(["--model-path", str(not_hf)], f"--model-path {not_hf}: no config.json there"),
             (["--model-path", checkpoint, "--port", "99999"], "--port 99999: give a port from 1 to 65535"),
             (["--model-path", checkpoint, "--context-length", "-5"], "--context-length must be >= 1, got -5"),
             (["--model-path", checkpoint, "--max-running-requests", "0"], "--max-running-requests must be >= 1, got 0"),
             (["--model-path", checkpoint, "--dtype", "float8"], "--dtype float8: give one of auto, bfloat16, bf16,"),
             (["--model-path", checkpoint, "--host", "999.1.1.1"], "--host 999.1.1.1: not an address of this machine")]
    import torch

    if not torch.cuda.is_available():
        cases.append((["--model-path", checkpoint, "--device", "cuda"], "--device cuda: this torch sees no CUDA device"))
    for argv, message in cases:
        with pytest.raises(SystemExit, match=re.escape(f"plugrl serve: {message}")):
            main(argv)

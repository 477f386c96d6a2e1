"""``update_weights_from_tensor`` SGLang's way (``load_format="flattened_bucket"``, handles instead of
bytes): shared memory on CPU, CUDA IPC on GPU, between real processes over real HTTP on loopback."""

from __future__ import annotations

import base64
import os
import pickle
import subprocess
import sys
import time

import pytest

pytest.importorskip("aiohttp")
httpx = pytest.importorskip("httpx")
torch = pytest.importorskip("torch")

from plugrl.plugins.backends.sglang import launch, wire
from plugrl.plugins.backends.sglang.weights import push_tensor, require_local

from .test_sglang_server import _input_logprobs, _ok

SERVER = [sys.executable, "-m", "plugrl.plugins.backends.sglang.server"]
PROMPT = [5, 17, 42, 9]
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]

# A second process that opens the handles and saves what it finds (copied to CPU) for the test to compare.
RECEIVER = """
import sys, torch
from plugrl.plugins.backends.sglang import wire
received = []
for line in sys.stdin:
    if line.strip():
        received.append([(name, t.to("cpu", copy=True)) for name, t in wire.decode_flattened_bucket(line.strip())])
torch.save(received, sys.argv[1])
"""


def _own_shm_files() -> list[str]:
    """``/dev/shm`` files torch created for this process (``torch_<pid>_...``); other processes'
    files (tests running beside this one) are not ours to count."""
    prefix = f"torch_{os.getpid()}_"
    return sorted(f for f in os.listdir("/dev/shm") if f.startswith(prefix))


def _wait_no_own_shm(timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := _own_shm_files()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _mixed_bucket(device: str) -> list:
    g = torch.Generator().manual_seed(3)
    pairs = [
        ("a.weight", torch.randn(3, 5, generator=g).to(torch.bfloat16)),
        ("b.bias", torch.randn(7, generator=g)),
        ("c.weight", torch.randn(4, 6, generator=g).to(torch.bfloat16).t()),  # not contiguous
        ("d.scale", torch.randn((), generator=g)),  # 0-d
        ("e.index", torch.arange(6, dtype=torch.int64).reshape(2, 3)),
        ("f.weight", torch.randn(2, 2, generator=g)),
    ]
    return [(n, t.to(device)) for n, t in pairs]


def _receive(entries: list[str], tmp_path) -> list:
    out = tmp_path / "received.pt"
    proc = subprocess.run([sys.executable, "-c", RECEIVER, str(out)], input="\n".join(entries) + "\n", check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def _assert_same(received: list, sent: list) -> None:
    assert [n for n, _ in received] == [n for n, _ in sent]
    for (name, got), (_, want) in zip(received, sent):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want.cpu()), name  # bit for bit: nothing is converted on the way


def _check_layout(shared, device: str) -> None:
    """One flat 1-D tensor per dtype, in order of first appearance (slime splits buckets the same
    way), with SGLang's metadata fields. (A helper: a loop variable left in the test's frame would
    keep the last part alive.)"""
    assert [p["flattened_tensor"].dtype for p in shared.parts] == [torch.bfloat16, torch.float32, torch.int64]
    for part in shared.parts:
        assert part["flattened_tensor"].device.type == device and part["flattened_tensor"].dim() == 1
        for meta in part["metadata"]:
            assert all(hasattr(meta, f) for f in wire.METADATA_FIELDS)
            assert meta.end_idx - meta.start_idx == meta.numel == torch.Size(meta.shape).numel()


@pytest.mark.parametrize("device", DEVICES)
def test_flattened_bucket_reaches_another_process_unchanged(device, tmp_path):
    sent = _mixed_bucket(device)
    earlier = set(_wait_no_own_shm())  # files an earlier test's receiver has not given back yet
    shared = wire.SharedBucket(sent)
    try:
        _check_layout(shared, device)
        if device == "cpu":
            assert all(p["flattened_tensor"].is_shared() for p in shared.parts)
            # the handles name these /dev/shm files
            assert len(set(_own_shm_files()) - earlier) == len(shared.parts)
        # Two receivers, one after the other, each with its own serialization: the first one dropping
        # its mapping must not take the memory from the second.
        for _ in range(2):
            entries = [shared.entries(part, 1)[0] for part in shared.parts]
            assert all(len(e) < 4096 for e in entries)  # handles, not data
            received = [pair for part in _receive(entries, tmp_path) for pair in part]
            by_dtype = [pair for dtype in (torch.bfloat16, torch.float32, torch.int64)
                        for pair in sent if pair[1].dtype == dtype]
            _assert_same(received, by_dtype)
    finally:
        shared.release()
    if device == "cpu":
        assert set(_wait_no_own_shm()) <= earlier


def test_deserializer_refuses_foreign_classes(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    entry = base64.b64encode(pickle.dumps({"flattened_tensor": Exploit(), "metadata": []})).decode()
    with pytest.raises(pickle.UnpicklingError, match="refused to unpickle"):
        wire.decode_flattened_bucket(entry)
    assert not (tmp_path / "pwned").exists()


def test_remote_engine_is_refused_with_the_option_to_use():
    before = _own_shm_files()
    with pytest.raises(ValueError, match=r"(?s)not local: \['http://192\.0\.2\.1:30000'\].*weight_transport='distributed'"
                                         r".*--colocate"):
        # TEST-NET-1 address: never this host. The check runs before any memory is shared or request sent.
        push_tensor(None, ["http://127.0.0.1:30001", "http://192.0.2.1:30000"], [_mixed_bucket("cpu")], "1")
    assert _own_shm_files() == before
    require_local(["http://127.0.0.1:1", "http://localhost:2", "127.0.0.1:3"])  # no error


# ---------------------------------------------------------------------------------------- plugrl serve
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from plugrl.plugins.backends.tiny_default import build_tiny_checkpoint

    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("ipc") / "tiny"))


def _serve(checkpoint: str, device: str, log_dir):
    port = launch.free_port()
    child = launch.start("server", [*SERVER, "--model-path", checkpoint, "--port", str(port), "--device", device],
                         log_dir=log_dir)
    url = f"http://127.0.0.1:{port}"
    launch.wait_until(lambda: _ok(url + "/health_generate"), timeout=180, interval=0.3, what="server", child=child)
    return child, url


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    child, url = _serve(checkpoint, "cpu", tmp_path_factory.mktemp("logs"))
    try:
        with httpx.Client(base_url=url, timeout=120, trust_env=False) as client:
            yield client
    finally:
        child.stop()


def _new_weights(model, seed: int, device: str) -> list:
    """Perturbed parameters, alternately sent as fp32 and bf16 (the engine casts into its model's
    dtype: fp32 on CPU, bf16 on CUDA), so buckets mix dtypes either way."""
    torch.manual_seed(seed)
    pairs = []
    for i, (name, p) in enumerate(model.named_parameters()):
        t = p.detach() + 0.05 * torch.randn_like(p)
        pairs.append((name, t.to(torch.bfloat16 if i % 2 else torch.float32).to(device)))
    return pairs


def _push_and_compare(client, url: str, device: str, version: str, checkpoint: str) -> None:
    from plugrl.plugins.backends.hf_engine import HFRolloutEngine

    reference = HFRolloutEngine(checkpoint, device=device, seed=0)
    try:
        pairs = _new_weights(reference.model, int(version), device)
        buckets = wire.bucket_by_size(pairs, 64 << 10)
        assert len(buckets) > 1 and any(len({t.dtype for _, t in b}) == 2 for b in buckets)
        seq = PROMPT + [7, 8, 9]
        before = _input_logprobs(client, seq, 3)
        push_tensor(client, [url], buckets, version)
        reference.update_weights(pairs, version)
        expected = reference.log_probs_of([seq], [3])[0]
    finally:
        reference.close()
    after = _input_logprobs(client, seq, 3)
    assert after == pytest.approx(expected, abs=1e-4)
    assert after != pytest.approx(before, abs=1e-4)
    assert client.get("/get_model_info").json()["weight_version"] == version


def test_remote_engines_are_given_a_routable_group_address():
    """Engines on this host dial the group at the given local address; a remote engine gets this host's
    address on the route to it (a loopback address would make it dial itself)."""
    from plugrl.plugins.backends.sglang.weights import _is_local_host, master_address

    assert master_address(["http://127.0.0.1:1", "localhost:2"], "127.0.0.1") == "127.0.0.1"
    try:
        address = master_address(["http://127.0.0.1:1", "http://192.0.2.55:30000"], "127.0.0.1")
    except ValueError as exc:  # a host with no route beyond loopback: the error says so
        assert "no route from this host to engine 192.0.2.55" in str(exc)
        return
    assert _is_local_host(address) and not address.startswith("127.")


def test_push_through_shared_memory_into_plugrl_serve(server, checkpoint):
    url = str(server.base_url).rstrip("/")
    _push_and_compare(server, url, "cpu", "11", checkpoint)
    assert _wait_no_own_shm() == []  # engine and sender both let go of every bucket


def test_server_answers_bad_requests_as_sglang(server, tmp_path):
    wrong = server.post("/update_weights_from_tensor", json={"serialized_named_tensors": ["AAAA"],
                                                             "load_format": "direct"})
    assert wrong.status_code == 400 and wrong.json()["success"] is False
    assert "flattened_bucket" in wrong.json()["message"]
    shared = wire.SharedBucket(_mixed_bucket("cpu")[:1])
    try:
        entry = shared.entries(shared.parts[0], 1)[0]
        # a.weight is no parameter of the model: refused by name, nothing loaded
        unknown = server.post("/update_weights_from_tensor", json={"serialized_named_tensors": [entry],
                                                                   "load_format": wire.FLATTENED_BUCKET})
        assert unknown.status_code == 400 and unknown.json()["success"] is False
        assert "unknown parameter 'a.weight'" in unknown.json()["message"]
    finally:
        shared.release()
    assert _wait_no_own_shm() == []  # a refused load still lets go of the sender's memory
    exploit = base64.b64encode(pickle.dumps(os.system)).decode()
    refused = server.post("/update_weights_from_tensor", json={"serialized_named_tensors": [exploit],
                                                               "load_format": wire.FLATTENED_BUCKET})
    assert refused.status_code == 400 and "refused to unpickle" in refused.json()["message"]
    empty = server.post("/update_weights_from_tensor", json={"serialized_named_tensors": [],
                                                             "load_format": wire.FLATTENED_BUCKET})
    assert empty.status_code == 400 and empty.json()["success"] is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_ipc_push_into_plugrl_serve_on_the_same_gpu(checkpoint, tmp_path):
    child, url = _serve(checkpoint, "cuda", tmp_path)
    try:
        with httpx.Client(base_url=url, timeout=300, trust_env=False) as client:
            _push_and_compare(client, url, "cuda", "21", checkpoint)
    finally:
        child.stop()


def test_a_bucket_larger_than_free_dev_shm_is_refused_before_writing(monkeypatch):
    class Small:  # what os.statvfs reports for a 1 MiB /dev/shm
        f_bavail, f_frsize = 256, 4096

    monkeypatch.setattr(wire.os, "statvfs", lambda path: Small())
    with pytest.raises(RuntimeError, match=r"/dev/shm has 1 MiB free.*--update-weight-buffer-size.*--shm-size"):
        wire.SharedBucket([("w", torch.zeros(1 << 19))])  # 2 MiB of fp32
    assert _own_shm_files() == []

"""The distributed weight push against engines whose TP ranks join the weights update group with
SGLang's own ``init_custom_process_group`` (utils/common.py, loaded from the installed wheel's
source) and receive as SGLang's model runner does (``torch.distributed.broadcast(src=0)``), one
process per TP rank. Without SGLang's source the same engines use ``plugrl serve``'s mirror
(``weights.custom_group``). The HTTP side of each engine is a small server in this process that
forwards each request to its TP-rank processes, like SGLang's tokenizer manager to its schedulers."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

torch = pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")

from plugrl.plugins.backends.sglang import launch
from plugrl.plugins.backends.sglang.weights import DistributedPusher

from .test_sglang_source import sglang_root

TIMEOUT_S = 40  # a mismatched group fails in this time instead of SGLang's 30 minutes

# One TP rank of an engine. argv[1]: JSON config. stdin: one JSON line per request.
RANK = r"""
import datetime, json, sys, torch
cfg = json.loads(sys.argv[1])
timeout = datetime.timedelta(seconds=cfg["timeout"])
if cfg["sglang_common"]:
    import ast
    tree = ast.parse(open(cfg["sglang_common"]).read())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "init_custom_process_group")
    ns = {"torch": torch, "torch_release": tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])}
    exec(compile(ast.Module(body=[node], type_ignores=[]), cfg["sglang_common"], "exec"), ns)
    # model_runner.py init_weights_update_group: rank = rank_offset + tp_rank, init_method tcp://host:port
    group = ns["init_custom_process_group"](backend=cfg["backend"], init_method=f"tcp://{cfg['address']}:{cfg['port']}",
                                            world_size=cfg["world"], rank=cfg["rank"], group_name=cfg["group"],
                                            timeout=timeout)
else:
    from plugrl.plugins.backends.sglang.weights import custom_group
    group = custom_group(cfg["backend"], cfg["address"], cfg["port"], cfg["rank"], cfg["world"], cfg["group"],
                         cfg["timeout"])
print(json.dumps({"joined": cfg["rank"]}), flush=True)
for line in sys.stdin:
    specs = json.loads(line)
    if specs is None:
        break
    tensors, handles = [], []
    for name, dtype, shape in specs:  # model_runner.py update_weights_from_distributed
        t = torch.empty(shape, dtype=getattr(torch, dtype))
        handles.append(torch.distributed.broadcast(t, src=0, group=group, async_op=True))
        tensors.append((name, t))
    for h in handles:
        h.wait()
    print(json.dumps({n: t.double().sum().item() for n, t in tensors}), flush=True)
torch.distributed.destroy_process_group(group)
"""


class FakeEngine:
    """``/init_weights_update_group``, ``/update_weights_from_distributed`` and
    ``/destroy_weights_update_group`` of one engine of ``tp_size`` ranks."""

    def __init__(self, tp_size: int, sglang_common: str | None):
        self.tp_size, self.sglang_common = tp_size, sglang_common
        self.init_bodies, self.received, self.ranks = [], [], []
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                status, reply = engine.handle(self.path, body)
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def handle(self, path: str, body: dict):
        if path == "/init_weights_update_group":
            self.init_bodies.append(body)
            for tp_rank in range(self.tp_size):
                cfg = {"sglang_common": self.sglang_common, "address": body["master_address"],
                       "port": body["master_port"], "rank": body["rank_offset"] + tp_rank,
                       "world": body["world_size"], "group": body["group_name"], "backend": body["backend"],
                       "timeout": TIMEOUT_S}
                self.ranks.append(subprocess.Popen([sys.executable, "-c", RANK, json.dumps(cfg)], text=True,
                                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE))
            joined = [p.stdout.readline() for p in self.ranks]  # empty when the rank died
            if not all(joined):
                return 400, {"success": False, "message": "a TP rank failed to join"}
            return 200, {"success": True, "message": "Succeeded to initialize custom process group."}
        if path == "/update_weights_from_distributed":
            specs = list(zip(body["names"], body["dtypes"], body["shapes"]))
            for p in self.ranks:
                p.stdin.write(json.dumps(specs) + "\n")
                p.stdin.flush()
            self.received.append([json.loads(p.stdout.readline() or "null") for p in self.ranks])
            return 200, {"success": True, "message": "Succeeded to update parameter online."}
        if path == "/destroy_weights_update_group":
            self.stop_ranks()
            return 200, {"success": True, "message": "Succeeded to destroy custom process group."}
        return 404, {"detail": "Not Found"}

    def stop_ranks(self):
        for p in self.ranks:
            if p.poll() is None:
                try:
                    p.stdin.write("null\n")
                    p.stdin.flush()
                    p.wait(20)
                except (OSError, subprocess.TimeoutExpired):
                    p.kill()
        self.ranks = []

    def close(self):
        for p in self.ranks:
            p.kill()
        self.http.shutdown()


ENGINE_SIDES = ["sglang", "mirror"]


def _common_path(side: str) -> str | None:
    if side == "mirror":
        return None
    root = sglang_root()
    if root is None:
        pytest.skip("SGLang's source is not installed (pip install --no-deps sglang==0.5.15.post1)")
    return str(root / "srt" / "utils" / "common.py")


def _push(urls: list[str], buckets: list, **options) -> None:
    """Build the group and push, in a thread bounded by 3 x TIMEOUT_S: a rank 0 that builds its group
    differently from the engines hangs in its own rendezvous (30 minutes by default), and the test
    must fail instead of hanging with it."""
    errors = []

    def run():
        try:
            with httpx.Client(timeout=120, trust_env=False) as client:
                pusher = DistributedPusher(client, urls, host="127.0.0.1", port=launch.free_port(), backend="gloo",
                                           timeout_s=TIMEOUT_S, **options)
                try:
                    pusher.push(buckets, "3")
                finally:
                    pusher.close()
        except BaseException as exc:  # noqa: BLE001  reported by the test below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(3 * TIMEOUT_S)
    assert not thread.is_alive(), "rank 0 and the engines never formed the weights update group (hang)"
    if errors:
        raise errors[0]


def _bucket(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [("a.weight", torch.randn(4, 3, generator=g)), ("b.bias", torch.randn(5, generator=g).to(torch.bfloat16)),
            ("c.weight", torch.randn(2, 2, generator=g))]


@pytest.mark.parametrize("side", ENGINE_SIDES)
def test_rank0_joins_the_group_sglang_engines_build(side):
    """A one-rank engine: plugrl's rank 0 and the engine must meet in the store under SGLang's
    names (a raw TCPStore on rank 0 and PrefixStore(group_name) on the engine hang until the timeout)."""
    engine = FakeEngine(1, _common_path(side))
    try:
        bucket = _bucket(0)
        _push([engine.url], [bucket])
        assert engine.received == [[{n: t.double().sum().item() for n, t in bucket}]]
    finally:
        engine.close()


@pytest.mark.parametrize("side", ENGINE_SIDES)
def test_every_tp_rank_of_every_engine_has_its_own_rank(side):
    """Engines of 2 and 1 TP ranks: world = 1 + 2 + 1 = 4, offsets 1 and 3 (each TP rank joins as
    rank_offset + tp_rank); every rank of every engine receives every tensor."""
    common = _common_path(side)
    engines = [FakeEngine(2, common), FakeEngine(1, common)]
    try:
        buckets = [_bucket(1), _bucket(2)]
        _push([e.url for e in engines], buckets, tp_sizes=[2, 1])
        assert [(b["world_size"], b["rank_offset"]) for e in engines for b in e.init_bodies] == [(4, 1), (4, 3)]
        expected = [{n: t.double().sum().item() for n, t in bucket} for bucket in buckets]
        for engine in engines:
            assert engine.received == [[want] * engine.tp_size for want in expected]
    finally:
        for e in engines:
            e.close()

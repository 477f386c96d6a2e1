"""``plugrl serve``: an HTTP server speaking the part of SGLang's native API that RL uses, around the
embedded ``HFRolloutEngine``. Runs as its own process (one per rollout engine), started by the
``sglang`` backend in place of ``python -m sglang.launch_server`` where SGLang is not installed
(CPU machines, tests), or by hand. Field names and defaults follow SGLang's
``GenerateReqInput`` / ``*ReqInput`` structs and ``http_server.py`` (see ``sglang_names.json``).

Differences from SGLang, all deliberate:
  * one prompt per ``/generate`` (no batch lists), no streaming, no per-``rid`` abort (the hf engine
    aborts everything at once: ``{"abort_all": true}``, which is what slime sends);
  * ``/update_weights_from_tensor`` takes SGLang's ``load_format == "flattened_bucket"`` only (CUDA
    IPC handles, or ``/dev/shm`` names for CPU tensors; see ``wire.py``), not SGLang's per-tensor
    formats (``None``/``direct``/custom loaders);
  * ``/init_weights_update_group`` takes ``backend`` ``gloo`` (or ``nccl`` on CUDA); the server is one
    TP rank (``rank_offset + 0``);
  * ``/pause_generation`` supports SGLang's default mode ``abort`` only.

Behaviour kept exactly as SGLang's (the backend must cope with it; the tests rely on it):
  * memory tags: ``release`` adds each tag to a set, ``resume`` removes each one, None/[] meaning all
    (managers/scheduler_components/weight_updater.py ``release_memory_occupation`` /
    ``resume_memory_occupation``); resuming a tag that is not released raises KeyError in SGLang's
    scheduler, which takes the whole server down: here the server answers 500 and is dead from then on;
  * the weights update group is joined with SGLang's store naming (``weights.custom_group``);
  * ``input_token_logprobs`` for ``logprob_start_len=s``: one entry per prompt token from s on, the first
    None, all at temperature 1 (SGLang computes input log-probs with a plain log-softmax);
  * weight-update sessions (``/begin_weight_update``, ``/end_weight_update``): ``--weight-update-session``
    picks SGLang 0.5.21's behaviour (``required``: updates outside a session answer 400), the routes'
    absence before 0.5.21 (``absent``: 404), or both kinds of client (``optional``, the default).
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import contextlib
import datetime
import json
import logging
import os
import pickle
import time
import uuid

from aiohttp import web

from . import wire
from .compat import MEMORY_TAGS, SERVE_VERSION, resolve_tags
from .weights import custom_group, destroy_group

logger = logging.getLogger(__name__)
VERSION = SERVE_VERSION
WEIGHT_UPDATE_SESSIONS = ("optional", "required", "absent")
SERVE_ONLY_FLAGS = ("weight_update_session",)  # plugrl serve's own; every other flag is SGLang's spelling
# the hf engine's names for --dtype (unset: the checkpoint's)
SERVE_DTYPES = ("auto", "bfloat16", "bf16", "float16", "fp16", "half", "float32", "fp32", "float")


def _error(message: str, status: int = 400) -> web.Response:
    # SGLang's _create_error_response shape.
    return web.json_response({"error": {"message": str(message)}}, status=status)


async def _json(request: web.Request) -> dict:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError as exc:  # not JSON: the client's mistake (400), not the server's (500)
        raise web.HTTPBadRequest(text=json.dumps({"error": {"message": f"request body is not JSON: {exc}"}}),
                                 content_type="application/json") from exc
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise TypeError("request body must be a JSON object")
    return body


class EngineServer:
    """Routes of one engine. ``engine`` is an ``HFRolloutEngine``; ``model_path`` is reported by
    ``/get_server_info``."""

    def __init__(self, engine, *, model_path: str, device: str, tp_size: int = 1,
                 weight_update_session: str = "optional"):
        if weight_update_session not in WEIGHT_UPDATE_SESSIONS:
            raise ValueError(f"weight_update_session must be one of {WEIGHT_UPDATE_SESSIONS}, got {weight_update_session!r}")
        self.engine, self.model_path, self.device, self.tp_size = engine, model_path, device, tp_size
        # SGLang up to 0.5.20 has no /begin_weight_update ("absent"); 0.5.21 on refuse updates outside a
        # session ("required"); "optional" serves both kinds of client.
        self.weight_update_session = weight_update_session
        self._session_open = False
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._paused_waiting = 0
        self._groups: dict[str, tuple] = {}  # group_name -> (process group, rank, backend)
        self._offload_tags: set[str] = set()  # SGLang's SchedulerWeightUpdaterManager.offload_tags
        self._died: str | None = None  # set when SGLang's scheduler would have crashed

    @web.middleware
    async def _dead(self, request: web.Request, handler):
        # A crashed SGLang scheduler kills the server: every later request fails.
        if self._died is not None:
            return web.json_response({"error": {"message": f"server is dead: {self._died}"}},
                                     status=503 if request.path in ("/health", "/health_generate") else 500)
        return await handler(request)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 31, middlewares=[self._dead])  # weight buckets are large
        r = app.router
        r.add_route("POST", "/generate", self.generate)
        r.add_route("PUT", "/generate", self.generate)
        r.add_post("/abort_request", self.abort_request)
        r.add_route("*", "/flush_cache", self.flush_cache)
        r.add_get("/health", self.health)
        r.add_get("/health_generate", self.health_generate)
        r.add_get("/get_server_info", self.server_info)
        r.add_get("/get_model_info", self.model_info)
        r.add_get("/v1/loads", self.loads)
        r.add_post("/pause_generation", self.pause)
        r.add_post("/continue_generation", self.resume)
        r.add_post("/update_weights_from_tensor", self.update_from_tensor)
        r.add_post("/init_weights_update_group", self.init_group)
        r.add_post("/destroy_weights_update_group", self.destroy_group)
        r.add_post("/update_weights_from_distributed", self.update_from_distributed)
        if self.weight_update_session != "absent":
            r.add_post("/begin_weight_update", self.begin_weight_update)
            r.add_post("/end_weight_update", self.end_weight_update)
        r.add_route("*", "/release_memory_occupation", self.release_memory)
        r.add_route("*", "/resume_memory_occupation", self.resume_memory)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _cleanup(self, _app) -> None:
        for group, *_ in self._groups.values():
            destroy_group(group)
        self._groups.clear()
        await asyncio.to_thread(self.engine.close)

    # ------------------------------------------------------------------ generation
    async def generate(self, request: web.Request) -> web.Response:
        try:
            body = await _json(request)
            prompt = self._prompt(body)
            if body.get("stream"):
                raise ValueError("stream=true is not supported by plugrl serve")
            params = body.get("sampling_params") or {}
            if not isinstance(params, dict):
                raise TypeError("sampling_params must be one object (batch requests are not supported)")
            params = {"max_new_tokens": 128, **params}  # SGLang's SamplingParams default
        except (ValueError, TypeError) as exc:
            return _error(exc)
        started = time.perf_counter()
        if not self._resumed.is_set():  # paused: new requests wait for /continue_generation
            self._paused_waiting += 1
            try:
                await self._resumed.wait()
            finally:
                self._paused_waiting -= 1
        try:
            out = await self.engine.generate(prompt, params)
        except (ValueError, RuntimeError) as exc:
            return _error(exc)
        meta = {
            "id": body.get("rid") or uuid.uuid4().hex,
            "finish_reason": {k: v for k, v in out["finish_reason"].items() if v is not None or k == "matched"},
            "prompt_tokens": out["prompt_tokens"],
            "completion_tokens": out["completion_tokens"],
            "cached_tokens": out.get("cached_tokens", 0),
            "weight_version": out["weight_version"],
            "e2e_latency": time.perf_counter() - started,
        }
        if body.get("return_logprob"):
            # SGLang: one (logprob, token_id, text) triple per output token; text is None unless
            # return_text_in_logprobs.
            meta["output_token_logprobs"] = [[lp, tok, None] for lp, tok in zip(out["log_probs"], out["tokens"])]
            start = body.get("logprob_start_len")
            if start is not None and start >= 0:
                if start > len(prompt):  # SGLang aborts such a request with this reason
                    return _error(f"logprob_start_len={start} is higher than the number of input tokens {len(prompt)}")
                meta["input_token_logprobs"] = await self._input_logprobs(prompt, int(start))
        return web.json_response({"text": out["text"], "output_ids": out["tokens"], "meta_info": meta})

    async def _input_logprobs(self, prompt: list[int], start: int) -> list:
        """SGLang's ``input_token_logprobs`` for ``logprob_start_len=start``: one triple per prompt token from
        ``start`` on, the first always None (SGLang computes the positions from ``start`` and shifts them by
        one: ``[None] + computed[:-1]``), at temperature 1 whatever the request's sampling temperature."""
        n = len(prompt) - start - 1  # tokens start+1 .. end have a log-prob
        if n < 0:
            return []
        lps = (await asyncio.to_thread(self.engine.log_probs_of, [prompt], [n], 1.0))[0] if n > 0 else []
        return [[None, prompt[start], None]] + [[lp, tok, None] for lp, tok in zip(lps, prompt[start + 1:])]

    def _prompt(self, body: dict) -> list[int]:
        ids, text = body.get("input_ids"), body.get("text")
        if ids is not None:
            if not isinstance(ids, list) or (ids and isinstance(ids[0], list)):
                raise ValueError("input_ids must be one list of ints (batch requests are not supported)")
            return [int(t) for t in ids]
        if isinstance(text, str):
            return self.engine.tokenizer.encode(text)
        raise ValueError("give input_ids (list of ints) or text (string)")

    async def abort_request(self, request: web.Request) -> web.Response:
        body = await _json(request)
        if not body.get("abort_all"):
            return _error("plugrl serve aborts all requests at once; send {\"abort_all\": true}")
        await self.engine.abort_all()
        return web.Response(status=200)

    async def loads(self, request: web.Request) -> web.Response:
        stats = self.engine.load_stats()
        load = {"dp_rank": 0, "timestamp": time.time(), "num_running_reqs": stats["num_running"],
                "num_waiting_reqs": stats["num_waiting"] + self._paused_waiting}
        return web.json_response({"timestamp": datetime.datetime.now(datetime.UTC).isoformat(),
                                  "version": VERSION, "accelerator": self.device,
                                  "num_accelerators": self.tp_size, "loads": [load]})

    async def pause(self, request: web.Request) -> web.Response:
        body = await _json(request)
        mode = body.get("mode", "abort")
        if mode != "abort":
            return _error(f"pause mode {mode!r} is not supported by plugrl serve (only 'abort')")
        self._resumed.clear()
        await self.engine.abort_all()
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def resume(self, request: web.Request) -> web.Response:
        self._resumed.set()
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    def _busy(self) -> int:
        stats = self.engine.load_stats()
        return stats["num_running"] + stats["num_waiting"]

    async def flush_cache(self, request: web.Request) -> web.Response:
        # The hf engine keeps no prefix cache; like SGLang, refuse while requests are in flight.
        ok = self._busy() == 0
        return web.Response(text="Cache flushed.\n" if ok else "Cache not flushed: requests in flight.\n",
                            status=200 if ok else 400)

    # ------------------------------------------------------------------ status
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.engine.health() else 503)

    async def health_generate(self, request: web.Request) -> web.Response:
        # SGLang generates one token unless the server is busy; same here (skip while busy/paused).
        if not self.engine.health():
            return web.Response(status=503)
        if self._busy() or not self._resumed.is_set() or getattr(self.engine, "_released", None):
            return web.Response(status=200)
        try:
            await asyncio.wait_for(self.engine.generate([0], {"max_new_tokens": 1, "temperature": 0.0}), 20)
        except (TimeoutError, ValueError, RuntimeError) as exc:  # any failure means unhealthy
            logger.warning("health_generate failed: %r", exc)
            return web.Response(status=503)
        return web.Response(status=200)

    async def server_info(self, request: web.Request) -> web.Response:
        # enable_deterministic_inference: the hf engine honours sampling_seed always (SGLang only
        # with --enable-deterministic-inference); the backend reads this field.
        return web.json_response({"enable_deterministic_inference": True,
            "model_path": self.model_path, "tokenizer_path": self.model_path, "tp_size": self.tp_size,
            "dp_size": 1, "device": self.device, "weight_version": self.engine.weight_version,
            "context_length": self.engine.context_length, "max_running_requests": self.engine.max_batch_size,
            "max_prefill_tokens": self.engine.max_prefill_tokens, "internal_states": [], "version": VERSION,
        })

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response({"model_path": self.model_path, "tokenizer_path": self.model_path,
                                  "is_generation": True, "weight_version": self.engine.weight_version})

    # ------------------------------------------------------------------ weights and memory
    async def _load(self, pairs, body: dict) -> web.Response:
        if body.get("abort_all_requests"):
            await self.engine.abort_all()
        version = body.get("weight_version")
        try:
            # update_weights waits for the decode thread to park: keep it off the event loop.
            await asyncio.to_thread(self._update_weights, pairs, self.engine.weight_version if version is None else version)
        except (ValueError, TypeError, KeyError) as exc:
            return web.json_response({"success": False, "message": str(exc)}, status=400)
        finally:
            pairs.clear()  # views of the sender's memory: let it go before we answer
        message = "Succeeded to update model weights."
        if version is not None:
            message += f" Weight version updated to {version}."
        return web.json_response({"success": True, "message": message})

    def _update_weights(self, pairs: list, version) -> None:
        self.engine.update_weights(pairs, version)
        if self.engine.device.type == "cuda":
            # The copies out of the sender's IPC memory are asynchronous; the sender frees that memory
            # once we answer, so they must be finished by then.
            import torch

            torch.cuda.synchronize(self.engine.device)

    async def begin_weight_update(self, request: web.Request) -> web.Response:
        await _json(request)
        if self._session_open:
            return web.json_response({"success": False, "message": (
                "a weight-update session is already open; call end_weight_update() first")}, status=400)
        self._session_open = True
        return web.json_response({"success": True, "message": "Success"})

    async def end_weight_update(self, request: web.Request) -> web.Response:
        await _json(request)
        if not self._session_open:
            return web.json_response({"success": False, "message": (
                "no weight-update session is open; call begin_weight_update() first")}, status=400)
        self._session_open = False
        return web.json_response({"success": True, "message": "Success"})

    def _outside_session(self, endpoint: str) -> web.Response | None:
        """SGLang 0.5.21 on refuses an update outside a session before reading or joining anything."""
        if self.weight_update_session == "required" and not self._session_open:
            return web.json_response({"success": False, "message": (
                f"{endpoint} must run between begin_weight_update() and end_weight_update()")}, status=400)
        return None

    async def update_from_tensor(self, request: web.Request) -> web.Response:
        body = await _json(request)
        if refused := self._outside_session("update_weights_from_tensor"):
            return refused
        load_format = body.get("load_format")
        entries = body.get("serialized_named_tensors")
        if not isinstance(entries, list) or not entries:
            return web.json_response({"success": False, "message": (
                "serialized_named_tensors must be a non-empty list (one entry per TP rank)")}, status=400)
        try:
            if load_format == wire.FLATTENED_BUCKET:
                # SGLang: TP rank r deserializes entry r; this server is TP rank 0 of a one-rank engine.
                pairs = await asyncio.to_thread(wire.decode_flattened_bucket, entries[0])
            else:
                return web.json_response({"success": False, "message": (
                    f"plugrl serve takes load_format={wire.FLATTENED_BUCKET!r} (SGLang's flattened bucket), "
                    f"got {load_format!r}")}, status=400)
        except (ValueError, TypeError, KeyError, RuntimeError, pickle.UnpicklingError, binascii.Error) as exc:
            # RuntimeError: the handle does not open here (another host, or memory already freed).
            return web.json_response({"success": False, "message": f"bad serialized_named_tensors: {exc}"}, status=400)
        return await self._load(pairs, body)

    async def init_group(self, request: web.Request) -> web.Response:
        body = await _json(request)
        name = body.get("group_name", "weight_update_group")
        backend = body.get("backend", "nccl")
        allowed = ("gloo", "nccl") if self.engine.device.type == "cuda" else ("gloo",)
        if backend not in allowed:
            return web.json_response({"success": False, "message": (
                f"plugrl serve on {self.engine.device.type} joins {' or '.join(allowed)} groups only "
                f"(backend={backend!r})")}, status=400)
        try:
            # model_runner.py init_weights_update_group: rank = rank_offset + tp_rank (this server is TP rank 0).
            rank = int(body["rank_offset"]) + 0
            group = await asyncio.to_thread(custom_group, backend, body["master_address"], int(body["master_port"]),
                                            rank, int(body["world_size"]), name, 120.0)
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:  # bad body, or rendezvous failed
            return web.json_response({"success": False, "message": f"init_weights_update_group failed: {exc!r}"},
                                     status=400)
        self._groups[name] = (group, rank, backend)
        return web.json_response({"success": True, "message": "Succeeded to initialize custom process group."})

    async def destroy_group(self, request: web.Request) -> web.Response:
        body = await _json(request)
        name = body.get("group_name", "weight_update_group")
        entry = self._groups.pop(name, None)
        found = entry is not None
        if found:
            destroy_group(entry[0])
        return web.json_response({"success": found, "message": "destroyed" if found else f"no group {name!r}"},
                                 status=200 if found else 400)

    async def update_from_distributed(self, request: web.Request) -> web.Response:
        body = await _json(request)
        if refused := self._outside_session("update_weights_from_distributed"):
            return refused
        name = body.get("group_name", "weight_update_group")
        if name not in self._groups:
            return web.json_response({"success": False, "message": f"no weights update group {name!r}"}, status=400)
        group, _rank, backend = self._groups[name]
        try:
            specs = list(zip(body["names"], body["dtypes"], body["shapes"], strict=True))
            device = self.engine.device if backend == "nccl" else "cpu"  # gloo carries host memory
            pairs = await asyncio.to_thread(_receive, group, specs, device)
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:  # bad specs, or the group broke
            return web.json_response({"success": False, "message": f"broadcast failed: {exc!r}"}, status=400)
        return await self._load(pairs, body)

    async def release_memory(self, request: web.Request) -> web.Response:
        return await self._memory(request, release=True)

    async def resume_memory(self, request: web.Request) -> web.Response:
        return await self._memory(request, release=False)

    async def _memory(self, request: web.Request, *, release: bool) -> web.Response:
        body = await _json(request) if request.method != "GET" else {}
        tags = resolve_tags(body.get("tags"))
        if not release:
            missing = [t for t in tags if t not in self._offload_tags]
            if missing:
                # SGLang: offload_tags.remove(tag) raises KeyError in the scheduler, which dies.
                self._died = (f"KeyError {missing[0]!r} in resume_memory_occupation (tags={list(tags)}, released="
                              f"{sorted(self._offload_tags)}): resuming a tag that is not released kills SGLang")
                logger.error("%s", self._died)
                return web.json_response({"error": {"message": self._died}}, status=500)
            self._offload_tags.difference_update(tags)
        fn = self.engine.release_memory if release else self.engine.resume_memory
        known = [t for t in tags if t in MEMORY_TAGS]  # SGLang ignores other tags beyond the bookkeeping
        try:
            if known:
                await asyncio.to_thread(fn, known)
        except (ValueError, RuntimeError) as exc:
            return _error(exc)
        if release:
            self._offload_tags.update(tags)
        return web.Response(status=200)


def _receive(group, specs, device="cpu") -> list:
    """Receive each tensor of ``specs`` [(name, dtype, shape)] by broadcast from rank 0, in order."""
    import torch
    import torch.distributed as dist

    pairs = []
    for name, dtype, shape in specs:
        tensor = torch.empty([int(s) for s in shape], dtype=wire.torch_dtype(dtype), device=device)
        dist.broadcast(tensor, src=0, group=group)  # as model_runner.py update_weights_from_distributed
        pairs.append((name, tensor))
    return pairs


def build_parser() -> argparse.ArgumentParser:
    """SGLang's spelling for every flag the backend passes to ``sglang.launch_server``, so the
    backend can start this server through the same code path; SGLang-only knobs are accepted and
    ignored (they tune GPU kernels the hf engine does not have)."""
    p = argparse.ArgumentParser(
        prog="plugrl serve", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="An HTTP server speaking the part of SGLang's native API that RL uses (/generate, "
                    "/update_weights_from_*, /release_memory_occupation, ...), around plugrl's embedded hf engine: "
                    "one process per engine, where SGLang is not installed. Flags use SGLang's names.")
    p.add_argument("--model-path", "--hf-checkpoint", dest="model_path", required=True,
                   help="a Hugging Face checkpoint folder (config.json, tokenizer, weights)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=30000, help="port to listen on (1-65535)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--random-seed", "--seed", dest="random_seed", type=int, default=0, help="sampling seed")
    p.add_argument("--tp-size", type=int, default=1, help="must be 1 (one device per engine)")
    p.add_argument("--base-gpu-id", type=int, default=0, help="the CUDA device index with --device cuda")
    p.add_argument("--dtype", default=None, help="weights dtype (bfloat16, float16, float32); default: the checkpoint's")
    p.add_argument("--context-length", type=int, default=None,
                   help="longest prompt + response in tokens; default: the model's max_position_embeddings")
    p.add_argument("--max-running-requests", type=int, default=256, help="requests decoded together")
    p.add_argument("--max-prefill-tokens", type=int, default=16384, help="prompt tokens prefilled together")
    p.add_argument("--weight-version", default="default", help="reported until the first weight update")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own model code")
    p.add_argument("--weight-update-session", choices=WEIGHT_UPDATE_SESSIONS, default="optional",
                   help="/begin_weight_update and /end_weight_update as SGLang 0.5.21 on has them (required: weight "
                        "updates outside a session are refused), as older SGLang (absent: no such routes), or both")
    for flag in ("--skip-server-warmup", "--enable-memory-saver"):
        p.add_argument(flag, action="store_true", help="accepted for SGLang compatibility")
    p.add_argument("--disable-prefill-cuda-graph", action="store_true", help="accepted for SGLang compatibility")
    for flag in ("--cuda-graph-bs", "--cuda-graph-bs-decode"):  # --sglang-cuda-graph-bs, as each version names it
        p.add_argument(flag, nargs="+", help="accepted for SGLang compatibility; ignored")
    for flag in ("--gpu-id-step", "--mem-fraction-static", "--log-level", "--nccl-port"):
        p.add_argument(flag, help="accepted for SGLang compatibility; ignored")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = _argument_problem(args)
    if problem:
        raise SystemExit(f"plugrl serve: {problem}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from plugrl.plugins.backends.hf.engine import HFRolloutEngine

    device = args.device
    if device == "cuda":
        device = f"cuda:{args.base_gpu_id}"
    options = {"weight_version": args.weight_version, "max_prefill_tokens": args.max_prefill_tokens,
               "trust_remote_code": args.trust_remote_code}
    if args.context_length is not None:
        options["context_length"] = args.context_length
    engine = HFRolloutEngine(args.model_path, device=device, dtype=args.dtype, seed=args.random_seed,
                             max_batch_size=args.max_running_requests, **options)
    server = EngineServer(engine, model_path=args.model_path, device=str(engine.device), tp_size=1,
                          weight_update_session=args.weight_update_session)
    def started(_aiohttp_line: str) -> None:  # run_app calls it once the socket listens
        print(f"plugrl serve: listening on http://{args.host}:{args.port} ({args.model_path} on {engine.device})",
              flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        web.run_app(server.app(), host=args.host, port=args.port, print=started, access_log=None)
    return 0


def _argument_problem(args) -> str | None:
    """What is wrong with the flags, checked before the model loads (one line, exit 1)."""
    if args.tp_size != 1:
        return "runs one device per engine (--tp-size 1)"
    if not os.path.isdir(args.model_path):  # transformers would read it as a hub repo id, with a confusing error
        return (f"--model-path {args.model_path} is not a directory; give a Hugging Face checkpoint folder (no model "
                "hub is used)")
    if not os.path.isfile(os.path.join(args.model_path, "config.json")):
        return (f"--model-path {args.model_path}: no config.json there, so it is not a Hugging Face checkpoint "
                "folder (a plugrl run's checkpoint is exported to one with `plugrl train --save-hf`)")
    if not 0 < args.port < 65536:
        return f"--port {args.port}: give a port from 1 to 65535"
    if args.dtype is not None and args.dtype not in SERVE_DTYPES:
        return f"--dtype {args.dtype}: give one of {', '.join(SERVE_DTYPES)}"
    import socket

    try:
        socket.getaddrinfo(args.host, args.port)
    except (socket.gaierror, UnicodeError) as exc:
        return f"--host {args.host}: not an address of this machine's network ({exc}); e.g. 127.0.0.1 or 0.0.0.0"
    from plugrl.core.flags import below_minimum

    too_small = below_minimum(args, ("context_length", "max_running_requests", "max_prefill_tokens"))
    if too_small:
        return too_small[0]
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "--device cuda: this torch sees no CUDA device; use --device cpu"
        if not 0 <= args.base_gpu_id < torch.cuda.device_count():
            return f"--base-gpu-id {args.base_gpu_id}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


if __name__ == "__main__":
    raise SystemExit(main())

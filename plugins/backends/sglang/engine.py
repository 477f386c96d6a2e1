"""``SGLangRolloutBackend``: the rollout manager's engine contract (``core.protocols.RolloutEngine``)
over HTTP, through the real ``sglang_router`` in front of N SGLang engines.

Runs inside the rollout manager. It either launches the engines (``python -m sglang.launch_server``
with per-engine flags, or any command with the same flags: ``launch_command`` /
``$PLUGRL_SGLANG_LAUNCH_COMMAND``, e.g. ``plugrl serve``) or uses running ones
(``external_engine_addrs``), waits for ``/health_generate``, starts the router and registers every
engine with ``POST /workers``. ``generate`` is async (called on the rollout manager's event loop);
weight, memory and health calls are sync (called from the actor thread), as for the ``hf`` engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
from typing import Any

from . import compat, launch
from .weights import DistributedPusher, master_address, push_tensor, require_local, update_session

logger = logging.getLogger(__name__)

DEFAULT_STARTUP_TIMEOUT = 1800.0  # seconds an engine may take to answer /health_generate

_OPTIONS = {
    "num_engines", "gpus_per_engine", "external_engine_addrs", "launch_command", "host", "router_url",
    "router_settings", "router_request_timeout_secs", "server_overrides", "memory_saver",
    "weight_transport", "update_weight_buffer_size", "startup_timeout", "request_retries",
    "retry_interval", "abort_poll_interval", "engine_env", "engine_gpu_ids", "keep_logs", "args",
}


def _options_from_args(args) -> dict:
    """The run-config values this backend reads (slime's flag names)."""
    from plugrl.plugins.backends.sglang.options import router_settings, server_overrides

    per_engine = int(getattr(args, "rollout_num_gpus_per_engine", 1) or 1)
    total = getattr(args, "rollout_num_gpus", None)
    values = {
        "gpus_per_engine": per_engine,
        "num_engines": max(1, int(total) // per_engine) if total else None,
        "external_engine_addrs": getattr(args, "rollout_external_engine_addrs", None),
        "router_settings": router_settings(args),
        "server_overrides": server_overrides(args),
        "memory_saver": bool(getattr(args, "offload_rollout", False) or getattr(args, "colocate", False)),
        # slime §7.5: colocated runs push tensors, decoupled ones broadcast over a process group.
        "weight_transport": "tensor" if getattr(args, "colocate", False) else "distributed",
        "router_request_timeout_secs": getattr(args, "sglang_router_request_timeout_secs", None),
        "update_weight_buffer_size": getattr(args, "update_weight_buffer_size", None),
        "engine_gpu_ids": getattr(args, "engine_gpu_ids", None),  # set by the driver from the placement
    }
    if getattr(args, "sglang_router_ip", None) and getattr(args, "sglang_router_port", None):
        values["router_url"] = f"http://{args.sglang_router_ip}:{args.sglang_router_port}"
    return {k: v for k, v in values.items() if v is not None}


class SGLangRolloutBackend:
    """See the module docstring. Options (keyword; ``args`` = the run config fills the rest):
    ``num_engines`` (default 1), ``gpus_per_engine`` (SGLang tp size, default 1),
    ``external_engine_addrs`` (``host:port`` list: launch nothing), ``launch_command``,
    ``host`` (default 127.0.0.1), ``router_url`` (use a running router), ``router_settings``
    (router flags without ``--``/``router-``), ``router_request_timeout_secs`` (14400),
    ``server_overrides`` (extra ServerArgs fields), ``memory_saver`` (colocated: SGLang's
    ``--enable-memory-saver``), ``weight_transport`` (``tensor`` | ``distributed``),
    ``update_weight_buffer_size`` (bytes per bucket, 512 MiB), ``startup_timeout`` (s, 1800),
    ``request_retries`` (60, 1 s apart, as slime), ``abort_poll_interval`` (s), ``engine_env``,
    ``keep_logs`` (keep the engine/router logs under ``log_dir`` after ``close``; kept anyway when
    startup fails)."""

    # The rollout manager may pass the run config as ``args=`` (HFRolloutEngine takes no such option).
    accepts_run_config = True

    def __init__(self, hf_checkpoint: str, *, device: str | None = None, seed: int = 0,
                 max_batch_size: int = 256, **options):
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise TypeError(f"SGLangRolloutBackend: unknown options {unknown}; known: {sorted(_OPTIONS)}")
        args = options.pop("args", None)
        if args is not None:
            options = {**_options_from_args(args), **options}
        # checkpoint_fp8_config imports torch: keep it out of module import.
        import httpx

        from .fp8 import checkpoint_fp8_config

        self.hf_checkpoint, self.device, self.seed = hf_checkpoint, device, int(seed)
        self.max_batch_size = int(max_batch_size)
        self.host = options.get("host", "127.0.0.1")
        self.retries = int(options.get("request_retries", 60))
        self.retry_interval = float(options.get("retry_interval", 1.0))
        self.abort_poll_interval = float(options.get("abort_poll_interval", 0.2))
        self.buffer_size = int(options.get("update_weight_buffer_size", 512 << 20))
        self.transport = options.get("weight_transport", "tensor")
        if self.transport not in ("tensor", "distributed"):
            raise ValueError(f"weight_transport must be 'tensor' or 'distributed', got {self.transport!r}")
        self._options = options
        if self.transport == "tensor":
            # ``tensor`` shares memory by handle: a remote external engine fails here, before any
            # start-up wait, rather than at the first weight push (engines we launch run on this host).
            require_local(self._external_urls())
        # Per engine, from /get_server_info at start: TP ranks (one tensor handle each, and the
        # weights update group's layout) and whether sampling_seed is honoured.
        self._tp_sizes: list[int] = []
        self.reproducible_sampling = False
        self._released: set[str] = set()  # memory tags released on the engines (SGLang's offload_tags)
        self._children: list[launch.Child] = []
        self._router: launch.Child | None = None
        self._pusher: DistributedPusher | None = None
        self._sessionless: set[str] = set()  # engines without weight-update sessions (SGLang before 0.5.21)
        self._async_clients: dict[int, Any] = {}  # one AsyncClient per event loop
        self._weight_version = "default"
        # slime §6.5: engines serving an FP8 checkpoint get block-quantized weights on every push.
        self.fp8_config = checkpoint_fp8_config(hf_checkpoint)
        self.log_dir = launch.new_log_dir()
        self._keep_logs = bool(options.get("keep_logs", False))
        self.client = httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0), trust_env=False)
        try:
            self.worker_urls = self._start_engines()
            self._check_servers()
            self.router_url = self._start_router()
        except BaseException:
            self._keep_logs = True  # the error names a log in there
            self.close()
            raise

    # ------------------------------------------------------------------ startup
    def _external_urls(self) -> list[str]:
        return [a if a.startswith("http") else f"http://{a}" for a in self._options.get("external_engine_addrs") or []]

    def _start_engines(self) -> list[str]:
        # A large model's load and CUDA-graph capture can take many minutes (slime waits as long as the
        # server process lives); a launched server that exits stops the wait at once (wait_until's child).
        timeout = float(self._options.get("startup_timeout", DEFAULT_STARTUP_TIMEOUT))
        if urls := self._external_urls():
            for url in urls:
                launch.wait_until(lambda u=url: self._ok(u + "/health_generate"), timeout=timeout,
                                  interval=0.5, what=f"external engine {url}")
            return urls
        prefix = launch.launch_prefix(self._options.get("launch_command"))
        if prefix == list(launch.DEFAULT_LAUNCH):  # refuse an unsupported install before a long start
            compat.check_version(compat.installed_version(), "the installed sglang package")
        n, per = int(self._options.get("num_engines", 1)), int(self._options.get("gpus_per_engine", 1))
        memory_saver = bool(self._options.get("memory_saver", False))
        defaults = {}
        overrides = dict(self._options.get("server_overrides") or {})
        fields = compat.installed_server_fields()  # empty without sglang here: then neither is renamed nor added
        if memory_saver and "disable_prefill_cuda_graph" in fields:
            # As slime for colocated engines: the prefill graph's memory is not released with the memory
            # saver's tags (0.5.15.post1 on have the flag; 0.5.9 has neither the flag nor the graph by default).
            defaults["disable_prefill_cuda_graph"] = True
        if "cuda_graph_bs" in overrides:  # --sglang-cuda-graph-bs: the installed server's name for it
            overrides[compat.cuda_graph_bs_field(fields)] = overrides.pop("cuda_graph_bs")
        gpu_ids = self._options.get("engine_gpu_ids")
        if gpu_ids is not None and len(gpu_ids) < n:
            raise ValueError(f"engine_gpu_ids names GPUs for {len(gpu_ids)} engines, {n} are launched")
        for i in range(n):
            port = launch.free_port(self.host)
            explicit = dict(self._options.get("engine_env") or {})
            # Colocated engines: slime's memory-saver environment (compat.COLOCATION_ENV); the child
            # gets exactly this environment (launch.start with inherit=False).
            env = compat.colocation_env(os.environ, explicit) if memory_saver else {**os.environ, **explicit}
            base_gpu_id = i * per
            if gpu_ids is not None:
                # The placement's GPUs for this engine (the rollout manager's own CUDA_VISIBLE_DEVICES,
                # set by Ray, shows one GPU only): the server counts from 0 within them.
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpu_ids[i])
                base_gpu_id = 0
            values = launch.server_args(
                model_path=self.hf_checkpoint, host=self.host, port=port, tp_size=per, base_gpu_id=base_gpu_id,
                seed=self.seed + i * per, memory_saver=memory_saver, device=self.device,
                overrides=overrides, nccl_port=launch.free_port(self.host),
                defaults=defaults)
            child = launch.start(f"engine{i}", [*prefix, *launch.flag_words(values)], log_dir=self.log_dir,
                                 env=env, inherit=False)
            child.url = f"http://{self.host}:{port}"
            self._children.append(child)
        for child in self._children:  # they load in parallel; wait for each
            launch.wait_until(lambda c=child: self._ok(c.url + "/health_generate"), timeout=timeout,
                              interval=0.5, what=f"{child.name} /health_generate", child=child)
        return [c.url for c in self._children]

    def _check_servers(self) -> None:
        """Read each engine's ``/get_server_info``: refuse unsupported SGLang versions, learn the TP
        sizes, say when sampling is not reproducible, and refuse FP8 pushes SGLang would misread."""
        infos = []
        for url in self.worker_urls:
            response = self.client.get(url + "/get_server_info")
            response.raise_for_status()
            info = response.json()
            compat.check_version(info.get("version"), f"engine {url}")
            infos.append(info)
        self._tp_sizes = [int(info.get("tp_size") or 1) for info in infos]
        self.reproducible_sampling = all(info.get("enable_deterministic_inference") for info in infos)
        if not self.reproducible_sampling:
            # SGLang keeps sampling_seed only with deterministic inference on (sampling/sampling_batch_info.py
            # builds the seed tensor only then); without it the seeds plugrl sends per sample change nothing.
            logger.warning("sglang engines run without --enable-deterministic-inference: the per-sample "
                           "sampling_seed is ignored and rollouts are not reproducible; pass "
                           "--sglang-enable-deterministic-inference for reproducible (slower) sampling")
        if self.fp8_config is not None:
            self._check_fp8_scales()

    def _check_fp8_scales(self) -> None:
        """Engines on sm_100 GPUs with JIT DeepGEMM keep FP8 block scales as UE8M0 after loading; the
        float32 ``weight_scale_inv`` plugrl pushes would be misread there (wrong rollouts, no error)."""
        ids = self._options.get("engine_gpu_ids")
        env = {**os.environ, **dict(self._options.get("engine_env") or {})}
        if self._external_urls() or ids is None or self.device == "cpu":
            logger.warning("FP8 weight pushes send float32 weight_scale_inv; engines on Blackwell (sm_100) GPUs with "
                           "JIT DeepGEMM expect UE8M0 scales and would serve wrong weights: run them with "
                           "SGLANG_ENABLE_JIT_DEEPGEMM=0 or on Hopper")
            return
        caps = _compute_caps()
        if not caps:
            logger.warning("nvidia-smi gave no compute capabilities: cannot check whether the engines expect UE8M0 "
                           "FP8 scales (Blackwell with JIT DeepGEMM); there, set SGLANG_ENABLE_JIT_DEEPGEMM=0")
        bad = compat.ue8m0_engines([max((caps.get(g) or (0, 0) for g in gpus), default=None) for gpus in ids], env)
        if bad:
            raise RuntimeError(
                f"engines {bad} run on sm_100 (Blackwell) GPUs where SGLang's JIT DeepGEMM keeps FP8 block scales as "
                f"UE8M0; plugrl pushes float32 weight_scale_inv, which these engines would misread (wrong rollouts "
                f"without an error). Set SGLANG_ENABLE_JIT_DEEPGEMM=0 in the engines' environment, or use a BF16 "
                f"checkpoint (drop the FP8 --hf-checkpoint)")

    def _start_router(self) -> str:
        url = self._options.get("router_url")
        if url is None:
            port = launch.free_port(self.host)
            argv = launch.router_argv(
                host=self.host, port=port, settings=dict(self._options.get("router_settings") or {}),
                request_timeout_secs=int(self._options.get("router_request_timeout_secs", 14400)),
                prometheus_port=launch.free_port(self.host))
            self._router = launch.start("router", argv, log_dir=self.log_dir)
            url = f"http://{self.host}:{port}"
            launch.wait_until(lambda: self._ok(url + "/workers"), timeout=60, interval=0.2,
                              what="the router", child=self._router)
        for worker in self.worker_urls:
            response = self.client.post(url + "/workers", json={"url": worker, "worker_type": "regular"})
            if response.status_code >= 300:
                raise RuntimeError(f"router refused worker {worker}: {response.status_code} {response.text}")
        launch.wait_until(lambda: set(self.worker_urls) <= set(self._router_workers(url)), timeout=60,
                          interval=0.2, what="the router to list every worker", child=self._router)
        return url

    def _router_workers(self, url: str | None = None) -> list[str]:
        body = self.client.get((url or self.router_url) + "/workers").json()
        return [w["url"] for w in body.get("workers", []) if isinstance(w, dict) and "url" in w]

    def _ok(self, url: str) -> bool:
        import httpx

        try:
            return self.client.get(url, timeout=30).status_code == 200
        except httpx.HTTPError:  # not up yet, or gone
            return False

    # ------------------------------------------------------------------ generation (event loop)
    def _async_client(self):
        import httpx

        loop = asyncio.get_running_loop()
        client = self._async_clients.get(id(loop))
        if client is None:
            limits = httpx.Limits(max_connections=max(64, self.max_batch_size * len(self.worker_urls)))
            client = httpx.AsyncClient(timeout=None, limits=limits, trust_env=False)
            self._async_clients[id(loop)] = client
        return client

    async def generate(self, input_ids: list[int], sampling_params: dict) -> dict:
        """POST the router's ``/generate`` (retried like slime's ``post``) -> the ``hf`` engine's dict."""
        payload = {"input_ids": [int(t) for t in input_ids], "sampling_params": dict(sampling_params),
                   "return_logprob": True}
        body = await self._post_router("/generate", payload)
        meta = body["meta_info"]
        pairs = meta.get("output_token_logprobs") or []
        return {
            "tokens": [int(p[1]) for p in pairs],
            "log_probs": [float(p[0]) for p in pairs],
            "text": body.get("text", ""),
            "finish_reason": dict(meta["finish_reason"]),
            "prompt_tokens": meta.get("prompt_tokens", len(input_ids)),
            "completion_tokens": meta.get("completion_tokens", len(pairs)),
            "cached_tokens": meta.get("cached_tokens", 0),
            "weight_version": str(meta.get("weight_version", "")),
        }

    async def _post_router(self, path: str, payload: dict) -> dict:
        import httpx

        client, last = self._async_client(), None
        for attempt in range(self.retries):
            try:
                response = await client.post(self.router_url + path, json=payload)
                if response.status_code == 200:
                    return response.json()
                last = f"HTTP {response.status_code}: {response.text[:500]}"
                if response.status_code < 500:  # a bad request does not get better by retrying
                    break
            except (httpx.HTTPError, ValueError) as exc:  # refused/reset/bad body: router or engine down
                last = repr(exc)
            if attempt + 1 < self.retries:
                await asyncio.sleep(self.retry_interval)
        raise RuntimeError(f"sglang router {self.router_url}{path} failed after {self.retries} attempt(s): {last}; "
                           f"engine health: {self.engine_health()}")

    async def abort_all(self) -> None:
        """slime's abort: every worker the router lists gets ``abort_request {abort_all}`` until its
        ``/v1/loads`` counts no request; then every in-flight ``generate`` has its partial answer."""
        await asyncio.gather(*(self._abort_worker(url) for url in self.worker_urls))

    async def _abort_worker(self, url: str) -> None:
        import httpx

        client = self._async_client()
        while True:
            await client.post(url + "/abort_request", json={"abort_all": True})
            try:
                response = await client.get(url + "/v1/loads", params={"include": "core"})
            except httpx.HTTPError as exc:  # as slime: a failing load query ends the retries
                logger.warning("abort: %s/v1/loads failed: %r", url, exc)
                return
            if response.status_code != 200:
                # Never read an error body as "no requests left": the push would then race requests.
                raise RuntimeError(f"abort: {url}/v1/loads answered {response.status_code} ({response.text[:200]}); "
                                   f"plugrl needs SGLang {compat.supported_range()} (/v1/loads is from 0.5.9)")
            try:
                count = _count_requests(response.json())
            except ValueError as exc:
                logger.warning("abort: %s/v1/loads returned no JSON: %r", url, exc)
                return
            if count == 0:
                return
            await asyncio.sleep(self.abort_poll_interval)

    # ------------------------------------------------------------------ weights, memory (actor thread)
    @property
    def weight_version(self) -> str:
        return self._weight_version

    def update_weights(self, named_tensors, version: int | str) -> None:
        """pause -> flush -> begin session (SGLang 0.5.21 on) -> push buckets (``update_weight_buffer_size``
        each) -> end session -> continue. With an FP8 checkpoint the linears go out as float8_e4m3fn +
        ``weight_scale_inv`` (``fp8.py``)."""
        from plugrl.plugins.backends.hf.weights import flatten_named_tensors

        from .fp8 import fp8_named_tensors
        from .wire import bucket_by_size

        pairs = flatten_named_tensors(named_tensors)
        if self.fp8_config is not None:
            pairs = list(fp8_named_tensors(pairs, self.fp8_config))
        buckets = bucket_by_size(pairs, self.buffer_size)
        version = str(version)
        self._each("/pause_generation", {})
        try:
            self._flush()
            with update_session(self.client, self.worker_urls, self._sessionless):
                if self.transport == "tensor":
                    push_tensor(self.client, self.worker_urls, buckets, version, tp_sizes=self._tp_sizes)
                else:
                    if self._pusher is None:
                        on_cuda = any(t.is_cuda for _, t in pairs)
                        host = master_address(self.worker_urls, self.host)  # remote engines dial a routable one
                        self._pusher = DistributedPusher(self.client, self.worker_urls, host=host,
                                                         port=launch.free_port(host), backend="nccl" if on_cuda
                                                         else "gloo", tp_sizes=self._tp_sizes)
                    self._pusher.push(buckets, version)
        finally:
            self._each("/continue_generation", {})
        self._weight_version = version

    def _flush(self) -> None:
        # slime retries flush_cache until 200 (it is refused while requests are in flight).
        for url in self.worker_urls:
            launch.wait_until(lambda u=url: self.client.post(u + "/flush_cache").status_code == 200,
                              timeout=60, interval=0.2, what=f"{url}/flush_cache")

    def release_memory(self, tags=None, keep_weights: bool = True) -> None:
        """Release ``tags`` on every engine. Whether SGLang keeps a host copy of the weights is its own
        ``--enable-weights-cpu-backup`` (off: none, ``options.drops_released_weights``), so
        ``keep_weights`` asks nothing more of it."""
        tags = compat.resolve_tags(tags)
        self._flush()
        self._each("/release_memory_occupation", {"tags": list(tags)})
        self._released.update(tags)

    def resume_memory(self, tags=None) -> None:
        """Resume ``tags`` (None: every released one). Only released tags are sent: SGLang's scheduler
        dies of a KeyError when asked to resume a tag it does not hold released (resuming
        ``weights`` before the push and then everything is what crashed it)."""
        wanted = self._released if tags is None else set(compat.resolve_tags(tags))
        send = [t for t in compat.MEMORY_TAGS if t in wanted and t in self._released]
        send += sorted(t for t in wanted & self._released if t not in compat.MEMORY_TAGS)
        if not send:
            return
        self._each("/resume_memory_occupation", {"tags": send})
        self._released.difference_update(send)

    def _each(self, path: str, payload: dict) -> None:
        for url in self.worker_urls:
            response = self.client.post(url + path, json=payload)
            if response.status_code != 200:
                raise RuntimeError(f"{url}{path} failed ({response.status_code}): {response.text[:500]}")

    def log_probs_of(self, sequences, response_lengths, temperature: float = 1.0, *, worker: int = 0):
        """Teacher-forced log-probs of the last ``response_lengths[i]`` tokens from one engine (SGLang:
        ``/generate`` with ``max_new_tokens=0``, ``logprob_start_len`` and ``meta_info.input_token_logprobs``).
        SGLang's entry for the token at ``logprob_start_len`` is always None, so the request starts one token
        earlier; and it scores input tokens at temperature 1 whatever the sampling temperature, so only
        ``temperature=1`` can be asked for."""
        if float(temperature) != 1.0:
            raise ValueError(f"log_probs_of(temperature={temperature}): SGLang scores input tokens at temperature 1 "
                             "only (a plain log-softmax); ask for temperature 1")
        if isinstance(response_lengths, int):
            response_lengths = [response_lengths] * len(sequences)
        out = []
        for seq, n in zip(sequences, response_lengths):
            if not n:
                out.append([])
                continue
            if n >= len(seq):
                raise ValueError(f"log_probs_of: {n} response tokens of a {len(seq)}-token sequence; the first token "
                                 "of a sequence has no log-prob, so at most len - 1 can be scored")
            payload = {"input_ids": list(seq), "return_logprob": True, "logprob_start_len": len(seq) - n - 1,
                       "sampling_params": {"max_new_tokens": 0}}
            response = self.client.post(self.worker_urls[worker] + "/generate", json=payload)
            response.raise_for_status()
            entries = response.json()["meta_info"]["input_token_logprobs"]  # [None, lp(seq[-n]), ..., lp(seq[-1])]
            out.append([float(entry[0]) for entry in entries[-n:]])
        return out

    # ------------------------------------------------------------------ status
    def engine_health(self) -> dict:
        return {url: self._ok(url + "/health") for url in self.worker_urls}

    def health(self) -> bool:
        return all(self.engine_health().values())

    def load_stats(self) -> dict:
        running = waiting = 0
        for url in self.worker_urls:
            for load in self.client.get(url + "/v1/loads", params={"include": "core"}).json().get("loads", []):
                running += int(load.get("num_running_reqs") or 0)
                waiting += int(load.get("num_waiting_reqs") or 0)
        return {"num_running": running, "num_waiting": waiting}

    def close(self) -> None:
        """Kill what this backend started (engines, router); external engines stay up."""
        if self._pusher is not None:
            self._pusher.close()
            self._pusher = None
        for child in [*self._children, *([self._router] if self._router else [])]:
            child.stop()
        self._children, self._router = [], None
        self.client.close()
        # AsyncClients belong to their event loops (aclose must run there); their sockets close
        # when collected, and the servers they point at are gone now anyway.
        self._async_clients.clear()
        if not self._keep_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __del__(self):
        try:
            for child in [*self._children, *([self._router] if self._router else [])]:
                child.stop(timeout=2.0)
        except (OSError, AttributeError, TypeError):  # interpreter shutdown / half-built object
            return


def _compute_caps() -> dict[int, tuple[int, int]]:
    """Physical GPU index -> compute capability, from ``nvidia-smi`` (sees every GPU whatever this
    process's CUDA_VISIBLE_DEVICES); empty when it is missing."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    caps = {}
    for line in out.splitlines():
        index, _, cap = (p.strip() for p in line.partition(","))
        major, _, minor = cap.partition(".")
        if index.isdigit() and major.isdigit():
            caps[int(index)] = (int(major), int(minor or 0))
    return caps


def _count_requests(body: dict) -> int:
    """Requests still in an engine, from ``/v1/loads`` (slime's reading: ``num_reqs`` /
    ``num_total_reqs`` / ``total_reqs`` if present, else running + waiting, summed over ``loads``)."""
    total = 0
    for load in body.get("loads", [body]):
        for key in ("num_reqs", "num_total_reqs", "total_reqs"):
            if key in load:
                total += int(load[key] or 0)
                break
        else:
            total += int(load.get("num_running_reqs") or 0) + int(load.get("num_waiting_reqs") or 0)
    return total

"""Weight pushes from the rollout manager (holding the trainer's HF-named tensors) to every engine.

Two transports, as in slime §7.5:
  * ``tensor`` (colocated): per bucket and dtype, ``POST /update_weights_from_tensor`` with
    ``load_format="flattened_bucket"``: the bucket is copied once into memory the engine maps (CUDA
    IPC on GPU, ``/dev/shm`` on CPU; ``wire.SharedBucket``) and only handles travel over HTTP, so
    the engines must run on this host;
  * ``distributed`` (decoupled, any host): one ``init_weights_update_group`` (world = 1 + engines;
    this process is rank 0, engine i is rank 1 + i), then per bucket
    ``POST /update_weights_from_distributed`` to every engine while this process broadcasts each
    tensor in the same order.
The caller brackets either with pause -> flush -> ... -> continue.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import functools
import ipaddress
import socket
from urllib.parse import urlsplit

from . import wire


def push_tensor(client, urls: list[str], buckets: list[list], version: str, *,
                tp_sizes: list[int] | None = None) -> None:
    """Push ``buckets`` to every engine through shared memory (see the module docstring).
    ``tp_sizes``: TP ranks per engine (one handle each); default: each engine's ``/get_server_info``."""
    require_local(urls)
    if tp_sizes is None:
        tp_sizes = [_tp_size(client, url) for url in urls]
    for bucket in buckets:
        shared = wire.SharedBucket(bucket)
        try:
            for part in shared.parts:  # one request per dtype, as slime sends them
                payloads = []
                for tp in tp_sizes:  # one serialization per engine and TP rank: each pickle holds a reference
                    payload = {"serialized_named_tensors": shared.entries(part, tp),
                               "load_format": wire.FLATTENED_BUCKET, "flush_cache": False, "weight_version": version}
                    payloads.append(payload)
                _all_ok(client, urls, "/update_weights_from_tensor", payloads)
        finally:
            shared.release()  # every engine answered (or failed): the memory may go


def require_local(urls: list[str]) -> None:
    """``tensor`` shares memory by handle: refuse engines that do not run on this host."""
    remote = [url for url in urls if not _is_local_host(urlsplit(url if "://" in url else f"http://{url}").hostname)]
    if remote:
        raise ValueError(
            f"weight_transport='tensor' shares memory with the engines (CUDA IPC handles / /dev/shm names), so every "
            f"engine must run on this host; not local: {remote}. Use weight_transport='distributed' (what a run "
            f"without --colocate selects: init_weights_update_group + broadcast) for engines on other hosts.")


@functools.lru_cache(maxsize=256)
def _is_local_host(host: str | None) -> bool:
    """True when ``host`` resolves to an address of this machine: loopback, or one a socket can
    bind to (only addresses of local interfaces can be bound)."""
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return False
    for family, _, _, _, sockaddr in infos:
        address = sockaddr[0]
        if ipaddress.ip_address(address.split("%")[0]).is_loopback:
            return True
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((address, 0))
                return True
            except OSError:  # EADDRNOTAVAIL: not an address of this host
                continue
    return False


def _tp_size(client, url: str) -> int:
    response = client.get(url + "/get_server_info")
    response.raise_for_status()
    return int(response.json().get("tp_size") or 1)


class DistributedPusher:
    """This process's side of the weights update group. ``backend`` is ``gloo`` for CPU tensors
    (plugrl serve) and ``nccl`` for CUDA ones (real SGLang)."""

    def __init__(self, client, urls: list[str], *, host: str, port: int, backend: str,
                 group_name: str = "weight_update_group", timeout_s: float = 120.0):
        import torch.distributed as dist

        self.client, self.urls, self.group_name = client, list(urls), group_name
        world = 1 + len(urls)
        # Engines connect while this process hosts the store: post the joins from threads.
        with concurrent.futures.ThreadPoolExecutor(len(urls)) as pool:
            joins = [pool.submit(_post, client, url, "/init_weights_update_group", {
                "master_address": host, "master_port": port, "rank_offset": 1 + i, "world_size": world,
                "group_name": group_name, "backend": backend}) for i, url in enumerate(urls)]
            self.store = dist.TCPStore(host, port, world, is_master=True,
                                       timeout=datetime.timedelta(seconds=timeout_s))
            if backend == "gloo":
                self.group = dist.ProcessGroupGloo(self.store, 0, world)
            else:
                self.group = dist.ProcessGroupNCCL(self.store, 0, world)
            for join in joins:
                join.result()

    def push(self, buckets: list[list], version: str) -> None:
        import torch.distributed as dist

        for bucket in buckets:
            payload = {"names": [n for n, _ in bucket], "dtypes": [wire.dtype_name(t.dtype) for _, t in bucket],
                       "shapes": [list(t.shape) for _, t in bucket], "group_name": self.group_name,
                       "flush_cache": False, "weight_version": version}
            with concurrent.futures.ThreadPoolExecutor(len(self.urls)) as pool:
                posts = [pool.submit(_post, self.client, url, "/update_weights_from_distributed", payload)
                         for url in self.urls]
                for _, tensor in bucket:
                    opts = dist.BroadcastOptions()
                    opts.rootRank = 0
                    self.group.broadcast([tensor.detach().contiguous()], opts).wait()
                for post in posts:
                    post.result()

    def close(self) -> None:
        import httpx

        for url in self.urls:
            # The engine may be gone already; then there is nothing to release there.
            with contextlib.suppress(httpx.HTTPError):
                self.client.post(url + "/destroy_weights_update_group", json={"group_name": self.group_name})


def _post(client, url: str, path: str, payload: dict) -> dict:
    response = client.post(url + path, json=payload)
    try:
        body = response.json()
    except ValueError:
        body = {"message": response.text}
    if response.status_code != 200 or (isinstance(body, dict) and body.get("success") is False):
        raise RuntimeError(f"{url}{path} failed ({response.status_code}): {body}")
    return body


def _all_ok(client, urls: list[str], path: str, payloads: list[dict]) -> None:
    """POST ``payloads[i]`` to ``urls[i]`` concurrently; wait for every answer, then raise the first
    failure (the shared memory must outlive every request in flight)."""
    with concurrent.futures.ThreadPoolExecutor(len(urls)) as pool:
        futures = [pool.submit(_post, client, url, path, payload) for url, payload in zip(urls, payloads, strict=True)]
        concurrent.futures.wait(futures)
        for future in futures:
            future.result()

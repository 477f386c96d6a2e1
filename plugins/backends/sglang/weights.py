"""Weight pushes from the rollout manager (holding the trainer's HF-named tensors) to every engine.

Two transports, as in slime §7.5:
  * ``tensor`` (colocated): per bucket and dtype, ``POST /update_weights_from_tensor`` with
    ``load_format="flattened_bucket"``: the bucket is copied once into memory the engine maps (CUDA
    IPC on GPU, ``/dev/shm`` on CPU; ``wire.SharedBucket``) and only handles travel over HTTP, so
    the engines must run on this host;
  * ``distributed`` (decoupled, any host): one ``init_weights_update_group`` (this process is rank 0;
    every TP rank of every engine joins: world = 1 + sum of TP sizes, engine i's ranks start at the
    cumulative offset, ``compat.group_layout``), then per bucket ``POST /update_weights_from_distributed``
    to every engine while this process broadcasts each tensor in the same order.
The caller brackets either with pause -> flush -> ``update_session`` -> ... -> continue.
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


@contextlib.contextmanager
def update_session(client, urls: list[str], sessionless: set[str]):
    """Hold a weight-update session open on every engine for the pushes inside the block. SGLang 0.5.21 on
    applies ``update_weights_from_tensor``/``_distributed`` only between ``POST /begin_weight_update`` and
    ``/end_weight_update`` (and answers 400 otherwise: a distributed push would then broadcast to nobody
    and hang). Older servers have no such route (404); their URLs go into ``sessionless`` and are not asked
    again. The sessions are ended even when a push fails, so the engines take the next one."""
    opened = []
    try:
        for url in urls:
            if url in sessionless:
                continue
            if _begin_session(client, url):
                opened.append(url)
            else:
                sessionless.add(url)
        yield
    except BaseException:
        for url in opened:  # the push's own error is the one to report
            with contextlib.suppress(Exception):
                _post(client, url, "/end_weight_update", {})
        raise
    for url in opened:
        _post(client, url, "/end_weight_update", {})


def _begin_session(client, url: str) -> bool:
    """Open a session on one engine; False when the engine has none to open (404)."""
    response = client.post(url + "/begin_weight_update", json={})
    if response.status_code == 404:
        return False
    if response.status_code != 200:
        # "already open": a run that died mid-push (killed before its end call) left it open on an
        # engine that outlived it. Close it and open ours; a second refusal is reported.
        client.post(url + "/end_weight_update", json={})
        _post(client, url, "/begin_weight_update", {})
    return True


def require_local(urls: list[str]) -> None:
    """``tensor`` shares memory by handle: refuse engines that do not run on this host."""
    remote = [url for url in urls if not _is_local_host(_hostname(url))]
    if remote:
        raise ValueError(
            f"weight_transport='tensor' shares memory with the engines (CUDA IPC handles / /dev/shm names), so every "
            f"engine must run on this host; not local: {remote}. Use weight_transport='distributed' (what a run "
            f"without --colocate selects: init_weights_update_group + broadcast) for engines on other hosts.")


def _hostname(url: str) -> str | None:
    """The host of an engine address, given as ``http://host:port`` or ``host:port``."""
    return urlsplit(url if "://" in url else f"http://{url}").hostname


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


def master_address(urls: list[str], local: str) -> str:
    """The address engines dial to join the weights update group hosted by this process: ``local``
    (the engines' own host, e.g. loopback) when every engine runs here, else this host's address on
    the interface that routes to the first remote engine (a loopback address would make a remote
    engine dial itself until the group's timeout)."""
    remote = [host for host in map(_hostname, urls) if not _is_local_host(host)]
    if not remote:
        return local
    infos = socket.getaddrinfo(remote[0], None, proto=socket.IPPROTO_TCP)
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((sockaddr[0], 9))  # a UDP connect sends nothing: it only picks the route
            return probe.getsockname()[0]
        except OSError as exc:
            raise ValueError(f"no route from this host to engine {remote[0]} ({exc}): the engines could not "
                             "reach the weights update group hosted here") from exc


def _tp_size(client, url: str) -> int:
    response = client.get(url + "/get_server_info")
    response.raise_for_status()
    return int(response.json().get("tp_size") or 1)


def custom_group(backend: str, address: str, port: int, rank: int, world_size: int, group_name: str,
                 timeout_s: float):
    """Join the weights update group the way SGLang's engines do (utils/common.py
    ``init_custom_process_group``, called by model_executor/model_runner.py
    ``init_weights_update_group``): a ``tcp://`` rendezvous (rank 0 hosts the TCPStore), wrapped in
    ``PrefixStore(group_name)``, then torch's group helper under ``group_name``, which adds its own
    ``<group_name>/`` and ``<device>/`` prefixes. Every member must build the group this way: store
    keys under other prefixes are never seen, and each side waits for the other until the timeout
    (what a raw TCPStore on rank 0 did). Returns the process group; ``destroy_group`` frees it."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    timeout = datetime.timedelta(seconds=timeout_s)
    store, _, _ = next(c10d.rendezvous(f"tcp://{_host_for_url(address)}:{int(port)}", int(rank), int(world_size),
                                       timeout=timeout))
    store.set_timeout(timeout)
    store = dist.PrefixStore(group_name, store)
    group, _ = c10d._new_process_group_helper(int(world_size), int(rank), [], dist.Backend(backend), store,
                                              group_name=group_name, timeout=timeout)
    # As SGLang: group ranks are global ranks, so torch.distributed.broadcast(src=0, group=...) works.
    c10d._world.pg_group_ranks[group] = {i: i for i in range(int(world_size))}
    return group


def destroy_group(group) -> None:
    """Free a ``custom_group`` (and its name: a later group may use it again)."""
    import torch.distributed as dist

    with contextlib.suppress(ValueError, RuntimeError):  # already destroyed
        dist.destroy_process_group(group)


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class DistributedPusher:
    """This process's side of the weights update group (rank 0). ``backend`` is ``nccl`` when the pushed
    tensors are on CUDA and ``gloo`` for CPU tensors: the trainer's weights reach the rollout manager through
    Ray's object store as CPU tensors, so decoupled runs broadcast over gloo (host memory and TCP; SGLang
    receives into its CUDA parameters either way). ``tp_sizes``: TP ranks of each engine (default 1 each);
    they set the group's world size and each engine's ``rank_offset``."""

    def __init__(self, client, urls: list[str], *, host: str, port: int, backend: str,
                 group_name: str = "weight_update_group", timeout_s: float = 120.0,
                 tp_sizes: list[int] | None = None):
        from .compat import group_layout

        self.client, self.urls, self.group_name = client, list(urls), group_name
        tp_sizes = [1] * len(self.urls) if tp_sizes is None else [int(t) for t in tp_sizes]
        if len(tp_sizes) != len(self.urls):
            raise ValueError(f"tp_sizes names {len(tp_sizes)} engines, {len(self.urls)} URLs are given")
        world, offsets = group_layout(tp_sizes)
        self.world_size, self.rank_offsets = world, offsets
        # Engines connect while this process hosts the store (rank 0 waits for all of them): post
        # the joins from threads.
        pool = concurrent.futures.ThreadPoolExecutor(len(urls))
        joins = [pool.submit(_post, client, url, "/init_weights_update_group", {
            "master_address": host, "master_port": port, "rank_offset": offset, "world_size": world,
            "group_name": group_name, "backend": backend}) for url, offset in zip(self.urls, offsets)]
        self.group = None
        try:
            self.group = custom_group(backend, host, port, 0, world, group_name, timeout_s)
            for join in joins:
                join.result()
        except BaseException:
            if self.group is not None:  # an engine refused: free the name for the next attempt
                destroy_group(self.group)
            raise
        finally:
            # On failure, do not wait for engines still blocked in their own rendezvous.
            pool.shutdown(wait=False)

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
                    dist.broadcast(tensor.detach().contiguous(), src=0, group=self.group)
                for post in posts:
                    post.result()

    def close(self) -> None:
        import httpx

        for url in self.urls:
            # The engine may be gone already; then there is nothing to release there.
            with contextlib.suppress(httpx.HTTPError):
                self.client.post(url + "/destroy_weights_update_group", json={"group_name": self.group_name})
        if self.group is not None:
            destroy_group(self.group)
            self.group = None


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

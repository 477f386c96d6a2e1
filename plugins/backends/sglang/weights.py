"""Weight pushes from the rollout manager (holding the trainer's HF-named tensors) to every engine.

Two transports, as in slime §7.5:
  * ``tensor``: ``POST /update_weights_from_tensor`` per bucket (plugrl's CPU payload, ``wire.py``);
  * ``distributed``: one ``init_weights_update_group`` (world = 1 + engines; this process is rank 0,
    engine i is rank 1 + i), then per bucket ``POST /update_weights_from_distributed`` to every
    engine while this process broadcasts each tensor in the same order.
The caller brackets either with pause -> flush -> ... -> continue.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime

from . import wire


def push_tensor(client, urls: list[str], buckets: list[list], version: str) -> None:
    for bucket in buckets:
        payload = {"serialized_named_tensors": [wire.encode_named_tensors(bucket)],
                   "load_format": wire.LOAD_FORMAT, "flush_cache": False, "weight_version": version}
        _all_ok(client, urls, "/update_weights_from_tensor", payload)


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


def _all_ok(client, urls: list[str], path: str, payload: dict) -> None:
    with concurrent.futures.ThreadPoolExecutor(len(urls)) as pool:
        for future in [pool.submit(_post, client, url, path, payload) for url in urls]:
            future.result()

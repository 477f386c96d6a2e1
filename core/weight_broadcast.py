"""The weight broadcast group: train rank 0 (group rank 0) and every engine process on another GPU.

A torch.distributed process group of its own, built from a ``TCPStore`` that train rank 0 hosts,
outside the trainer's world (the engines are no part of it) and outside torch's global group
registry (so it never clashes with the trainer's default group). NCCL for CUDA engines, gloo on
CPU (the CPU tests run the same code). Joined once per run (``join``, in every member's process at
the same time: the group's rendezvous waits for all of them), looked up by name afterwards; per
push the sender and the receivers first vote (an all-reduce: a receiver whose model does not match
the manifest refuses, and nobody sends), then rank 0 broadcasts each flat bucket.
"""

from __future__ import annotations

import datetime
import logging
import socket

logger = logging.getLogger(__name__)

_GROUPS: dict[str, WeightGroup] = {}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class WeightGroup:
    def __init__(self, pg, rank: int, world_size: int, device, store):
        self.pg, self.rank, self.world_size, self.device = pg, rank, world_size, device
        self._store = store  # the rendezvous store must outlive the group

    def broadcast(self, tensor) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([tensor], opts).wait()
        if tensor.is_cuda:  # NCCL work is asynchronous to the host: done before the buffer is reused
            import torch

            torch.cuda.current_stream(tensor.device).synchronize()

    def vote(self, refuse: bool) -> int:
        """All-reduce of refusals: how many members refuse this push (0: everyone goes on)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if refuse else 0], dtype=torch.int32, device=self.device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        self.pg.allreduce([flag], opts).wait()
        return int(flag.item())


def join(name: str, address: str, port: int, rank: int, world_size: int, *, backend: str,
         timeout_s: float = 600.0) -> WeightGroup:
    """Join (or, on rank 0, host) group ``name``; every member calls this at the same time."""
    import torch
    import torch.distributed as dist

    if name in _GROUPS:
        return _GROUPS[name]
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(address, int(port), int(world_size), rank == 0, timeout=timeout, wait_for_workers=False)
    prefixed = dist.PrefixStore(f"plugrl_weights/{name}", store)
    if backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
        pg = dist.ProcessGroupNCCL(prefixed, int(rank), int(world_size))
    elif backend == "gloo":
        device = torch.device("cpu")
        pg = dist.ProcessGroupGloo(prefixed, int(rank), int(world_size), timeout)
    else:
        raise ValueError(f"weight broadcast backend must be nccl or gloo, got {backend!r}")
    group = WeightGroup(pg, int(rank), int(world_size), device, store)
    group.vote(False)  # the first collective: every member is connected once join returns
    _GROUPS[name] = group
    logger.info("weight broadcast group %s: rank %d of %d (%s)", name, rank, world_size, backend)
    return group


def get(name: str) -> WeightGroup:
    try:
        return _GROUPS[name]
    except KeyError:
        raise RuntimeError(f"this process has not joined the weight broadcast group {name!r}") from None


def leave(name: str) -> None:
    group = _GROUPS.pop(name, None)
    if group is not None:
        try:
            group.pg.shutdown() if hasattr(group.pg, "shutdown") else None
        except Exception as exc:  # noqa: BLE001 - a peer already gone: nothing left to release
            logger.debug("weight group %s shutdown: %s", name, exc)

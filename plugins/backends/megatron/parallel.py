"""torch.distributed and megatron-core model-parallel state for one train actor process.

Called once by the megatron backend's constructor inside each train actor. The rendezvous comes from
the standard env vars the train group sets (``MASTER_ADDR MASTER_PORT RANK WORLD_SIZE LOCAL_RANK``);
without them the process is a world of one (tests, a single-GPU run). nccl on CUDA, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelLayout:
    rank: int
    world_size: int
    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def use_cpu_rope_shim() -> None:
    """megatron-core places RoPE frequencies on ``torch.cuda.current_device()``; in a CPU-only train
    actor (debugging the backend on a laptop, CI) point that at the CPU. The actor process holds
    nothing else that asks CUDA for a device, so the process-wide patch is contained."""
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]


def init_parallel(tp_size: int, device: torch.device, seed: int, backend: str | None = None) -> ParallelLayout:
    """Join (or create) the process group (``backend``: ``--distributed-backend``, default nccl on
    CUDA, gloo on CPU), then split it into TP x DP groups (PP = CP = 1)."""
    from megatron.core import parallel_state, tensor_parallel

    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(minutes=30))
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    world = dist.get_world_size()
    if world % tp_size:
        raise ValueError(f"--tensor-model-parallel-size {tp_size} must divide the train world size {world} "
                         "(--actor-num-nodes x --actor-num-gpus-per-node)")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size, pipeline_model_parallel_size=1)
    if device.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        from megatron.core.tensor_parallel.random import initialize_rng_tracker

        use_cpu_rope_shim()
        # The CUDA RNG tracker forks CUDA generators; on CPU use the tracker that does not.
        initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
        torch.manual_seed(seed)
    return ParallelLayout(
        rank=dist.get_rank(), world_size=world, tp_size=tp_size,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(), dp_rank=parallel_state.get_data_parallel_rank(),
    )


def tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def dp_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()

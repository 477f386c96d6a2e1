"""megatron-core distributed checkpoints (``dist_checkpointing``, ``torch_dist`` format) of a GPTModel.

Runs wherever a GPTModel is built: in ``plugrl convert`` (one CPU process, gloo) and in the megatron
train actors (``--ref-load`` / ``--load``). A torch_dist checkpoint stores every tensor as a global
tensor (``metadata.json`` + PyTorch DCP ``.metadata`` and ``__R_T.distcp`` files, ``common.pt``),
so it loads at any tensor-parallel size: each rank reads its own slice.

Directory layout: ``save_torch_dist`` writes one checkpoint directory. ``is_torch_dist`` and
``load_torch_dist`` also accept a Megatron-LM save root (what slime passes as ``--ref-load``), whose
``latest_checkpointed_iteration.txt`` names the checkpoint: ``release`` -> ``ROOT/release``,
``N`` -> ``ROOT/iter_{N:07d}``. ``plugrl convert hf-to-megatron`` writes such a root.

CPU: megatron-core 0.16.1's synchronous torch_dist save calls CUDA twice even when every tensor is on
the CPU, and starts a spawn-context Manager process; ``_sync_save`` confines a workaround for both to
the save call. Loading needs no CUDA.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

TRACKER = "latest_checkpointed_iteration.txt"
BACKEND = "torch_dist"
# The key prefixes of a GPTModel's sharded state dict; other checkpoint keys (optimizer., rng_state)
# may be left unread when only the model is loaded.
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")


def checkpoint_dir(directory: str | Path) -> Path:
    """The directory holding the checkpoint's ``metadata.json``: ``directory`` itself, or the
    iteration named by its ``latest_checkpointed_iteration.txt`` (a Megatron-LM save root)."""
    directory = Path(directory)
    tracker = directory / TRACKER
    if (directory / "metadata.json").exists() or not tracker.exists():
        return directory
    name = tracker.read_text().strip()
    if name == "release":
        return directory / "release"
    if name.isdigit():
        return directory / f"iter_{int(name):07d}"
    raise ValueError(f"{tracker} holds {name!r}: expected 'release' or an iteration number")


def is_torch_dist(directory: str | Path) -> bool:
    """Whether ``directory`` (or the iteration its tracker names) is a torch_dist checkpoint."""
    try:
        metadata = checkpoint_dir(directory) / "metadata.json"
    except ValueError:
        return False
    if not metadata.is_file():
        return False
    try:
        return json.loads(metadata.read_text()).get("sharded_backend") == BACKEND
    except (json.JSONDecodeError, AttributeError):
        return False


def _require_torch_dist(directory: str | Path) -> Path:
    path = checkpoint_dir(directory)
    metadata = path / "metadata.json"
    if not metadata.is_file():
        raise FileNotFoundError(
            f"{directory} is not a torch_dist checkpoint: no {metadata} (make one from an HF checkpoint with "
            "`plugrl convert hf-to-megatron --hf-checkpoint HF --save DIR`; a train flag such as --ref-load also "
            "takes the HF directory itself; a plugrl run's checkpoint (rollout_N) is neither: its HF weights come "
            "from `plugrl train --save-hf`)")
    backend = json.loads(metadata.read_text()).get("sharded_backend")
    if backend != BACKEND:
        raise ValueError(f"{metadata}: sharded_backend {backend!r}, expected {BACKEND!r} (only torch_dist is read)")
    return path


@contextlib.contextmanager
def _sync_save() -> Iterator[None]:
    """megatron-core 0.16.1's synchronous torch_dist save, runnable on CPU and from any script.

    * Its writer hands results back through a module-global queue that it creates, on first use, as
      ``multiprocessing.get_context("spawn").Manager().Queue()``: a server process that re-imports
      ``__main__`` (fails in any script without an ``if __name__ == "__main__"`` guard) and costs
      seconds. That queue serves the asynchronous save; the synchronous one puts and gets in this
      process, so an in-process ``queue.Queue`` is set for the duration of the save.
    * Its only CUDA calls on that path: ``FileSystemWriterAsync.preload_tensors`` ends with
      ``torch.cuda.synchronize()`` (waiting for non-blocking device-to-host copies, of which CPU
      tensors have none) and ``save_state_dict_async_finalize`` allocates its write-failure flag on
      ``torch.cuda.current_device()`` to broadcast it (gloo broadcasts a CPU tensor just as well).
      Without usable CUDA both raise, so during the save the first is a no-op and the second names
      the CPU. With CUDA they are left alone."""
    import queue

    import torch
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous_queue = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()
    current_device, synchronize = torch.cuda.current_device, torch.cuda.synchronize
    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: "cpu"
        torch.cuda.synchronize = lambda device=None: None
    try:
        yield
    finally:
        torch.cuda.current_device, torch.cuda.synchronize = current_device, synchronize
        filesystem_async._results_queue = previous_queue


def save_torch_dist(model, directory: str | Path) -> Path:
    """Write ``model`` (a GPTModel, any TP; DP replicas write nothing twice) as a torch_dist checkpoint
    into ``directory``, which must be missing or empty. Collective: every rank of the default process
    group calls it with the same directory (on a filesystem all ranks share)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty: a torch_dist checkpoint is written into a new or "
                              "empty directory (remove it or choose another)")
    dist.barrier()  # every rank checked before rank 0 creates the directory
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    # Nested under "model" with checkpoint_version 3.0, as Megatron-LM's save_checkpoint does (the
    # tensor keys themselves are the model's state-dict names either way).
    state = {"model": model.sharded_state_dict(), "checkpoint_version": 3.0}
    with _sync_save():
        dist_checkpointing.save(state, str(directory), sharded_strategy=(BACKEND, 1))
    return directory


def tensors_metadata(directory: str | Path) -> dict:
    """``{key: ShardedTensor without data}`` (global shape and dtype) of a torch_dist checkpoint;
    reads only its ``.metadata`` file, no process group needed."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_tensors_metadata(str(_require_torch_dist(directory)))


def load_torch_dist(model, directory: str | Path) -> Path:
    """Load a torch_dist checkpoint into an already built GPTModel (any TP size, any dtype: tensors are
    cast on copy). Every parameter must be in the checkpoint and every model tensor of the checkpoint
    must be in the model; optimizer / RNG state in it is left unread. Collective over the default
    process group. Returns the checkpoint directory actually read."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint import CheckpointException

    path = _require_torch_dist(directory)
    try:
        # megatron's terms: "missing" = in the checkpoint only, "unexpected" = in the model only
        state, ckpt_only, model_only = dist_checkpointing.load(
            {"model": model.sharded_state_dict()}, str(path), strict=StrictHandling.RETURN_ALL)
    except (CheckpointingException, CheckpointException) as exc:
        # e.g. a global shape mismatch, raised by megatron's planner inside torch DCP's load
        raise ValueError(f"{path}: the checkpoint does not fit the model built from its config: {exc}") from exc
    # _extra_state objects carry Transformer Engine's FP8 metadata (None in the local spec): a checkpoint
    # written with the TE spec (slime's) has its own, which this model neither needs nor reads.
    foreign = sorted(key for key in ckpt_only if key.startswith(MODEL_PREFIXES) and "_extra_state" not in key)
    if model_only or foreign:
        raise ValueError(f"{path}: the checkpoint does not fit the model built from its config "
                         f"(not in the checkpoint: {sorted(model_only)[:5]}; not in the model: {foreign[:5]})")
    model.load_state_dict(state["model"], strict=True)
    return path


@contextlib.contextmanager
def single_process_world() -> Iterator[None]:
    """A one-process gloo world with TP=PP=1 for building and saving/loading a GPTModel in this process
    (the converter). Reuses an existing one-process world; tears down only what it set up."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    own_group = not dist.is_initialized()
    if own_group:
        # An in-memory store: one process needs no rendezvous port.
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise RuntimeError(f"the converter runs in one process, but a {dist.get_world_size()}-process "
                           "group is initialised here")
    own_parallel = not parallel_state.model_parallel_is_initialized()
    if own_parallel:
        parallel_state.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        if own_parallel:
            parallel_state.destroy_model_parallel()
        if own_group:
            dist.destroy_process_group()

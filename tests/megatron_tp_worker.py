"""One rank of the multi-process megatron backend tests (tests/test_megatron_backend_tp.py on CPU,
tests/test_megatron_gpu.py::test_tp2_equals_tp1 on two GPUs): builds the backend from the env-var
rendezvous (MASTER_ADDR, RANK, ...) with the given TP size, trains one step on the test's batch
and, on rank 0, writes the metrics and the exported HF weights.

    python megatron_tp_worker.py CHECKPOINT WORKDIR DEVICE TP SEQUENCE_PARALLEL(0|1)
"""

import json
import os
import sys
import warnings

warnings.simplefilter("ignore")
sys.path.insert(0, os.path.dirname(__file__))


def main(checkpoint: str, workdir: str, device: str, tp: str, sequence_parallel: str) -> None:
    import torch
    from megatron_ranks import make_args, megatron

    args = make_args(checkpoint, device=device, tensor_model_parallel_size=int(tp),
                     sequence_parallel=sequence_parallel == "1")
    with open(os.path.join(workdir, "args.json")) as f:
        overrides = json.load(f)
    probe_overlap = overrides.pop("probe_overlap", False)
    for key, value in overrides.items():
        setattr(args, key, value)
    backend = megatron(args)
    launched = watch_grad_reduce_launches(backend) if probe_overlap else None
    with open(os.path.join(workdir, "data.json")) as f:
        metrics = backend.train(0, json.load(f))
    if launched is not None:
        metrics["grad_reduce_launched_before_step"] = launched
    weights = backend.export_weights(None)
    if backend.layout.rank == 0:
        with open(os.path.join(workdir, "metrics.json"), "w") as f:
            json.dump(metrics, f)
        torch.save(weights[0], os.path.join(workdir, "weights.pt"))
    shut_down_process_groups()


def watch_grad_reduce_launches(backend) -> list[bool]:
    """Per optimizer step: whether every gradient bucket's DP reduction was already under way when
    the step began, i.e. launched by the backward (``--overlap-grad-reduce``) rather than by the step."""
    import megatron.core.distributed as distributed

    launched: list[bool] = []
    finalize = distributed.finalize_model_grads

    def watched(models, *args, **kwargs):
        launched.append(all(group.grad_reduce_handle is not None for group in backend.ddp_model.bucket_groups))
        return finalize(models, *args, **kwargs)

    distributed.finalize_model_grads = watched  # the optimizers import it at each step
    return launched


def shut_down_process_groups() -> None:
    """Join gloo's worker threads while the interpreter is whole. A rank that simply returned could
    die with SIGABRT ("terminate called without an active exception") on a busy machine: a gloo worker
    thread still held the last collective's tensors when interpreter finalization began, and freeing
    them there aborts (reproduced with plain all_reduce/all_gather pairs; pytorch/pytorch#190489).
    The barrier keeps one rank from tearing down while the other is still in a collective."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if dist.is_initialized():
        dist.barrier()
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])

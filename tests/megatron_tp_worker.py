"""One rank of the TP=2 GPU test (tests/test_megatron_gpu.py::test_tp2_equals_tp1): builds the
megatron backend with TP=2 + sequence parallelism from the env-var rendezvous (MASTER_ADDR, RANK,
...), trains one step on the test's batch and, on rank 0, writes the metrics and exported weights."""

import json
import os
import sys
import warnings

warnings.simplefilter("ignore")
sys.path.insert(0, os.path.dirname(__file__))


def main(checkpoint: str, workdir: str) -> None:
    import torch
    from test_megatron_gpu import make_args, megatron

    backend = megatron(make_args(checkpoint, tensor_model_parallel_size=2, sequence_parallel=True))
    with open(os.path.join(workdir, "data.json")) as f:
        metrics = backend.train(0, json.load(f))
    weights = backend.export_weights(None)
    if backend.layout.rank == 0:
        with open(os.path.join(workdir, "metrics.json"), "w") as f:
            json.dump(metrics, f)
        torch.save(weights[0], os.path.join(workdir, "weights.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:])

"""No host sync per micro-batch in the torch backend's train step (CUDA only; marker ``gpu``).

A sync inside the micro-batch loop stalls the host until the GPU has drained its queue, and the GPU
then idles while the host prepares and launches the next micro-batch. The step's syncs are counted
with ``torch.cuda.set_sync_debug_mode("warn")`` (every synchronizing CUDA call warns): one step of 8
samples as 8 micro-batches must sync exactly as often as the same step as one micro-batch, so the
loop adds none. On failure the message lists where the extra syncs came from."""

import collections
import warnings

import pytest
import torch

from .qwen3_gpu_checkpoint import build_checkpoint
from .test_torch_trainer import _train_data, make_args

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _syncs_of_one_step(checkpoint, micro_batch_size: int) -> collections.Counter:
    from plugrl.plugins.backends.torch.trainer import TorchTrainBackend
    from plugrl.plugins.estimators.grpo import GRPOEstimator

    args = make_args(checkpoint, device="cuda", micro_batch_size=micro_batch_size, fused_log_probs="always",
                     gradient_checkpointing=True, n_samples_per_prompt=8)
    backend = TorchTrainBackend(args, estimator=GRPOEstimator(args))
    gen = torch.Generator().manual_seed(0)
    resp = [16 + 5 * i for i in range(8)]
    seqs = [torch.randint(5, 3000, (40 + r,), generator=gen).tolist() for r in resp]
    data = _train_data(seqs, resp, [1.0, 0.0, 0.5, -1.0, 0.2, 0.9, -0.3, 0.0])
    backend.train(0, data)  # warm-up: allocator, kernels, optimizer state
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            backend.train(1, data)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    return collections.Counter(f"{w.filename}:{w.lineno}" for w in syncs)


def test_micro_batches_add_no_host_sync(tmp_path):
    checkpoint = build_checkpoint(tmp_path / "ckpt")
    one = _syncs_of_one_step(checkpoint, micro_batch_size=8)
    eight = _syncs_of_one_step(checkpoint, micro_batch_size=1)
    assert sum(one.values()) > 0  # the step's own (the grad norm, the metrics once per step): the count works
    extra = eight - one
    assert not extra, f"syncs added by 7 more micro-batches (site: count): {dict(extra)}"

"""``core/host_to_device.to_device`` (the micro-batch loop's host->device copies) and the loss's metrics
kept on the device (``compute_rl_loss(metrics_on_device=True)``, read once per step): same values as
the plain paths. On CPU; the GPU test ``test_host_sync_gpu.py`` checks that no sync is left."""

from types import SimpleNamespace

import pytest
import torch

from plugrl.core import losses
from plugrl.core.host_to_device import to_device


@pytest.mark.parametrize("values,dtype", [([3, 1, 2], torch.long), ([0.5, 2.0], torch.float64),
                                         (torch.arange(4, dtype=torch.int32), None),
                                         (torch.arange(4, dtype=torch.int32), torch.long)])
def test_to_device_keeps_values_and_takes_the_dtype(values, dtype):
    out = to_device(values, "cpu", dtype)
    expected = torch.as_tensor(values) if dtype is None else torch.as_tensor(values).to(dtype)
    assert out.dtype == expected.dtype and out.device.type == "cpu"
    assert torch.equal(out, expected)


def test_metrics_on_device_equal_the_host_metrics():
    gen = torch.Generator().manual_seed(0)
    lengths = [3, 5, 2]
    n = sum(lengths)
    log_probs = (-torch.rand(n, generator=gen)).requires_grad_()
    config = SimpleNamespace(loss_type="policy_loss", eps_clip=0.2, eps_clip_high=0.28, entropy_coef=0.0,
                             use_kl_loss=False, calculate_per_token_loss=False)
    common = dict(loss_masks=[torch.ones(k) for k in lengths], response_lengths=lengths, config=config,
                  mask_sums=[float(k) for k in lengths], old_log_probs=log_probs.detach() - 0.1,
                  advantages=torch.randn(n, generator=gen), entropy=torch.rand(n, generator=gen))
    loss_host, host = losses.compute_rl_loss(log_probs, **common)
    loss_dev, dev = losses.compute_rl_loss(log_probs, metrics_on_device=True, **common)
    assert torch.equal(loss_host, loss_dev)
    assert set(host) == set(dev) and {"loss", "pg_loss", "pg_clipfrac", "ppo_kl", "entropy_loss"} <= set(host)
    assert all(isinstance(v, torch.Tensor) and v.shape == () and not v.requires_grad for v in dev.values())
    assert losses.metrics_to_host(dev) == host
    assert losses.metrics_to_host({}) == {}


def test_metrics_to_host_takes_numbers_beside_tensors_and_keeps_the_order():
    # finish_step returns the grad norm as a device tensor next to the lr as a float
    mixed = {"lr": 1e-6, "loss": torch.tensor(0.25, dtype=torch.float64), "grad_norm": torch.tensor([3.0]),
             "steps": 2}
    host = losses.metrics_to_host(mixed)
    assert list(host) == ["lr", "loss", "grad_norm", "steps"]
    assert host == {"lr": 1e-6, "loss": 0.25, "grad_norm": 3.0, "steps": 2.0}
    assert all(type(v) is float for v in host.values())

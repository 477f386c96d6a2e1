"""The megatron backend's ``_foreach`` grad-norm / grad-scale kernels (``plugins/backends/megatron/
foreach_grad_ops.py``): the same results as the flat closed form (one norm over all grads
concatenated, ``src * scale``, a bf16 cast), and installed only over megatron-core's local
fallbacks. CPU here; on CUDA the megatron GPU tests run the backend with them installed."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from plugrl.plugins.backends.megatron import foreach_grad_ops  # noqa: E402
from plugrl.plugins.backends.megatron.foreach_grad_ops import (  # noqa: E402
    foreach_l2_norm,
    foreach_scale,
    install_foreach_grad_ops,
)


def grads(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * scale
            for shape, scale in (((64, 48), 1.0), ((48,), 1e-3), ((7, 3, 5), 30.0), ((0,), 1.0), ((1,), 2.0))]


def test_l2_norm_is_the_norm_of_all_grads_concatenated():
    tensors = grads()
    flat = torch.cat([t.reshape(-1) for t in tensors]).double()
    norm, per_tensor = foreach_l2_norm(2048 * 32, None, [tensors], False)
    assert per_tensor is None and norm.shape == (1,) and norm.dtype == torch.float32
    torch.testing.assert_close(norm.double(), flat.norm().reshape(1), rtol=1e-6, atol=0)


def test_scale_in_place_and_into_other_tensors():
    tensors = grads()
    expected = [t * 0.25 for t in tensors]
    foreach_scale(0, None, [tensors, tensors], 0.25)  # clipping: the grads scaled in place
    for got, want in zip(tensors, expected, strict=True):
        assert torch.equal(got, want)
    sources = grads(1)
    destinations = [torch.full_like(t, 7.0, dtype=torch.bfloat16) for t in sources]
    foreach_scale(0, None, [sources, destinations], 1.0)  # fp32 main params -> bf16 model params
    for got, src in zip(destinations, sources, strict=True):
        assert torch.equal(got, src.to(torch.bfloat16))
    scaled = [torch.zeros_like(t) for t in sources]
    foreach_scale(0, None, [sources, scaled], 3.0)
    for got, src in zip(scaled, sources, strict=True):
        assert torch.equal(got, src * 3.0)


def test_installed_only_over_megatrons_local_fallbacks(monkeypatch):
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mcore_optimizer

    # a fresh state: the fallbacks in place (this machine has neither TE nor apex), then install
    monkeypatch.setattr(clip_grads, "l2_norm_impl", mcore_utils.local_multi_tensor_l2_norm)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", mcore_utils.local_multi_tensor_scale)
    monkeypatch.setattr(mcore_optimizer, "multi_tensor_scale_impl", mcore_utils.local_multi_tensor_scale)
    replaced = install_foreach_grad_ops()
    assert sorted(replaced) == sorted(["megatron.core.optimizer.clip_grads.l2_norm_impl",
                                       "megatron.core.optimizer.clip_grads.multi_tensor_scale_impl",
                                       "megatron.core.optimizer.optimizer.multi_tensor_scale_impl"])
    assert clip_grads.l2_norm_impl is foreach_grad_ops.foreach_l2_norm
    assert mcore_optimizer.multi_tensor_scale_impl is foreach_grad_ops.foreach_scale
    assert install_foreach_grad_ops() == []  # idempotent

    # a fused kernel already there (TE / apex) is kept
    def fused_kernel(*args):
        raise AssertionError("not called here")

    monkeypatch.setattr(clip_grads, "l2_norm_impl", fused_kernel)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", fused_kernel)
    monkeypatch.setattr(mcore_optimizer, "multi_tensor_scale_impl", fused_kernel)
    assert install_foreach_grad_ops() == []
    assert clip_grads.l2_norm_impl is fused_kernel

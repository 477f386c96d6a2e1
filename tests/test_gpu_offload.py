"""StorageOffload (core/gpu_offload.py): frees storages in place and restores them bit-exact, keeps
views valid, reuses its host buffers, and (on a GPU) really gives memory back."""

import pytest
import torch
from plugrl.core.gpu_offload import StorageOffload


def _tensors():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 32, generator=gen)
    tied = weight.view(-1)[:512].view(16, 32)  # shares weight's storage: handled once
    bias = torch.randn(32, generator=gen)
    grad = torch.randn(64, 32, generator=gen)
    return weight, tied, bias, grad


def test_offload_frees_and_onload_restores_in_place():
    weight, tied, bias, grad = _tensors()
    expected = {"weight": weight.clone(), "bias": bias.clone()}
    offload = StorageOffload(pin_memory=False)
    offload.offload([(weight, True), (tied, True), (bias, True), (grad, False)])
    assert offload.offloaded
    assert all(t.untyped_storage().nbytes() == 0 for t in (weight, tied, bias, grad))
    assert offload.host_buffer_bytes() == (64 * 32 + 32) * 4  # grad is not copied, the tied view not twice
    # host views read the offloaded values without touching the freed storage
    assert torch.equal(offload.host_view(weight), expected["weight"])
    assert torch.equal(offload.host_view(tied), expected["weight"][:16])
    assert torch.equal(offload.host_view(bias), expected["bias"])
    offload.onload()
    assert not offload.offloaded
    assert torch.equal(weight, expected["weight"]) and torch.equal(bias, expected["bias"])
    assert torch.equal(tied, expected["weight"][:16])  # the view is valid again: same storage, same offset
    assert torch.count_nonzero(grad) == 0  # not kept: zero-filled


def test_host_buffers_are_reused_and_track_the_new_values():
    weight, _tied, bias, _grad = _tensors()
    offload = StorageOffload(pin_memory=False)
    first = offload.offload([(weight, True), (bias, True)])
    pointers = {key: buf.data_ptr() for key, buf in first.items()}
    offload.onload()
    weight.add_(1.0)  # a training step changes the weights
    second = offload.offload([(weight, True), (bias, True)])
    assert {key: buf.data_ptr() for key, buf in second.items()} == pointers  # no new allocation
    assert torch.equal(offload.host_view(weight), _tensors()[0] + 1.0)
    offload.onload()
    # a storage that is no longer offloaded drops its buffer; one of a new size gets a new buffer
    third = offload.offload([(torch.zeros(7), True)])
    assert len(third) == 1 and offload.host_buffer_bytes() == 7 * 4
    offload.onload()


def test_offload_twice_without_onload_is_refused():
    weight, *_ = _tensors()
    offload = StorageOffload(pin_memory=False)
    offload.offload([(weight, True)])
    with pytest.raises(RuntimeError, match="without onload"):
        offload.offload([(weight, True)])
    offload.onload()
    assert weight.untyped_storage().nbytes() == 64 * 32 * 4


def test_a_storage_that_cannot_be_resized_is_refused_before_anything_is_freed(tmp_path):
    path = tmp_path / "mapped.bin"
    torch.zeros(16).numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=True, size=16)
    weight, *_ = _tensors()
    offload = StorageOffload(pin_memory=False)
    with pytest.raises(ValueError, match="not resizable"):
        offload.offload([(weight, True), (mapped, True)])
    assert weight.untyped_storage().nbytes() == 64 * 32 * 4 and not offload.offloaded


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_offload_returns_memory_and_uses_pinned_buffers():
    weight = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    state = torch.randn(4096, 4096, device="cuda")
    grad = torch.randn(4096, 4096, device="cuda")
    expected = (weight.cpu(), state.cpu())
    offload = StorageOffload()
    before = torch.cuda.memory_allocated()
    copies = offload.offload([(weight, True), (state, True), (grad, False)])
    freed = before - torch.cuda.memory_allocated()
    assert freed == weight.nbytes + state.nbytes + grad.nbytes
    assert all(buf.is_pinned() for buf in copies.values())
    assert torch.equal(offload.host_view(weight), expected[0])
    offload.onload()
    assert torch.equal(weight.cpu(), expected[0]) and torch.equal(state.cpu(), expected[1])
    assert torch.count_nonzero(grad).item() == 0

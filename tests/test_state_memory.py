"""plugins/backends/state_memory.py: the bytes a train backend's state holds, by part, against closed
forms (4 bytes per fp32 element, Adam's two moments), on plain torch modules and on the torch and
megatron backends (CPU, fp32) at the moment of an optimizer step."""

import pytest
import torch

from plugrl.plugins.backends.state_memory import PARTS, at_next_optimizer_step, state_bytes
from plugrl.plugins.backends.torch_trainer import TorchTrainBackend
from plugrl.plugins.estimators.grpo import GRPOEstimator

from .test_torch_trainer import _train_data, checkpoint, make_args, random_sequences  # noqa: F401  (fixture)


def _adam_state_close(parts, n_elements, n_tensors):
    # two fp32 moments per element, plus a scalar step count per parameter tensor
    assert 8 * n_elements <= parts["optimizer_state"] <= 8 * n_elements + 8 * n_tensors


def test_a_stepped_model_counts_weights_grads_and_moments_once():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3, bias=False))
    n = 6 * 5 + 5 + 5 * 3
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 6)).sum().backward()
    assert state_bytes(model.parameters(), optimizers=[optimizer]) == {
        "weights": 4 * n, "ref_weights": 0, "grads": 4 * n, "master_weights": 0, "optimizer_state": 0}
    optimizer.step()
    parts = state_bytes(model.parameters(), optimizers=[optimizer])
    assert (parts["weights"], parts["grads"], parts["master_weights"]) == (4 * n, 4 * n, 0)
    _adam_state_close(parts, n, 3)
    assert set(parts) == set(PARTS)


def test_views_of_one_buffer_count_the_buffer_and_fp32_copies_count_as_master():
    """Params that are views into one flat bf16 buffer (megatron's param buffer), main_grads that are
    views into one fp32 grad buffer, and an optimizer over fp32 copies whose grads alias that buffer."""
    flat = torch.zeros(40, dtype=torch.bfloat16)  # 8 elements of padding after the two params
    grad_buffer = torch.zeros(40)
    params = [torch.nn.Parameter(flat[:20].view(4, 5)), torch.nn.Parameter(flat[20:32])]
    masters = []
    for param, (start, end) in zip(params, [(0, 20), (20, 32)]):
        param.main_grad = grad_buffer[start:end].view(param.shape)
        masters.append(torch.nn.Parameter(param.detach().float()))
        masters[-1].grad = param.main_grad  # the fp32 copy's grad aliases the grad buffer
    optimizer = torch.optim.Adam(masters)
    ref = [torch.zeros(7, dtype=torch.bfloat16)]
    parts = state_bytes(params, ref_params=ref, optimizers=[optimizer])
    assert parts == {"weights": 40 * 2, "ref_weights": 7 * 2, "grads": 40 * 4, "master_weights": 32 * 4,
                     "optimizer_state": 0}


def test_offloaded_storages_count_nothing():
    param = torch.nn.Parameter(torch.ones(10))
    param.data.untyped_storage().resize_(0)  # what core/gpu_offload.py does while the engine runs
    assert state_bytes([param])["weights"] == 0


def test_the_hook_measures_at_the_next_step_only_and_removes_itself():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    captured = at_next_optimizer_step([optimizer], lambda: calls.append(1) or
                                      {"grads": sum(p.grad.numel() for p in model.parameters())})
    assert captured == {}
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()  # grads exist here, as they do at every backend's optimizer step
    optimizer.step()
    assert captured == {"grads": 8} and calls == [1]
    assert not optimizer._optimizer_step_pre_hooks


def _measured_step(backend, data):
    captured = at_next_optimizer_step(backend.torch_optimizers(), backend.state_memory)
    backend.train(1, data)
    return captured


def _data():
    seqs, resp = random_sequences(seed=1, count=4)
    return _train_data(seqs, resp, [1.0, -1.0, 0.5, -0.5])


def test_torch_backend_at_its_optimizer_step(checkpoint):
    args = make_args(checkpoint)
    backend = TorchTrainBackend(args, estimator=GRPOEstimator(args))
    params = list(backend.model.parameters())
    n = sum(p.numel() for p in params)
    backend.train(0, _data())  # creates Adam's state
    parts = _measured_step(backend, _data())
    assert (parts["weights"], parts["grads"], parts["master_weights"], parts["ref_weights"]) == (4 * n, 4 * n, 0, 0)
    _adam_state_close(parts, n, len(params))


def test_megatron_backend_at_its_optimizer_step(checkpoint):
    pytest.importorskip("megatron.core", reason="megatron-core not installed (plugrl[megatron])")
    from .test_megatron_backend import megatron_backend

    backend = megatron_backend(make_args(checkpoint))
    try:
        params = list(backend.model.parameters())
        n = sum(p.numel() for p in params)
        backend.train(0, _data())
        parts = _measured_step(backend, _data())
        # fp32 on CPU: the optimizer steps the model's own params (no master copy); the DDP grad
        # buffer holds every param's main_grad, padded to its bucket's alignment
        assert (parts["weights"], parts["master_weights"]) == (4 * n, 0)
        assert 4 * n <= parts["grads"] <= 4 * n + 4 * 2**16
        _adam_state_close(parts, n, len(params))
    finally:
        import torch.distributed as dist
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("backend_name", ["torch", "megatron"])
def test_the_memory_plans_trainer_state_is_what_the_backend_holds(checkpoint, backend_name):
    """core/memory_plan.py plans the trainer's state per rank from config.json alone (bytes per
    parameter for weights, grads and optimizer state); the backend's tensors at an optimizer step
    must add up to it (fp32 on CPU: 4 + 4 + 8 bytes per parameter; megatron's padded vocabulary rows
    included: the tiny model's 317 tokens become 384)."""
    if backend_name == "megatron":
        pytest.importorskip("megatron.core", reason="megatron-core not installed (plugrl[megatron])")
    from plugrl.core.config import parse_config
    from plugrl.core.memory_plan import GIB, plan_memory
    from plugrl.core.plugins import make_plugin_manager

    config = parse_config(["--train-backend", backend_name, "--hf-checkpoint", checkpoint,
                           "--actor-num-gpus-per-node", "1"], make_plugin_manager(entry_points=False))
    plan = plan_memory(config, colocated=False, on_gpu=False, node_bytes=64 * GIB)
    planned = next(gib for what, gib in plan.gpu_items if what.startswith("trainer parameters")) * GIB
    if backend_name == "torch":
        backend = TorchTrainBackend(make_args(checkpoint), estimator=GRPOEstimator(None))
    else:
        from .test_megatron_backend import megatron_backend

        backend = megatron_backend(make_args(checkpoint))
    try:
        backend.train(0, _data())
        measured = sum(_measured_step(backend, _data()).values())
        tensors = sum(len(group["params"]) for opt in backend.torch_optimizers() for group in opt.param_groups)
    finally:
        if backend_name == "megatron":
            import torch.distributed as dist
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            if dist.is_initialized():
                dist.destroy_process_group()
    # the plan leaves out only Adam's scalar step count per parameter tensor
    assert 0 <= measured - planned <= 8 * tensors

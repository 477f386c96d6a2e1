"""What a train backend's state occupies, by part, measured from its tensors (not estimated).

Called in a train process by ``benchmarks/train_throughput.py`` right before an optimizer step (the
moment when weights, gradients, fp32 master copies and optimizer moments all exist and the
activations are gone), through each backend's ``state_memory()`` / ``torch_optimizers()``. The peak
minus these parts is what activations, logits and workspaces took.

Each storage is counted once, in the first part that reaches it: a parameter that is a view into a
flat buffer counts the whole buffer (padding included), a gradient that aliases megatron's
``main_grad`` buffer is not counted twice, and an optimizer stepping the model's own parameters adds
no master copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

PARTS = ("weights", "ref_weights", "grads", "master_weights", "optimizer_state")


def state_bytes(params: Iterable[torch.Tensor], *, ref_params: Iterable[torch.Tensor] = (),
                optimizers: Iterable[torch.optim.Optimizer] = ()) -> dict[str, int]:
    """Bytes per part (``PARTS``) held by the model's parameters, a reference model's, their
    gradients (``main_grad`` and ``.grad``), the optimizers' own parameters where they are not the
    model's (fp32 master weights) and the optimizers' state tensors."""
    counted: set[tuple[str, int]] = set()
    parts = dict.fromkeys(PARTS, 0)

    def add(part: str, tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if storage.nbytes() == 0 or key in counted:  # offloaded (resized to 0) or already counted
            return
        counted.add(key)
        parts[part] += storage.nbytes()

    params = list(params)
    optimizers = list(optimizers)
    for param in params:
        add("weights", param)
    for param in ref_params:
        add("ref_weights", param)
    for param in params:
        add("grads", getattr(param, "main_grad", None))
        add("grads", param.grad)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for param in group["params"]:
                add("master_weights", param)
                add("grads", param.grad)
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for value in state.values():
                add("optimizer_state", value)
    return parts


def at_next_optimizer_step(optimizers: Iterable[torch.optim.Optimizer],
                           measure: Callable[[], dict[str, int]]) -> dict[str, int]:
    """A dict that ``measure()``'s result fills when the first of ``optimizers`` next steps (a
    one-shot step pre-hook, removed after it ran)."""
    result: dict[str, int] = {}
    handles = []

    def hook(_optimizer, _args, _kwargs) -> None:
        if not result:
            result.update(measure())
        for handle in handles:
            handle.remove()

    handles.extend(optimizer.register_step_pre_hook(hook) for optimizer in optimizers)
    return result

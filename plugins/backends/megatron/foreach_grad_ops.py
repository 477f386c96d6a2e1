"""Grad-norm and grad-scale kernels for megatron-core's optimizer when neither Transformer Engine nor
apex is installed (installed once per train actor by ``MegatronCoreOptimizer``, on CUDA).

Without them megatron-core falls back to per-tensor Python loops: the grad norm takes one
``torch.norm`` per parameter and then a host sync per parameter (it builds a CPU tensor from the
CUDA norms), and clipping writes ``src * scale`` to a temporary and copies it back (two kernels and
twice the memory traffic per parameter). On the Qwen3-4B shape (one H200, docs/performance.md) that
is ~290 syncs and ~22 ms of kernels per optimizer step (norms 4.7, scale-and-copy 17). torch's ``_foreach`` kernels do the same arithmetic in a few launches with no
sync: the per-tensor fp32 norms, the norm of those norms, an in-place multiply.

Only megatron-core's own local fallbacks are replaced; a TE or apex kernel already in place is left
alone. The replacements keep the fallbacks' call signatures (``op(chunk_size, noop_flag,
tensor_lists, ...)``) and results.
"""

from __future__ import annotations

import torch


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for ``local_multi_tensor_l2_norm``: ``(total L2 norm as a 1-element fp32 tensor, None)``
    of every tensor in ``tensor_lists``, computed on their device without a host sync."""
    tensors = [t for tensor_list in tensor_lists for t in tensor_list]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device="cuda"), None
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for ``local_multi_tensor_scale``: ``dst = src * scale`` for each pair of
    ``tensor_lists = [srcs, dsts]`` (in place when they are the same tensors; a dtype cast when the
    destinations differ in dtype, as for fp32 main params -> bf16 model params)."""
    sources, destinations = tensor_lists
    if not destinations:
        return
    if all(s is d for s, d in zip(sources, destinations, strict=True)):
        if scale != 1.0:
            torch._foreach_mul_(destinations, scale)
        return
    torch._foreach_copy_(destinations, sources if scale == 1.0 else torch._foreach_mul(sources, scale))


def install_foreach_grad_ops() -> list[str]:
    """Replace megatron-core's local grad-norm / grad-scale fallbacks by the ``_foreach`` versions in
    the modules that use them; returns the replaced names (empty when TE or apex provides them, or
    when already installed)."""
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mcore_optimizer

    local_norm = getattr(mcore_utils, "local_multi_tensor_l2_norm", None)
    local_scale = getattr(mcore_utils, "local_multi_tensor_scale", None)
    replaced = []
    for module in (clip_grads, mcore_optimizer):
        if local_norm is not None and getattr(module, "l2_norm_impl", None) is local_norm:
            module.l2_norm_impl = foreach_l2_norm
            replaced.append(f"{module.__name__}.l2_norm_impl")
        if local_scale is not None and getattr(module, "multi_tensor_scale_impl", None) is local_scale:
            module.multi_tensor_scale_impl = foreach_scale
            replaced.append(f"{module.__name__}.multi_tensor_scale_impl")
    return replaced

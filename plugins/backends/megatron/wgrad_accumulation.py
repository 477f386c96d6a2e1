"""Weight-gradient GEMMs that accumulate straight into megatron's gradient buffer, without apex.

megatron-core's linear layers can add each weight gradient into ``weight.main_grad`` inside the
GEMM (``gradient_accumulation_fusion``) but only through apex's ``fused_weight_gradient_mlp_cuda``
extension. Without it every linear weight gets a bf16 ``.grad`` per micro-batch that the DDP hook
then adds into the buffer (bf16 by default, fp32 with ``--accumulate-allreduce-grads-in-fp32``):
one more kernel per weight and micro-batch, and every micro-batch's gradient rounded to bf16 before
it is summed. At the Qwen3-4B shape on one H100 the hook's adds took 135 ms of a step of 8
micro-batches (2,320 kernels for 290 parameters; the 145 linear weights among them hold nearly all
of the bytes; docs/performance.md). torch's ``addmm`` does the same as apex's kernels in one cuBLAS
call: in place in the buffer's dtype, and for an fp32 buffer with bf16 inputs through ``out_dtype``.

Installed by the megatron train backend on CUDA before it builds the model (``install``), unless
``--no-gradient-accumulation-fusion``; an apex extension already importable is left in place.
"""

from __future__ import annotations

import sys

import torch


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """``main_grad += grad_output.T @ total_input`` (``[out, in]`` fp32; inputs ``[tokens, out]`` and
    ``[tokens, in]`` in bf16/fp16), accumulated in fp32 by the GEMM itself. Called by megatron-core's
    linear backward in place of apex's kernel of the same name and arguments (fp32 inputs too: an
    fp32 model, as on CPU)."""
    if total_input.dtype == main_grad.dtype:
        main_grad.addmm_(grad_output.t(), total_input)
    else:
        torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=main_grad.dtype, out=main_grad)


def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """The same for a bf16/fp16 gradient buffer, in the buffer's own dtype."""
    main_grad.addmm_(grad_output.t(), total_input)


def supported() -> bool:
    """Whether this torch has the mixed-precision ``addmm`` (bf16 x bf16 -> fp32 output) on CUDA."""
    return torch.cuda.is_available() and hasattr(torch.ops.aten.addmm, "dtype_out")


def install() -> bool:
    """Make megatron-core's linear layers use the kernels above for ``gradient_accumulation_fusion``;
    -> whether the fusion is available now (apex's extension, or this module). Idempotent."""
    from megatron.core.tensor_parallel import layers

    if getattr(layers, "_grad_accum_fusion_available", False):
        return True  # apex's extension (or an earlier install)
    if not supported():
        return False
    layers.fused_weight_gradient_mlp_cuda = sys.modules[__name__]
    layers._grad_accum_fusion_available = True
    return True

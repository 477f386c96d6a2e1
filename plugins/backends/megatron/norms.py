"""RMSNorm for the train backend's layer spec, computed in fp32 as HF transformers and SGLang do.

megatron-core's local spec falls back to ``torch.nn.RMSNorm`` without apex: it normalises in bf16
(a visible logit gap to the rollout engine, i.e. train/rollout log-prob mismatch) and refuses
sequence parallelism. This one is built wherever the spec names a norm (input, pre-MLP, q/k and the
final norm) inside the train actor. Its weight keeps megatron's name ``weight`` and carries the
``sequence_parallel`` flag megatron's ``finalize_model_grads`` uses to sum its gradient over TP.
"""

from __future__ import annotations

import torch


class FP32RMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str = "RMSNorm", **_unused):
        super().__init__()
        if getattr(config, "normalization", "RMSNorm") != "RMSNorm" or zero_centered_gamma:
            raise ValueError("plugrl's megatron layer spec implements RMSNorm (Qwen / Llama), got "
                             f"{getattr(config, 'normalization', None)!r}")
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype,
                                                    device="cpu" if config.use_cpu_initialization else "cuda"))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    fused = False  # compile the whole norm into one kernel on CUDA (set per spec, see attention.py)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in fp32, then HF's order: cast back, then scale
        # (fused_ops.rms_norm_fp32: bit-identical to HF on CPU; one Triton kernel on CUDA when fused,
        # where eager runs the fp32 cast, the norm, the cast back and the scale as four).
        from .fused_ops import fused, rms_norm_fp32

        return fused(rms_norm_fp32, hidden, self.fused)(hidden, self.weight, self.eps)

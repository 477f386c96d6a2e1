"""Which FP8 checkpoints the sglang backend can push to (``fp8.py`` quantizes the pushes): the config
check alone, without torch, so the driver runs it (``options._quantization_problems``, ``--dry-run`` too)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def fp8_quantization_config(hf_config: Any) -> dict | None:
    """The block-wise FP8 ``quantization_config`` of an HF config (``PretrainedConfig`` or the
    config.json dict), or None when the checkpoint is not FP8 (no config, or another method).

    An FP8 config this module cannot reproduce (per-tensor scales, static activation scales, a
    format other than e4m3) raises ``ValueError``: pushing BF16 or wrongly scaled tensors to such an
    engine would fail there or silently serve a different policy.
    """
    if isinstance(hf_config, Mapping):
        quant = hf_config.get("quantization_config")
    else:
        quant = getattr(hf_config, "quantization_config", None)
    if quant is not None and not isinstance(quant, Mapping):
        quant = quant.to_dict()  # transformers' QuantizationConfigMixin
    if not quant or quant.get("quant_method") != "fp8":
        return None
    problems = []
    if quant.get("fmt", "e4m3") != "e4m3":
        problems.append(f"fmt={quant.get('fmt')!r} (need 'e4m3')")
    if quant.get("activation_scheme", "dynamic") != "dynamic":
        problems.append(f"activation_scheme={quant.get('activation_scheme')!r} (need 'dynamic')")
    block = quant.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        problems.append(f"weight_block_size={block!r} (need two positive ints, e.g. [128, 128])")
    if problems:
        raise ValueError("unsupported fp8 quantization_config: " + "; ".join(problems))
    return dict(quant)

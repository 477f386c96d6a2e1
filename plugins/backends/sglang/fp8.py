"""FP8 rollout weights for a BF16-trained policy (slime §6.5): block-wise e4m3 quantization of the
pushed HF tensors, for engines serving an FP8 checkpoint (e.g. ``Qwen/Qwen3-4B-FP8``).

Runs in the rollout manager, between ``flatten_named_tensors`` and the bucketing in
``SGLangRolloutBackend.update_weights``; works on CPU and CUDA tensors alike (torch ops only).

Conventions (DeepSeek-V3 / Qwen3-FP8 checkpoints, SGLang's ``Fp8Config``, slime's
``quantizer.py``): per ``[128, 128]`` block ``s = max(|w|, 1e-10) / 448``,
``q = clamp(w / s, ±448).to(float8_e4m3fn)``; the checkpoint stores ``s`` itself (fp32, one per
block, shape ``[ceil(out/128), ceil(in/128)]``) under ``<module>.weight_scale_inv``, and the engine
dequantizes as ``q * s`` per block (the "inv" is relative to the quantizer's multiplier ``1/s``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from .fp8_config import fp8_quantization_config  # the check alone lives where torch is not imported

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# slime's floor for a block's amax: an all-zero block gets a tiny positive scale (q stays 0).
AMAX_FLOOR = 1e-10
# The transformer-layer linears SGLang loads as FP8 (it fuses q/k/v -> qkv_proj and gate/up ->
# gate_up_proj itself). Embeddings, norms, lm_head and MoE routers stay BF16.
QUANTIZED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# SGLang's ignored_layers may name the fused module; it covers these HF names.
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def checkpoint_fp8_config(hf_checkpoint: str) -> dict | None:
    """``fp8_quantization_config`` of a checkpoint's config.json: a local directory, else the copy
    in the local Hugging Face cache (a hub id the engines download). Never touches the network:
    this runs when the backend is built, and tests build it with offline paths."""
    from pathlib import Path

    path = Path(hf_checkpoint) / "config.json"
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(str(hf_checkpoint), "config.json")
        except ValueError:  # not a valid repo id either
            cached = None
        if not isinstance(cached, str):
            logger.warning("no local config.json for %r: pushing weights unquantized; pass a local "
                           "checkpoint directory if the engines serve an FP8 model", hf_checkpoint)
            return None
        path = Path(cached)
    return fp8_quantization_config(json.loads(path.read_text()))


def quantize_block_fp8(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` weight -> (``q`` float8_e4m3fn ``[out, in]``, ``scale_inv`` float32
    ``[ceil(out/bm), ceil(in/bn)]``), ``dequant = q * scale_inv`` per block. Edge blocks are
    zero-padded for the amax only (zeros never raise it); the outputs keep the original shape."""
    if weight.dim() != 2:
        raise ValueError(f"quantize_block_fp8 takes a 2-D weight, got shape {tuple(weight.shape)}")
    bm, bn = block
    rows, cols = weight.shape
    mb, nb = math.ceil(rows / bm), math.ceil(cols / bn)
    w = weight.detach().to(torch.float32)
    padded = torch.nn.functional.pad(w, (0, nb * bn - cols, 0, mb * bm - rows))
    amax = padded.view(mb, bm, nb, bn).abs().amax(dim=(1, 3))
    scale = amax.clamp(min=AMAX_FLOOR) / FP8_MAX
    q = (w / _expand(scale, block, rows, cols)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_block_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """What the engine computes with: ``q * scale_inv`` per block, float32."""
    rows, cols = q.shape
    return q.to(torch.float32) * _expand(scale_inv.to(torch.float32), block, rows, cols)


def _expand(per_block: torch.Tensor, block: tuple[int, int], rows: int, cols: int) -> torch.Tensor:
    bm, bn = block
    return per_block.repeat_interleave(bm, dim=0).repeat_interleave(bn, dim=1)[:rows, :cols]


def _ignored(module: str, ignored: Iterable[str]) -> bool:
    """``module`` is listed in ``modules_to_not_convert`` / ``ignored_layers``: exactly, as a dotted
    suffix (``lm_head``, ``self_attn.q_proj``), as a dotted prefix (``model.layers.0`` skips the
    layer), or through its fused SGLang name (``...self_attn.qkv_proj``)."""
    leaf = module.rpartition(".")[2]
    for entry in ignored:
        entry_head, _, entry_leaf = entry.rpartition(".")
        if leaf in _FUSED.get(entry_leaf, ()):
            entry = f"{entry_head}.{leaf}" if entry_head else leaf
        if module == entry or module.endswith("." + entry) or module.startswith(entry + "."):
            return True
    return False


def is_quantized_weight(name: str, tensor: torch.Tensor, quant_config: Mapping) -> bool:
    """A 2-D ``.weight`` of a transformer layer's linear (``QUANTIZED_LINEARS``) not listed in the
    config's ``modules_to_not_convert`` / ``ignored_layers``."""
    if not name.endswith(".weight") or tensor.dim() != 2 or ".layers." not in f".{name}":
        return False
    module = name[: -len(".weight")]
    if module.rpartition(".")[2] not in QUANTIZED_LINEARS:
        return False
    ignored = [*(quant_config.get("modules_to_not_convert") or ()), *(quant_config.get("ignored_layers") or ())]
    return not _ignored(module, ignored)


def fp8_named_tensors(pairs: Iterable[tuple[str, torch.Tensor]],
                      quant_config: Mapping) -> Iterator[tuple[str, torch.Tensor]]:
    """HF ``(name, tensor)`` pairs -> the FP8 checkpoint's tensors: each quantized linear becomes
    ``name`` (float8_e4m3fn) then ``<module>.weight_scale_inv`` (float32); every other floating
    tensor is cast to bfloat16 (what an FP8 checkpoint stores for norms, embeddings, lm_head)."""
    block = tuple(quant_config["weight_block_size"])
    for name, tensor in pairs:
        if is_quantized_weight(name, tensor, quant_config):
            q, scale = quantize_block_fp8(tensor, block)
            yield name, q
            yield name[: -len("weight")] + "weight_scale_inv", scale
        elif tensor.is_floating_point():
            yield name, tensor.to(torch.bfloat16)
        else:
            yield name, tensor

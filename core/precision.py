"""The train precision and packed attention of a run, decided on the driver.

``--bf16`` / ``--fp32`` choose; with neither (the default, ``bf16`` is ``None``) the train device decides:
bf16 on CUDA, where the packed attention's varlen flash kernel accepts only 16-bit inputs and the
engine generates in bf16 anyway, fp32 on CPU, where bf16 matmuls are slow and imprecise. The loop
calls ``resolve_precision`` once it knows whether the train actors get GPUs and hands the result to
every actor, so a train actor never meets a dtype its attention cannot run. Imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from .plugin_traits import train_trait



@cache
def varlen_available() -> bool:
    """``torch.nn.attention.varlen`` (flash attention over cu_seqlens, torch >= 2.10) is importable."""
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        return False
    return True


def packed_attention_for(device_type: str, dtype: str) -> str:
    """The packed attention both train backends run by default: flash kernels take only fp16/bf16
    inputs (an fp32 model on CUDA would fail inside the first forward), so fp32 gets SDPA per sample."""
    return "varlen" if device_type == "cuda" and dtype in ("bf16", "fp16") and varlen_available() else "sdpa"


@dataclass(frozen=True)
class Precision:
    dtype: str  # "bf16" | "fp32"
    attention: str  # packed attention implementation: "varlen" (flash over cu_seqlens) | "sdpa"
    chosen_by: str  # "--bf16", "--fp32" or "auto (<device>)"

    def describe(self) -> str:
        kernel = "varlen flash" if self.attention == "varlen" else "SDPA per sample"
        override = "" if self.chosen_by.startswith("--") else "; --fp32 or --bf16 overrides"
        return f"train precision {self.dtype}, packed attention {kernel} [{self.chosen_by}{override}]"


def precision_problems(args) -> list[str]:
    """Combinations refused on the driver (config check, ``--dry-run`` included)."""
    problems = []
    fp32 = bool(getattr(args, "fp32", False))
    if fp32 and getattr(args, "bf16", None):
        problems.append("--bf16 and --fp32 are both set (on the command line, in --config or in the recipe): "
                        "keep one (--no-bf16 turns a recipe's bf16 off)")
    wants_fp32 = fp32 or getattr(args, "bf16", None) is False
    if wants_fp32 and getattr(args, "device", None) != "cpu" and train_trait(args, "gpu_bf16_only", False):
        flag, name = ("--fp32" if fp32 else "--no-bf16"), args.train_backend
        problems.append(f"{flag} with --train-backend {name}: on GPUs the {name} backend trains bf16 parameters "
                        "with fp32 main parameters and gradients (slime's --bf16); drop "
                        f"{flag}, or use --train-backend torch for an fp32 run")
    return problems


def resolve_precision(args, device_type: str) -> Precision:
    """``args.bf16`` True/False/None (auto) and ``args.fp32`` -> the precision the train actors use on
    ``device_type`` ("cuda" or "cpu")."""
    if getattr(args, "fp32", False):
        dtype, chosen_by = "fp32", "--fp32"
    elif getattr(args, "bf16", None) is True:
        dtype, chosen_by = "bf16", "--bf16"
    elif getattr(args, "bf16", None) is False:
        dtype, chosen_by = "fp32", "--no-bf16"
    else:
        dtype, chosen_by = ("bf16" if device_type == "cuda" else "fp32"), f"auto ({device_type})"
    return Precision(dtype, packed_attention_for(device_type, dtype), chosen_by)

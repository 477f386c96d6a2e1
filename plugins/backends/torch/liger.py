"""Liger's Triton kernels (RoPE, RMSNorm, SwiGLU) in the torch backend's HF model, on CUDA.

Chosen by ``--liger-kernels auto|on|off`` (``plugins/backends/torch/options.py``) and applied in the
train actor right after the model is loaded (``TorchTrainBackend.__init__``), before gradient
checkpointing. Liger's fused linear cross-entropy is not used: the backend's log-probs come from
``fused_log_probs.py``, which also gives entropy and per-token values. Liger patches the model
instance and its architecture's module in ``transformers`` (its RoPE is a module-level function), so
every model of that architecture built later in the same process gets the kernels too; train actors
are their own processes, and ``auto`` never applies them off CUDA.
"""

from __future__ import annotations

import importlib.util

MODES = ("auto", "on", "off")
KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
           "fused_linear_cross_entropy": False}


def installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def supported_model_types() -> frozenset[str]:
    """Architectures Liger can patch (its own table; empty when it is not installed)."""
    if not installed():
        return frozenset()
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def driver_problems(mode: str | None, device: str | None) -> list[str]:
    """Config problems of ``--liger-kernels``, checked on the driver before any actor starts."""
    if mode in (None, "auto", "off"):
        return []
    problems = []
    if not installed():
        problems.append("--liger-kernels on: the liger-kernel package is not installed (pip install liger-kernel, "
                        "or plugrl[gpu]); use --liger-kernels auto or off")
    if device == "cpu":
        problems.append("--liger-kernels on: Liger's kernels are Triton kernels for CUDA, but --device cpu was "
                        "given; use --liger-kernels auto or off on CPU")
    return problems


def choose(mode: str | None, device_type: str, model_type: str | None) -> tuple[bool, str]:
    """-> (apply?, why), in the train actor once the device is known. ``on`` where it cannot apply is an
    error (the driver checked the installation; the device and architecture are only known here)."""
    mode = mode or "auto"
    if mode == "off":
        return False, "--liger-kernels off"
    reasons = []
    if device_type != "cuda":
        reasons.append(f"the device is {device_type}, Liger needs CUDA")
    elif not installed():
        reasons.append("liger-kernel is not installed")
    elif model_type not in supported_model_types():
        reasons.append(f"Liger has no kernels for model type {model_type!r}")
    if reasons and mode == "on":
        raise ValueError(f"--liger-kernels on: {reasons[0]}; use --liger-kernels auto or off")
    if reasons:
        return False, f"auto: {reasons[0]}"
    return True, f"{mode} ({device_type})"


def apply(model) -> list[str]:
    """Patch ``model`` (a loaded HF causal LM) with Liger's RoPE, RMSNorm and SwiGLU; -> the kernels."""
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, **KERNELS)
    return [name for name, on in KERNELS.items() if on]

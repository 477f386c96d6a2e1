"""What plugrl assumes about the SGLang it talks to: the supported versions, the weight-update group
layout, the memory tags, and what a colocated engine needs in its environment and flags.

Pure functions (no sglang, torch or network import), used by ``engine.py`` in the rollout manager,
by ``server.py`` (``plugrl serve``) and by the tests. Facts come from SGLang v0.5.15.post1 (the
version slime pins) and were checked against v0.5.9 where the range starts; the file cited for each
is under ``python/sglang/srt/`` in SGLang's repository.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

logger = logging.getLogger(__name__)

# /v1/loads (the abort loop's idleness check) first shipped in 0.5.9; slime pins 0.5.15.post1.
# 0.6 is excluded until it is checked: the endpoints and payloads below may change there.
MIN_VERSION = "0.5.9"
MAX_VERSION_EXCLUSIVE = "0.6"
ALLOW_UNSUPPORTED_ENV = "PLUGRL_SGLANG_ALLOW_UNSUPPORTED"
SERVE_VERSION = "plugrl-hf"  # what ``plugrl serve`` reports as its version

# constants.py GPU_MEMORY_ALL_TYPES: release/resume with tags=None (or []) means all of these.
MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")

# environ.py names; slime's engines get these when they share GPUs with training.
COLOCATION_ENV = {
    # Without it CUDA-graph memory is not tagged by torch_memory_saver, so releasing "cuda_graph"
    # frees nothing (the cuda graph runners create their adapter only when it is true).
    "SGLANG_MEMORY_SAVER_CUDA_GRAPH": "true",
    # The start-up check compares free memory across TP ranks; training processes sharing the GPUs
    # hold different amounts per rank, so the check would refuse to start.
    "SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK": "false",
    "SGLANG_DISABLE_TP_MEMORY_INBALANCE_CHECK": "true",
}
# Older spellings kept for the releases that read them (0.5.15.post1 reads both; 0.5.23 only the ENABLE one).
OLDER_COLOCATION_ENV = ("SGLANG_DISABLE_TP_MEMORY_INBALANCE_CHECK",)
# torch_memory_saver allocates through its own hook; an inherited expandable-segments allocator
# setting (common in training environments) breaks its pause/resume, so engines must not see it.
COLOCATION_ENV_REMOVED = ("PYTORCH_CUDA_ALLOC_CONF",)


class UnsupportedSGLangError(RuntimeError):
    pass


def supported_range() -> str:
    return f">={MIN_VERSION},<{MAX_VERSION_EXCLUSIVE}"


def check_version(version: str | None, where: str) -> None:
    """Raise ``UnsupportedSGLangError`` when ``version`` (``/get_server_info``'s ``version`` or the
    installed package's) is outside ``supported_range()``; ``plugrl serve`` is always accepted.
    ``$PLUGRL_SGLANG_ALLOW_UNSUPPORTED=1`` turns the error into a warning."""
    if version == SERVE_VERSION:
        return
    from packaging.version import InvalidVersion, Version

    try:
        parsed = Version(str(version))
        # the upper bound compares release numbers: 0.6.0rc1 and 0.6.0.dev are 0.6 already, though they
        # sort below Version("0.6")
        ok = Version(MIN_VERSION) <= parsed and parsed.release < Version(MAX_VERSION_EXCLUSIVE).release
    except InvalidVersion:
        ok = False
    if ok:
        return
    if version is None:
        raise UnsupportedSGLangError(f"{where}: the sglang package is not installed; install sglang "
                                     f"{supported_range()} (slime pins 0.5.15.post1), or pass "
                                     "--rollout-external-engine-addrs to use engines started elsewhere")
    message = (f"{where} runs SGLang {version!r}; plugrl supports SGLang {supported_range()} (older servers lack "
               f"/v1/loads, which the abort before each weight push relies on; newer ones are unchecked). "
               f"Install a supported sglang (slime pins 0.5.15.post1), or set {ALLOW_UNSUPPORTED_ENV}=1 to try anyway.")
    if os.environ.get(ALLOW_UNSUPPORTED_ENV, "").lower() in ("1", "true", "yes"):
        logger.warning("%s", message)
        return
    raise UnsupportedSGLangError(message)


def installed_version() -> str | None:
    """The installed ``sglang`` distribution's version (metadata only: sglang is not imported)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sglang")
    except PackageNotFoundError:
        return None


def installed_server_fields() -> frozenset[str]:
    """The ``ServerArgs`` field names of the installed SGLang (``flag_names.py`` reads its source; nothing is
    imported), so a launch flag is only passed to a server that has it; empty when sglang is not installed."""
    from .flag_names import installed_server_flags

    installed = installed_server_flags()
    if installed is None:
        return frozenset()
    return frozenset(flag[2:].replace("-", "_") for flag in installed[0])


def cuda_graph_bs_field(fields: frozenset[str]) -> str:
    """The field ``--sglang-cuda-graph-bs`` sets on a server with ``fields``: 0.5.9 has ``cuda_graph_bs``;
    0.5.15.post1 splits it into ``cuda_graph_bs_decode``/``_prefill`` (the old flag a deprecated alias), and
    from 0.5.20 the old flag is gone (argparse calls it an ambiguous prefix and the server exits at launch)."""
    return "cuda_graph_bs_decode" if "cuda_graph_bs_decode" in fields else "cuda_graph_bs"


def group_layout(tp_sizes: Sequence[int]) -> tuple[int, list[int]]:
    """The weight-update group for engines of ``tp_sizes`` TP ranks: the pusher is rank 0 and every
    TP rank of every engine joins (model_executor/model_runner.py ``init_weights_update_group``:
    rank = rank_offset + tp_rank), so world = 1 + sum(tp_sizes) and the offsets are cumulative."""
    offsets, next_rank = [], 1
    for tp in tp_sizes:
        if int(tp) < 1:
            raise ValueError(f"an engine has tp_size {tp}; every engine has at least one TP rank")
        offsets.append(next_rank)
        next_rank += int(tp)
    return next_rank, offsets


def resolve_tags(tags) -> tuple[str, ...]:
    """SGLang's reading of a ``tags`` field: None or [] means every tag (weight_updater.py)."""
    if tags is None or (not isinstance(tags, str) and len(tags) == 0):
        return MEMORY_TAGS
    return (tags,) if isinstance(tags, str) else tuple(tags)


def colocation_env(base: Mapping[str, str], explicit: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a colocated engine: ``base`` (the launcher's) without
    ``COLOCATION_ENV_REMOVED``, plus ``COLOCATION_ENV`` unless the launcher or ``explicit`` (the
    backend's ``engine_env``) sets a variable itself."""
    env = {k: v for k, v in base.items() if k not in COLOCATION_ENV_REMOVED}
    for key, value in COLOCATION_ENV.items():
        env.setdefault(key, value)
    env.update(explicit or {})
    return env


def ue8m0_engines(compute_caps: Sequence[tuple[int, int] | None], env: Mapping[str, str]) -> list[int]:
    """Indices of engines whose GPUs make SGLang keep FP8 block scales as DeepGEMM UE8M0
    (layers/deep_gemm_wrapper/configurer.py: JIT DeepGEMM on, and an sm_100-family GPU; sm_120 has no
    DeepGEMM). Such engines convert ``weight_scale_inv`` after the checkpoint load, so float32 scales
    pushed later are misread. ``SGLANG_ENABLE_JIT_DEEPGEMM=0`` in the engines' environment avoids it."""
    # environ.py EnvBool: these spellings read as false.
    if env.get("SGLANG_ENABLE_JIT_DEEPGEMM", "true").strip().lower() in ("false", "0", "no", "n"):
        return []
    return [i for i, cap in enumerate(compute_caps) if cap is not None and cap[0] == 10]

"""The sglang rollout backend's flags (``--sglang-*``, ``--router-*``, slime's router/engine flags).

Runs on the driver while ``plugrl train`` builds its parser; imports nothing from sglang. Giving any
of these flags selects ``--rollout-backend sglang``. As in slime (reference §6.1), every SGLang server
flag is accepted with a ``--sglang-`` prefix: the ones defined here get their own dest
(``args.sglang_mem_fraction_static``); any other ``--sglang-<flag> [value]`` lands in
``args.sglang_passthrough`` (``{"flag_name": True | "value" | ["v1", "v2"]}``) and goes to
``sglang.launch_server`` as ``--<flag> [value]``. Unclaimed ``--router-<flag>`` words land in
``args.router_passthrough`` for the router. Flags plugrl sets per engine itself are refused.
"""

from __future__ import annotations

import argparse

from plugrl.core import hookimpl

_MULTI_NODE = ("plugrl launches each engine on the rollout manager's host (one node); for engines spanning "
               "nodes, start them yourself (sglang.launch_server --nnodes/--node-rank/--dist-init-addr) and pass "
               "their first node's host:port with --rollout-external-engine-addrs")

# ServerArgs fields slime computes per engine (reference §6.1/§6.2); giving them is an error.
RESERVED_SERVER_FLAGS = {
    "model-path": "it is --hf-checkpoint",
    "config": "use --sglang-config for server groups",
    "trust-remote-code": "plugrl always sets it",
    "random-seed": "it is derived from --seed per engine",
    "enable-memory-saver": "it follows --offload-rollout",
    "tp-size": "it is --rollout-num-gpus-per-engine",
    "port": "plugrl allocates ports per engine",
    # plugrl starts every engine as one process tree on the rollout manager's host (one node), so
    # the multi-node fields cannot apply to engines it launches.
    "nnodes": _MULTI_NODE,
    "node-rank": _MULTI_NODE,
    "dist-init-addr": _MULTI_NODE,
    "gpu-id-step": "plugrl sets it per engine",
    "base-gpu-id": "it follows the placement",
    "nccl-port": "plugrl allocates a free port per engine (engines on one host must not share it)",
    "skip-server-warmup": "plugrl sets it",
    "host": "plugrl serves each engine on the rollout manager's host",
    # Weight pushes address each engine's TP ranks only (compat.group_layout: rank = offset + tp_rank).
    "dp-size": "SGLang refuses weight pushes to an engine with dp_size > 1 (without DP attention); for more "
               "data parallelism run more engines: raise --rollout-num-gpus",
    "pp-size": "the weight-update group holds one rank per TP rank (rank = offset + tp_rank), so pipeline "
               "stages would share ranks and the push would hang; use --rollout-num-gpus-per-engine (tensor parallel)",
}
# SGLang's other spellings of reserved flags (``aliases=`` in 0.5.15's server_args.py, a second option
# string in 0.5.9's): given as the alias, the flag would reach the server after plugrl's own and win.
SERVER_FLAG_ALIASES = {"model": "model-path", "tensor-parallel-size": "tp-size", "nccl-init-addr": "dist-init-addr",
                       "data-parallel-size": "dp-size", "pipeline-parallel-size": "pp-size"}
RESERVED_SERVER_FLAGS.update({alias: f"it is --sglang-{flag}: {RESERVED_SERVER_FLAGS[flag]}"
                              for alias, flag in SERVER_FLAG_ALIASES.items()})

# Server flags with their own dests here (the rest pass through): dest -> ServerArgs field.
SERVER_FIELDS = {
    "sglang_mem_fraction_static": "mem_fraction_static",
    "sglang_cuda_graph_bs": "cuda_graph_bs",
    "sglang_enable_deterministic_inference": "enable_deterministic_inference",
    "sglang_speculative_algorithm": "speculative_algorithm",
}

# slime's router defaults (applied by the backend when the flag is unset).
ROUTER_DEFAULTS = {"router_balance_abs_threshold": 10, "router_balance_rel_threshold": 1.2, "router_log_level": "warn"}


def engine_pool(args) -> str:
    """How the rollout manager gets its SGLang servers (read by core through the registry): it launches
    them on its node, or uses ``--rollout-external-engine-addrs``."""
    return "external" if getattr(args, "rollout_external_engine_addrs", None) else "processes"


def external_engines(args) -> list[str]:
    """The running servers this run uses instead of launching engines (``--dry-run`` lists them)."""
    return list(getattr(args, "rollout_external_engine_addrs", None) or [])


def machine_problems(args) -> list[str]:
    """Engines launched with SGLang's own server (no external engines, no ``launch_command`` /
    ``$PLUGRL_SGLANG_LAUNCH_COMMAND``) need a supported ``sglang`` package on this machine: checked by
    its metadata before any actor starts, instead of by the rollout manager after the trainer loaded."""
    import os

    from . import compat, launch

    if engine_pool(args) != "processes" or os.environ.get(launch.LAUNCH_ENV):
        return []
    try:
        compat.check_version(compat.installed_version(), "--rollout-backend sglang (the installed sglang package)")
    except compat.UnsupportedSGLangError as exc:
        return [str(exc)]
    return []


def drops_released_weights(config) -> bool:
    """SGLang keeps no host copy of released weights unless ``--sglang-enable-weights-cpu-backup``
    (model_runner.py: the weights' memory-saver region backs up to CPU only with that flag)."""
    return not (getattr(config, "sglang_passthrough", None) or {}).get("enable_weights_cpu_backup")


def _released_weights_problems(args) -> list[str]:
    """Colocated engines release their weights while training; without a host copy every resume must be
    followed by a push, or the engines would serve released memory."""
    offloaded = bool(getattr(args, "offload_rollout", False) or getattr(args, "colocate", False))
    interval = int(getattr(args, "update_weights_interval", 1) or 1)
    if offloaded and interval > 1 and drops_released_weights(args) and not getattr(args, "async_train", False):
        return [f"--update-weights-interval {interval} with offloaded SGLang engines: SGLang releases their weights "
                "without a host copy, so the rollouts between pushes would run on released memory; use "
                "--update-weights-interval 1, pass --sglang-enable-weights-cpu-backup, or --no-offload-rollout"]
    return []


def backend_problems(args) -> list[str]:
    """slime flags the sglang backend accepts but does not implement, and passed-through words that the
    installed SGLang server or router does not know (``flag_names.py``), refused on the driver."""
    problems = []
    if getattr(args, "sglang_config", None):
        problems.append(f"--sglang-config {args.sglang_config}: server groups (several engine configurations in "
                        "one run) are not implemented; give the engine flags as --sglang-<flag> (one group)")
    problems.extend(_quantization_problems(args))
    problems.extend(_released_weights_problems(args))
    if getattr(args, "prefill_num_servers", None):
        problems.append(f"--prefill-num-servers {args.prefill_num_servers}: prefill/decode disaggregation is not "
                        "implemented; leave it unset (every engine prefills and decodes)")
    from .flag_names import passthrough_problems

    problems.extend(passthrough_problems(args))  # misspelled --sglang-*/--router-* words
    return problems


def _quantization_problems(args) -> list[str]:
    """An FP8 checkpoint in a format the pushes cannot reproduce (``fp8_config.py``); ``--sglang-quantization``
    on a checkpoint that is not quantized: SGLang quantizes it on load, and every weight push would then
    send BF16 tensors into FP8 parameters (plugrl quantizes pushes only for checkpoints whose config.json
    holds an FP8 quantization_config)."""
    config = _checkpoint_config(getattr(args, "hf_checkpoint", None))
    if config is None:  # not a local directory: the backend decides when it reads the config
        return []
    from .fp8_config import fp8_quantization_config

    try:
        fp8_quantization_config(config)
    except ValueError as exc:  # an FP8 checkpoint whose pushes plugrl cannot quantize the same way
        return [f"--hf-checkpoint {args.hf_checkpoint}: {exc}; plugrl pushes block-wise e4m3 weights with dynamic "
                "activation scales (Qwen3-FP8's format), or train from the BF16 checkpoint"]
    method = (getattr(args, "sglang_passthrough", None) or {}).get("quantization")
    if not method or method is True:
        return []
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") == method:
        return []
    held = f"a {quant.get('quant_method')} quantization_config" if quant else "no quantization_config (unquantized)"
    return [f"--sglang-quantization {method}: the checkpoint {args.hf_checkpoint} has {held}; SGLang would quantize "
            f"it on load and the weight pushes (unquantized {config.get('torch_dtype', 'bf16')} tensors) would not "
            f"match. Drop the flag, or train from an FP8 checkpoint (its config.json names quant_method fp8; plugrl "
            f"then pushes FP8 weights)"]


def _checkpoint_config(path) -> dict | None:
    import json
    from pathlib import Path

    if not path or not (Path(path) / "config.json").is_file():
        return None
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None  # preflight names a config.json that is no object


def server_overrides(args) -> dict:
    """``ServerArgs`` field -> value from the flags the user gave (own dests, then passthrough)."""
    values = {
        field: getattr(args, dest)
        for dest, field in SERVER_FIELDS.items()
        if getattr(args, dest, None) not in (None, False)
    }
    values.update(getattr(args, "sglang_passthrough", None) or {})
    return values


def router_settings(args) -> dict:
    """Router setting -> value: slime's defaults, the ``--router-*`` flags, then passthrough words."""
    values = {}
    for dest, default in ROUTER_DEFAULTS.items():
        value = getattr(args, dest, None)
        values[dest.removeprefix("router_")] = default if value is None else value
    if getattr(args, "router_policy", None) is not None:
        values["policy"] = args.router_policy
    values.update(getattr(args, "router_passthrough", None) or {})
    return values


@hookimpl
def plugrl_add_options(parser):
    g = parser.add_plugin_group(
        "sglang backend",
        "Owned by --rollout-backend sglang (requires plugrl[sglang]); any of them selects it. "
        "Any other --sglang-<flag> [value] is passed to sglang.launch_server as --<flag> [value]; "
        "any other --router-<flag> [value] goes to the router.",
        kind="rollout_backend",
        name="sglang",
    )
    g.add_argument(
        "--sglang-mem-fraction-static",
        type=float,
        metavar="FRACTION",
        help="GPU memory fraction for weights + KV cache (SGLang default: auto)",
    )
    g.add_argument("--sglang-cuda-graph-bs", type=int, nargs="+", metavar="BS", help="CUDA-graph batch sizes")
    g.add_argument("--sglang-enable-deterministic-inference", action="store_true", default=None)
    g.add_argument("--sglang-speculative-algorithm", metavar="NAME")
    g.add_argument(
        "--sglang-server-concurrency",
        dest="rollout_concurrency",
        type=int,
        default=argparse.SUPPRESS,
        help="in-flight samples per engine (slime's spelling of --rollout-concurrency, default 512)",
    )
    g.add_argument("--sglang-config", metavar="YAML", help="server groups (slime's --sglang-config; not implemented: refused)")
    g.add_argument("--sglang-router-ip", help="use this running router (default: launch one)")
    g.add_argument("--sglang-router-port", type=int)
    g.add_argument("--sglang-router-request-timeout-secs", type=int, help="(default 14400)")
    g.add_argument("--router-policy", metavar="NAME", help="router load-balancing policy")
    g.add_argument("--router-balance-abs-threshold", type=int, help="(slime default 10)")
    g.add_argument("--router-balance-rel-threshold", type=float, help="(slime default 1.2)")
    g.add_argument("--router-log-level", help="(slime default warn)")
    g.add_argument(
        "--rollout-external-engine-addrs",
        nargs="+",
        metavar="HOST:PORT",
        help="use these running SGLang servers instead of launching engines",
    )
    g.add_argument("--prefill-num-servers", type=int,
                   help="prefill servers for PD disaggregation (not implemented: refused)")
    parser.add_passthrough(
        "--sglang-",
        "sglang_passthrough",
        kind="rollout_backend",
        name="sglang",
        target="sglang.launch_server",
        reserved=RESERVED_SERVER_FLAGS,
    )
    parser.add_passthrough(
        "--router-", "router_passthrough", kind="rollout_backend", name="sglang", target="the sglang router"
    )

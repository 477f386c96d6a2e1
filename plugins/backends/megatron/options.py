"""The megatron train backend's flags (slime's Megatron flags of the Qwen3-4B guide, ``--megatron-*``).

Runs on the driver while ``plugrl train`` builds its parser; imports nothing from megatron, so the
flags parse on any laptop and the run then stops with "requires the megatron backend" if
megatron-core is missing. Every flag defaults to ``None`` (= Megatron's own default, or derived from
the HF checkpoint's config by the backend); giving any of them selects ``--train-backend megatron``.
``--megatron-<field> [value]`` flags that are not defined here are collected into
``args.megatron_passthrough`` (``{"field_name": value}``) and set on the TransformerConfig the
backend builds (``passthrough_overrides``; an unknown field is an error on the driver).
"""

from __future__ import annotations

from plugrl.core import hookimpl

# Architecture flags: the backend derives them from --hf-checkpoint's config.json; explicit values
# override, and a mismatch with the checkpoint is an error (slime's _hf_validate_args).
MODEL_FLAGS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "group_query_attention",
    "num_query_groups",
    "kv_channels",
    "use_rotary_position_embeddings",
    "disable_bias_linear",
    "normalization",
    "norm_epsilon",
    "qk_layernorm",
    "add_qkv_bias",
    "swiglu",
    "untie_embeddings_and_output_weights",
    "vocab_size",
    "rotary_base",
)


HOOK_FLAGS = ("custom_model_provider_path", "custom_megatron_init_path", "custom_megatron_before_log_prob_hook_path",
              "custom_megatron_before_train_step_hook_path")  # megatron/custom_hooks.py

# how megatron/custom_hooks.py calls each hook: (positional count, keywords, shown signature)
HOOK_CALLS = {
    "custom_model_provider_path": (0, ("pre_process", "post_process"), "fn(pre_process, post_process[, vp_stage])"),
    "custom_megatron_init_path": (1, (), "fn(args)"),
    "custom_megatron_before_log_prob_hook_path": (3, (), "fn(args, model, store_prefix)"),
    "custom_megatron_before_train_step_hook_path": (6, (), "fn(args, rollout_id, step_id, model, optimizer, "
                                                           "opt_param_scheduler)"),
}

UNSUPPORTED_PARALLELISM = ("pipeline_model_parallel_size", "context_parallel_size", "expert_model_parallel_size",
                           "expert_tensor_parallel_size")


# size -> dest of the parallel sizes this backend declares to core (parallel_sizes)
SIZE_DESTS = {"tp": "tensor_model_parallel_size", "pp": "pipeline_model_parallel_size", "cp": "context_parallel_size",
              "ep": "expert_model_parallel_size", "etp": "expert_tensor_parallel_size"}


def parallel_sizes(args):
    """The model-parallel sizes this run's flags give (read by core through the registry: the layout
    check, the ``--dry-run`` rank table, the memory plan). Unset sizes are 1 (expert TP: None, meaning
    as TP); the distributed optimizer shards optimizer state over DP unless
    ``--use-distributed-optimizer`` is switched off."""
    from plugrl.core.protocols import ParallelSizes

    given = {size: getattr(args, dest, None) for size, dest in SIZE_DESTS.items()}
    return ParallelSizes(
        **{size: 1 if value is None else value for size, value in given.items() if size != "etp"},
        etp=given["etp"],
        sequence_parallel=bool(getattr(args, "sequence_parallel", None)),
        distributed_optimizer=getattr(args, "use_distributed_optimizer", None) is not False,
        vocab_multiple=vocab_multiple(args, given["tp"] or 1),
        flags={size: "--" + dest.replace("_", "-") for size, dest in SIZE_DESTS.items()},
    )


def vocab_multiple(args, tp: int) -> int:
    """Megatron pads the vocabulary to a multiple of ``--make-vocab-size-divisible-by`` x TP; the padded
    rows are trained state (Adam moments included) but never exported."""
    from .config_bridge import DEFAULT_VOCAB_DIVISOR

    return int(getattr(args, "make_vocab_size_divisible_by", None) or DEFAULT_VOCAB_DIVISOR) * int(tp)


def _architecture_problems(args) -> list[str]:
    """Model flags (``--num-layers``, ``--rotary-base``, ...) that contradict a local ``--hf-checkpoint``'s
    config.json, found before Ray starts (the train actors would raise it after start). A custom model
    provider builds its own model, so its flags are not compared."""
    path = getattr(args, "hf_checkpoint", None)
    if not path or getattr(args, "custom_model_provider_path", None):
        return []
    from .config_bridge import _checkpoint_values, check_flags_against
    from .convert import read_hf_config

    try:
        values = _checkpoint_values(read_hf_config(path))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        # no or an unreadable config.json (preflight names it), or one the bridge cannot read (not an
        # object, another architecture: the train actor names it)
        return []
    try:
        check_flags_against(values, args)
    except ValueError as exc:
        return [f"{exc} (--hf-checkpoint {path}); drop the flag or correct it"]
    return []


def _range_problems(args) -> list[str]:
    """Model flags megatron-core would refuse (or misuse) in a train actor, long after start."""
    problems = [f"--{dest.replace('_', '-')} must be in [0, 1], got {value}"
                for dest in ("attention_dropout", "hidden_dropout")
                if (value := getattr(args, dest, None)) is not None and not 0 <= value <= 1]
    seq_length = getattr(args, "seq_length", None)
    if seq_length is not None and seq_length < 1:
        problems.append(f"--seq-length must be >= 1, got {seq_length}")
    return problems


def backend_problems(args) -> list[str]:
    """What plugrl's megatron backend cannot run, found on the driver before any actor or GPU (and
    again in each train actor). Each problem names the flag and what to use instead."""
    problems = []
    for dest in UNSUPPORTED_PARALLELISM:
        value = getattr(args, dest, None)
        if value not in (None, 1):
            problems.append(f"--{dest.replace('_', '-')} {value}: plugrl's megatron backend runs TP x DP only "
                            "(pipeline, context and expert parallelism are not implemented); use 1")
    granularity = getattr(args, "recompute_granularity", None)
    if granularity not in (None, "full", "selective"):
        problems.append(f"--recompute-granularity must be full or selective, got {granularity!r}")
    method = getattr(args, "recompute_method", None)
    if method not in (None, "uniform", "block"):
        problems.append(f"--recompute-method must be uniform or block, got {method!r}")
    if getattr(args, "optimizer", None) not in (None, "adam"):
        problems.append(f"--optimizer {args.optimizer}: plugrl's megatron backend trains with adam only")
    try:
        passthrough_overrides(args)
    except ValueError as exc:
        problems.append(str(exc))
    problems.extend(_architecture_problems(args))
    problems.extend(_range_problems(args))
    from plugrl.core.config import import_path_problems

    problems.extend(import_path_problems(args, HOOK_FLAGS))
    attention = getattr(args, "attention_backend", None)
    if attention not in (None, "auto", "flash", "unfused", "local"):
        problems.append(f"--attention-backend {attention}: plugrl's megatron backend runs flash (varlen flash "
                        "attention, CUDA), unfused/local (SDPA per sample) or auto; 'fused' needs Transformer "
                        "Engine's layer spec, which this backend does not use")
    backend = getattr(args, "distributed_backend", None)
    if backend not in (None, "nccl", "gloo"):
        problems.append(f"--distributed-backend {backend}: use nccl (CUDA) or gloo")
    elif backend == "nccl" and getattr(args, "device", None) == "cpu":
        problems.append("--distributed-backend nccl needs CUDA; with --device cpu use gloo (or leave it unset)")
    multiplier = getattr(args, "data_pad_size_multiplier", None)
    if multiplier is not None and multiplier < 1:
        problems.append(f"--data-pad-size-multiplier must be >= 1, got {multiplier}")
    if attention == "flash" and getattr(args, "device", None) == "cpu":  # caught here, not in a train actor
        problems.append("--attention-backend flash needs CUDA (varlen flash attention); with --device cpu use "
                        "--attention-backend auto or unfused")
    return problems


def machine_problems(args) -> list[str]:
    """On the driver, before Ray starts (the backend's ``machine_check``): each hook flag's module imported
    and its function callable the way the backend calls it, as core's ``--*-path`` flags are checked.
    Only the user's module is imported, not megatron."""
    from plugrl.core.preflight import import_path_problem

    problems = []
    for dest in HOOK_FLAGS:
        value = getattr(args, dest, None)
        if value and ("." in value or ":" in value):  # a malformed one is backend_problems' to name
            problem = import_path_problem(dest, value, HOOK_CALLS[dest])
            if problem:
                problems.append(problem)
    return problems


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def typed_override(where: str, field: str, value, default):
    """``value`` of TransformerConfig ``field`` typed by its ``default``; a value that is not one raises
    ``ValueError`` naming ``where`` (the flag, or the config file) and what to give."""
    if isinstance(default, bool) or value is True:
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word in TRUE_WORDS + FALSE_WORDS:
            return word in TRUE_WORDS
        raise ValueError(f"{where}: {field} is true or false; give one of {', '.join(TRUE_WORDS + FALSE_WORDS)} "
                         "(or the bare flag for true)")
    for kind, name in ((int, "a whole number"), (float, "a number")):
        if isinstance(default, kind):
            try:
                return kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: {field} is {name} (megatron's default {default}); give {name}") from None
    return value


def passthrough_overrides(args) -> dict:
    """``--megatron-<field> [value]`` flags -> megatron-core ``TransformerConfig`` overrides, typed by
    the field's default (plugrl builds the config itself instead of running Megatron's parser). An
    unknown field is an error that names the flag. Imports megatron only when such flags are given."""
    from plugrl.plugins.backends.megatron.custom_hooks import megatron_config_overrides

    from_file = megatron_config_overrides(getattr(args, "megatron_config_path", None))
    from_flags = getattr(args, "megatron_passthrough", None) or {}
    given = {**from_file, **from_flags}  # the command line wins over the file
    if not given:
        return {}
    import dataclasses

    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {f.name: f for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(k for k in from_flags if k not in fields)
    if unknown:
        flags = ", ".join(f"--megatron-{k.replace('_', '-')}" for k in unknown)
        raise ValueError(f"{flags}: not a megatron-core TransformerConfig field (plugrl passes --megatron-<field> "
                         "flags to the TransformerConfig it builds, not to Megatron's argument parser)")
    unknown = sorted(k for k in from_file if k not in fields)
    if unknown:
        raise ValueError(f"--megatron-config-path {args.megatron_config_path}: overrides {unknown} are not "
                         "megatron-core TransformerConfig fields (plugrl applies the actor overrides to the "
                         "TransformerConfig it builds)")
    overrides = {}
    for key, value in given.items():
        where = (f"--megatron-{key.replace('_', '-')} {value}" if key in from_flags
                 else f"--megatron-config-path {args.megatron_config_path} ({key}: {value!r})")
        overrides[key] = typed_override(where, key, value, fields[key].default)
    return overrides


def given_model_flags(args) -> dict:
    """The architecture flags the user set (not None), by dest."""
    return {name: getattr(args, name) for name in MODEL_FLAGS if getattr(args, name, None) is not None}


def _switch(group, flag: str, help_text: str | None = None) -> None:
    group.add_argument(flag, action="store_true", default=None, help=help_text)


@hookimpl
def plugrl_add_options(parser):
    g = parser.add_plugin_group(
        "megatron backend",
        "Owned by --train-backend megatron (requires plugrl[megatron]); any of them selects it. "
        "Unset = Megatron's default, or derived from the --hf-checkpoint config. "
        "Any other --megatron-<field> [value] sets that megatron-core TransformerConfig field.",
        kind="train_backend",
        name="megatron",
    )
    # parallelism
    g.add_argument("--tensor-model-parallel-size", type=int, metavar="TP")
    _switch(g, "--sequence-parallel")
    g.add_argument("--pipeline-model-parallel-size", type=int, metavar="PP")
    g.add_argument("--context-parallel-size", type=int, metavar="CP")
    g.add_argument("--expert-model-parallel-size", type=int, metavar="EP")
    g.add_argument("--expert-tensor-parallel-size", type=int, metavar="ETP")
    # recompute and numerics
    g.add_argument("--recompute-granularity", metavar="{full,selective}")
    g.add_argument("--recompute-method", metavar="{uniform,block}")
    g.add_argument("--recompute-num-layers", type=int)
    g.add_argument("--attention-dropout", type=float)
    g.add_argument("--hidden-dropout", type=float)
    _switch(g, "--accumulate-allreduce-grads-in-fp32")
    _switch(g, "--attention-softmax-in-fp32")
    g.add_argument("--attention-backend", metavar="{flash,fused,unfused,local,auto}")
    _switch(g, "--no-gradient-accumulation-fusion")
    # Fusions on CUDA (torch.compile'd PyTorch, no Transformer Engine): on unless switched off
    _switch(g, "--no-bias-swiglu-fusion", "run SwiGLU as separate kernels (megatron-core's fused swiglu is the default)")
    _switch(g, "--no-bias-dropout-fusion", "run the residual add unfused (megatron-core's fused bias-dropout-add "
            "is the default)")
    _switch(g, "--no-rope-fusion", "run RoPE (and the GQA key/value expansion) as separate kernels instead of "
            "plugrl's compiled ones")
    _switch(g, "--no-rmsnorm-fusion", "run the fp32 RMSNorm as separate kernels instead of plugrl's compiled one")
    # model architecture (scripts/models/qwen3-4B.sh)
    g.add_argument("--rotary-base", type=int)
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    _switch(g, "--group-query-attention")
    g.add_argument("--num-query-groups", type=int)
    g.add_argument("--kv-channels", type=int)
    _switch(g, "--use-rotary-position-embeddings")
    _switch(g, "--disable-bias-linear")
    g.add_argument("--normalization", metavar="{LayerNorm,RMSNorm}")
    g.add_argument("--norm-epsilon", type=float)
    _switch(g, "--qk-layernorm")
    _switch(g, "--add-qkv-bias", "q/k/v projection biases (slime's Qwen2.5 scripts; the checkpoint's model type "
            "decides it, so the flag only confirms it)")
    _switch(g, "--swiglu")
    _switch(g, "--untie-embeddings-and-output-weights")
    g.add_argument("--vocab-size", type=int)
    g.add_argument("--seq-length", type=int)
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--make-vocab-size-divisible-by", type=int)
    # runtime
    g.add_argument(
        "--data-pad-size-multiplier", type=int,
        help="pad each packed micro-batch to a multiple of (TP with sequence parallelism, else 1) x this "
             "(slime's default 128 suits Transformer Engine kernels; plugrl's default: no extra padding)"
    )
    g.add_argument("--distributed-backend", metavar="{nccl,gloo}",
                   help="the train ranks' torch.distributed backend (default: nccl on CUDA, gloo on CPU)")
    _switch(g, "--use-distributed-optimizer")
    _switch(g, "--overlap-grad-reduce", "with more than one data-parallel rank: reduce each gradient bucket over DP "
            "while the last micro-batch's backward still runs (Megatron's flag; off by default, as in Megatron)")
    # slime's Megatron escape hatches (reference §10)
    g.add_argument("--megatron-config-path", metavar="YAML",
                   help="megatron: [{name, role: actor, overrides: {TransformerConfig field: value}}]")
    g.add_argument("--custom-model-provider-path", metavar="MODULE.ATTR",
                   help="fn(pre_process, post_process[, vp_stage, config, layer_spec]) -> GPTModel")
    g.add_argument("--custom-megatron-init-path", metavar="MODULE.ATTR", help="fn(args), after the process groups")
    g.add_argument("--custom-megatron-before-log-prob-hook-path", metavar="MODULE.ATTR",
                   help="fn(args, model, store_prefix), before old ('') and ref ('ref_') log-probs")
    g.add_argument("--custom-megatron-before-train-step-hook-path", metavar="MODULE.ATTR",
                   help="fn(args, rollout_id, step_id, model, optimizer, opt_param_scheduler), before each step")
    parser.add_passthrough(
        "--megatron-",
        "megatron_passthrough",
        kind="train_backend",
        name="megatron",
        target="megatron-core's TransformerConfig",
    )

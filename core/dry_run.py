"""The run plan on the driver: train ranks and their Megatron coordinates, the placement of train
ranks and rollout engines, and the batch arithmetic. ``validate_config`` checks it (``layout_problems``)
and ``plugrl train --dry-run`` prints it (``print_dry_run``); neither touches a GPU nor starts Ray.

The printed form is YAML: the resolved config, then the plan as ``#`` comment lines, so
``plugrl train ... --dry-run > run.yaml`` gives a file that ``--config run.yaml`` reads back.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .plugin_traits import external_engines, parallel_sizes, train_trait


@dataclass(frozen=True)
class TrainLayout:
    """Train world and Megatron parallel sizes; DP is what TP × PP × CP leave of the world."""

    world: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sequence_parallel: bool = False

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.cp

    @property
    def dp(self) -> int:
        return self.world // self.model_parallel

    def coordinates(self, rank: int) -> dict[str, int]:
        """Megatron's default rank order ``tp-cp-ep-dp-pp`` (TP varies fastest; EP lies inside DP for a
        dense model): with PP = CP = 1, rank r has tp rank r % TP and dp rank r // TP."""
        return {
            "tp": rank % self.tp,
            "cp": rank // self.tp % self.cp,
            "dp": rank // (self.tp * self.cp) % self.dp,
            "pp": rank // (self.tp * self.cp * self.dp),
        }


def train_layout(args: argparse.Namespace, sizes=None) -> TrainLayout:
    """The train world and the selected backend's model-parallel sizes (its ``parallel_sizes`` trait)."""
    sizes = sizes or parallel_sizes(args)
    return TrainLayout(
        world=args.actor_num_nodes * args.actor_num_gpus_per_node,
        tp=sizes.tp, pp=sizes.pp, cp=sizes.cp, sequence_parallel=sizes.sequence_parallel,
    )


def placement_request(args: argparse.Namespace, options=None):
    from .protocols import PlacementRequest

    return PlacementRequest(
        args.actor_num_nodes,
        args.actor_num_gpus_per_node,
        args.rollout_num_gpus,
        args.rollout_num_gpus_per_engine,
        args.num_gpus_per_node,
        options,
    )


def placement_plan(args: argparse.Namespace, plugin_set):
    """The selected placement's plan (driver: config check, ``--dry-run``, the loop): the plugin called
    with the request, its declared options in ``request.options`` (``--placement-opt``; a plain dict
    when it declares none). Raises ValueError (``OptionsError`` for bad options) for a plan it refuses."""
    from .plugin_options import build_options

    options = build_options(plugin_set.entry("placement", args.placement), args, check=False)
    return plugin_set.get("placement", args.placement)(placement_request(args, options))


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def layout_problems(args: argparse.Namespace) -> list[str]:
    """What the train layout needs before any GPU work: parallel sizes that divide the train GPUs, and
    (megatron) steps big enough for every data-parallel rank. Each problem names the flags to change."""
    sizes = parallel_sizes(args)  # declared by the train backend (its flags)
    problems = [
        f"{sizes.flag(name)} must be >= 1, got {getattr(sizes, name)}"
        for name in ("tp", "pp", "cp", "ep", "etp")
        if getattr(sizes, name) is not None and getattr(sizes, name) < 1
    ]
    nodes, per_node = args.actor_num_nodes, args.actor_num_gpus_per_node
    if not all(isinstance(v, int) and v >= 1 for v in (nodes, per_node, args.num_gpus_per_node)):
        return problems  # the placement check reports these
    if per_node > args.num_gpus_per_node:
        problems.append(
            f"--actor-num-gpus-per-node {per_node} is more than a node has (--num-gpus-per-node "
            f"{args.num_gpus_per_node}); use more --actor-num-nodes or raise --num-gpus-per-node"
        )
    if problems or args.debug_rollout_only:
        return problems
    layout = train_layout(args, sizes)
    gpus = f"the {layout.world} train GPUs (--actor-num-nodes {nodes} × --actor-num-gpus-per-node {per_node})"
    model = [(sizes.flag(name), getattr(sizes, name)) for name in ("tp", "pp", "cp")]
    shown = [f"{flag} {value}" for flag, value in model if value > 1 or flag == sizes.flag("tp")]
    if layout.world % layout.model_parallel:
        if sum(value > 1 for _, value in model) <= 1:
            flag, value = next(((f, v) for f, v in model if v > 1), model[0])
            problems.append(
                f"{flag} {value} does not divide {gpus}; use a size that divides {layout.world} "
                f"({_divisors(layout.world)}) or change the train GPUs"
            )
        else:
            problems.append(
                f"{' × '.join(shown)} = {layout.model_parallel} does not divide {gpus}; the product must "
                f"divide {layout.world}: lower one of them or change the train GPUs"
            )
        return problems
    ep, etp = sizes.ep, sizes.etp
    expert = ep * (layout.tp if etp is None else etp) * layout.pp
    if layout.world % expert:
        problems.append(
            f"{sizes.flag('ep')} {ep} × {sizes.flag('etp')} {etp or layout.tp} × "
            f"{sizes.flag('pp')} {layout.pp} = {expert} does not divide {gpus}; lower one of them"
        )
    if train_trait(args, "full_dp_steps", False):  # e.g. megatron's schedule
        problems.extend(_step_problems(args, layout))
    return problems


def _step_problems(args: argparse.Namespace, layout: TrainLayout) -> list[str]:
    """Every DP rank needs micro-batches in every optimizer step (slime's schedule asserts it)."""
    size, dp = args.global_batch_size, layout.dp
    if not size or dp <= 1:
        return []
    if size < dp:
        problem = (
            f"--global-batch-size {size} gives each optimizer step {size} samples, fewer than the {dp} "
            f"data-parallel ranks ({layout.world} train GPUs / {layout.model_parallel} per model replica); "
            "raise --global-batch-size or lower the train GPUs"
        )
        return [problem]
    micro = args.micro_batch_size or 1
    count = -(-size // micro)
    if not args.use_dynamic_batch_size and count % dp:
        problem = (
            f"--global-batch-size {size} in chunks of --micro-batch-size {micro} gives {count} micro-batches per "
            f"step, which do not divide evenly over {dp} data-parallel ranks; make --global-batch-size a multiple "
            f"of --micro-batch-size × {dp}, or use --use-dynamic-batch-size with --max-tokens-per-gpu"
        )
        return [problem]
    return []


# --------------------------------------------------------------------------------------------------
# Description
# --------------------------------------------------------------------------------------------------


def _span(bundles) -> str:
    bundles = list(bundles)
    return f"{bundles[0]}" if len(bundles) == 1 else f"{bundles[0]}-{bundles[-1]}"


def _train_lines(args: argparse.Namespace, plan) -> list[str]:
    if args.debug_rollout_only:
        return ["train: none (--debug-rollout-only)"]
    layout = train_layout(args)
    parallel = f"TP {layout.tp} × PP {layout.pp} × CP {layout.cp} → DP {layout.dp}"
    if layout.sequence_parallel:
        parallel += ", sequence parallel" if layout.tp > 1 else " (--sequence-parallel has no effect with TP 1)"
    shown = [k for k in ("tp", "cp", "dp", "pp") if k in ("tp", "dp") or getattr(layout, k) > 1]
    header = (
        f"train: {args.train_backend} backend, world size {layout.world} (--actor-num-nodes {args.actor_num_nodes} "
        f"× --actor-num-gpus-per-node {args.actor_num_gpus_per_node}); {parallel}"
    )
    lines = [header, "  rank  bundle  " + "  ".join(shown)]
    for rank, bundle in enumerate(plan.actor_bundles):
        coords = layout.coordinates(rank)
        lines.append(f"  {rank:>4}  {bundle:>6}  " + "  ".join(f"{coords[k]:>{len(k)}}" for k in shown))
    if layout.tp > 1:
        groups = [list(range(start, start + layout.tp)) for start in range(0, layout.world, layout.tp)]
        lines.append("  TP groups (ranks): " + " ".join(_span(g) for g in groups))
    return lines


def _rollout_lines(args: argparse.Namespace, plan) -> list[str]:
    external = external_engines(args)
    if external:
        return [f"rollout: {args.rollout_backend} backend, external engines {' '.join(external)} (no local engines)"]
    per_engine, per_node = args.rollout_num_gpus_per_engine, args.num_gpus_per_node
    actors_per_server = max(1, per_engine // per_node)  # an engine wider than a node: one actor per node
    servers = [
        sum(plan.engine_bundles[i : i + actors_per_server], ())
        for i in range(0, len(plan.engine_bundles), actors_per_server)
    ]
    where = "colocated with training (shared GPUs)" if plan.colocated else "on GPUs of their own (decoupled)"
    header = (
        f"rollout: {args.rollout_backend} backend, {_count(len(servers), 'engine')} × {_count(per_engine, 'GPU')} "
        f"(--rollout-num-gpus {len(plan.rollout_bundles)} / --rollout-num-gpus-per-engine {per_engine}), {where}"
    )
    lines = [header]
    lines += [f"  engine {i}: bundles {_span(bundles)}" for i, bundles in enumerate(servers)]
    fp8 = _fp8_block(args.hf_checkpoint)
    if fp8:
        lines.append(
            f"  weights: the engines serve the FP8 --hf-checkpoint (block {fp8}); each push quantizes the trained "
            "BF16 weights to float8_e4m3 blocks"
        )
    if plan.colocated:
        train = "offloads while generating" if args.offload_train else "keeps its GPU memory while generating"
        engines = "release weights and KV cache" if args.offload_rollout else "keep their GPU memory"
        lines.append(
            f"  memory: the trainer {train} (--offload-train {_on(args.offload_train)}); engines {engines} while "
            f"training (--offload-rollout {_on(args.offload_rollout)})"
        )
    return lines


def _fp8_block(hf_checkpoint: str | None) -> str | None:
    """The ``weight_block_size`` of an FP8 checkpoint's ``quantization_config`` (read as JSON: no torch),
    "per-tensor" without one, None for a non-FP8 or unreadable checkpoint."""
    try:
        config = json.loads((Path(hf_checkpoint) / "config.json").read_text())
    except (TypeError, OSError, ValueError):
        return None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quant, dict) or quant.get("quant_method") != "fp8":
        return None
    block = quant.get("weight_block_size")
    return "×".join(str(b) for b in block) if isinstance(block, list) else "per-tensor"


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _batch_lines(args: argparse.Namespace) -> list[str]:
    prompts, n = args.rollout_batch_size, args.n_samples_per_prompt
    if not prompts:
        return []
    total = prompts * n
    lines = [f"rollout batch: {prompts} prompts × {n} samples = {total} samples per rollout"]
    over = args.over_sampling_batch_size or prompts
    keep = args.dynamic_sampling_filter or args.dynamic_sampling_filter_path
    if keep or over != prompts:
        rule = f"groups kept by {keep}" if keep else "all groups kept"
        lines.append(
            f"  sampling: {over} prompts per round (--over-sampling-batch-size), {rule} until {prompts} are "
            "collected; then the rest is aborted"
        )
    if args.partial_rollout:
        buffer = args.buffer_filter_path or args.buffer_filter
        lines.append(f"  partial rollout: aborted groups go back to the buffer ({buffer}) and continue next rollout")
    size, steps = args.global_batch_size, args.num_steps_per_rollout
    if size and steps:
        lines.append(
            f"optimizer: --global-batch-size {size} → {steps} optimizer step{'s' if steps > 1 else ''} per rollout "
            f"({prompts} × {n} / {size})"
        )
    if not args.debug_rollout_only and size:
        layout = train_layout(args)
        dp = max(1, layout.dp)
        if args.use_dynamic_batch_size:
            cap = args.max_tokens_per_gpu * layout.cp if args.max_tokens_per_gpu else None
            lines.append(
                f"micro-batches: dynamic (--use-dynamic-batch-size): the {size} samples of a step are packed first-fit "
                f"into micro-batches of at most {cap} tokens (--max-tokens-per-gpu {args.max_tokens_per_gpu} × CP "
                f"{layout.cp}), their count made a multiple of DP {dp}; --micro-batch-size is not used"
            )
        else:
            micro = args.micro_batch_size or 1
            count = -(-size // micro)
            lines.append(
                f"micro-batches: static, --micro-batch-size {micro} → {count} per step, {count / dp:g} per DP rank "
                f"(DP {dp})"
            )
        if dp > 1:
            deal = "Karmarkar-Karp on estimated compute (--balance-data)" if args.balance_data else "round robin"
            lines.append(f"  dealt to DP ranks by {deal}; {size / dp:g} samples per DP rank per step on average")
    per_epoch = getattr(args, "_rollouts_per_epoch", None)
    if per_epoch:  # resolved on the driver from the prompt count (core/prompt_check.resolve_num_rollout)
        length = (f"{args.num_rollout} rollouts (--num-epoch {args.num_epoch} × {per_epoch} per epoch: "
                  f"{args._epoch_prompts} prompts // --rollout-batch-size {args.rollout_batch_size})")
        if steps:
            length += f" = {args.num_rollout * steps} optimizer steps"
    elif args.num_rollout is not None:
        length = f"{args.num_rollout} rollouts (--num-rollout)"
        if steps:
            length += f" = {args.num_rollout * steps} optimizer steps"
    elif args.num_epoch is not None:
        length = f"{args.num_epoch} epochs over --prompt-data (--num-epoch)"
    else:
        length = "no run length"
    loop = "async: rollout k+1 is generated while training on k" if args.async_train else "sync"
    lines.append(f"loop: {loop}; {length}")
    if args.eval_interval and args.eval_prompt_data:
        names = args.eval_prompt_data[0::2] if len(args.eval_prompt_data) > 1 else ["aime"]
        lines.append(
            f"eval: every {args.eval_interval} rollouts on {', '.join(names)}, {args.n_samples_per_eval_prompt} "
            f"samples per prompt, up to {args.eval_max_response_len} tokens"
        )
    return lines


def describe_run(args: argparse.Namespace, plugin_set) -> list[str]:
    """The plan lines ``--dry-run`` prints (for a config that passed ``check_config``)."""
    from .placement_layout import describe_plan

    lines = []
    if args.device == "cpu":
        lines.append("--device cpu: no placement group; the train and rollout actors run on CPU")
    else:
        from .registry import PluginError

        try:
            plan = placement_plan(args, plugin_set)
        except (PluginError, ImportError, ValueError) as exc:  # e.g. a third-party placement missing a package
            return lines + [f"placement {args.placement}: cannot plan on this machine ({exc})"] + _batch_lines(args)
        lines += describe_plan(plan, args.placement).splitlines()
        if args.device == "auto":
            lines.append("(--device auto: this placement is used when the cluster has GPUs; else all runs on CPU)")
        lines += _train_lines(args, plan) + _rollout_lines(args, plan)
        from .memory_plan import plan_memory

        memory = plan_memory(args, colocated=plan.colocated)
        lines += memory.lines() if memory else ["memory: no plan (the checkpoint's config.json is not readable here)"]
    from .preflight import start_point

    start = start_point(args)
    if start:
        lines.append(start)
    dropped = getattr(args, "_dropped", None)
    if dropped:
        lines.append(f"recipe values dropped (their plugin was replaced): {', '.join(dropped)}")
    return lines + _batch_lines(args)


def print_dry_run(args: argparse.Namespace, plugin_set, missing: list[str], out: TextIO | None = None,
                  err: TextIO | None = None) -> int:
    """Print the resolved config and the plan; ``missing`` (what this machine lacks: files, packages)
    goes to stderr. Exit status: 0 ready to run here, 1 valid but not runnable on this machine."""
    import yaml

    from .config import config_to_dict

    out, err = out or sys.stdout, err or sys.stderr
    config = config_to_dict(args)
    config.pop("dry_run", None)  # the printed config is the run's, reusable with --config
    print(yaml.safe_dump(config, sort_keys=True).rstrip(), file=out)
    print("# ---- plan (dry run: no GPU touched, Ray not started) ----", file=out)
    for line in describe_run(args, plugin_set):
        print(f"# {line}".rstrip(), file=out)
    if not missing:
        print("# ready: every path and package this run needs is here", file=out)
        return 0
    print(f"plugrl train --dry-run: the config is valid, but this machine cannot start the run "
          f"({len(missing)} problem{'s' if len(missing) > 1 else ''}):", file=err)
    for problem in missing:
        print(f"  - {problem}", file=err)
    return 1

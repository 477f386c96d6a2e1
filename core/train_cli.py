"""``plugrl train``: parse and validate the config on the driver, then run the loop.

With no data or checkpoint given, it runs the embedded default: the tiny Qwen3 checkpoint (built once
and cached), the bundled toy math data, a short format warm-up, then GRPO with the deepscaler reward.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

from .config import DEFAULT_RECIPE


def tiny_default_values() -> dict:
    """The embedded default run (a few minutes on 2 CPU cores): see ``tiny_default.py`` for the task."""
    from .plugin_traits import default_data

    files = default_data()  # declared by the train backend that supplies the default run
    return {
        "prompt_data": str(files["train"]), "input_key": "prompt", "label_key": "label",
        "apply_chat_template": True, "rollout_shuffle": True,
        "eval_prompt_data": ["toy_math", str(files["eval"])], "eval_interval": 20,
        "n_samples_per_eval_prompt": 4,
        "rm_type": "deepscaler", "advantage_estimator": "grpo",
        "rollout_batch_size": 32, "n_samples_per_prompt": 8, "num_rollout": 100,
        "rollout_max_response_len": 16, "rollout_temperature": 1.0,
        "global_batch_size": 256, "micro_batch_size": 64,
        "lr": 1e-3, "adam_beta1": 0.9, "adam_beta2": 0.98, "weight_decay": 0.0, "clip_grad": 1.0,
        "sft_warmup_steps": 1000, "sft_warmup_lr": 3e-3, "sft_warmup_batch_size": 32,
        "sft_warmup_prompt_loss_weight": 1.0, "sft_warmup_data": str(files["sft"]),
    }


# any of these, on the command line or as a key of the --config file, makes the run the user's own
RUN_DEFINING_FLAGS = {"--prompt-data", "--hf-checkpoint", "--recipe"}


def _uses_default_run(argv: list[str]) -> bool:
    """True when neither the command line nor the ``--config`` file names the data, the model or a
    recipe: the run is then the embedded default, with the given flags and keys on top of it (so
    moving flags into a YAML file changes nothing)."""
    from .config import _pre_parse
    from .flags import ConfigError, read_yaml

    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    config = _pre_parse(argv).config
    if config:
        try:
            given |= {"--" + str(key).replace("_", "-") for key in read_yaml(config, "--config")}
        except ConfigError:
            return False  # parse_config reports the unreadable file, naming it
    return not given & RUN_DEFINING_FLAGS


def main(argv: list[str]) -> int:
    from .config import (
        ConfigError,
        check_config,
        config_to_dict,
        environment_problems,
        parse_config,
        validate_config,
    )
    from .plugins import load_plugins
    from .registry import PluginError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        plugin_set = load_plugins()  # PLUGRL_STRICT_PLUGINS=1: a broken or duplicate plugin stops here
    except PluginError as exc:
        print(f"plugrl train: error: {exc}", file=sys.stderr)
        return 2
    if not any(a in ("-h", "--help") for a in argv):
        warn_plugin_problems(plugin_set)
    if _uses_default_run(argv) and not any(a in ("-h", "--help") for a in argv):
        argv = ["--recipe", DEFAULT_RECIPE, *argv]
    try:
        args = parse_config(argv, plugin_set)
        if getattr(args, "recipe", None) == DEFAULT_RECIPE and not args.hf_checkpoint:
            from .plugin_traits import default_checkpoint

            args.hf_checkpoint = str(default_checkpoint())
        if args.dry_run:
            # a dry run previews a run anywhere (e.g. a laptop for an 8-GPU recipe): only the values must
            # be valid; what this machine lacks (files, packages) is listed after the plan
            check_config(args, plugin_set)
            missing = environment_problems(args, plugin_set)
        else:
            validate_config(args, plugin_set)
        if not (args.dry_run and missing):  # the data is there to count
            run_length(args)
    except (ConfigError, PluginError) as exc:
        print(f"plugrl train: error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        from .dry_run import print_dry_run

        return print_dry_run(args, plugin_set, missing)
    from .preflight import finished_run

    finished = finished_run(args)
    if finished:  # resuming a run that is complete: nothing to start Ray and the model for
        print(f"plugrl train: {finished}", flush=True)
        return 0
    from .loop import run_training
    from .metrics import MetricsLogger

    from .checkpoint import lock_run_dirs

    owner = f"plugrl train, pid {os.getpid()}, output {args.output_dir}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
    _locks, busy = lock_run_dirs(args.load, args.save, owner)  # held until this process exits
    if busy:
        print(f"plugrl train: error: {busy}", file=sys.stderr)
        return 2
    resume_from = prepare_dirs(args)
    metrics_logger = MetricsLogger(args.output_dir, use_tensorboard=bool(args.use_tensorboard),
                                   use_wandb=bool(args.use_wandb), wandb_project=args.wandb_project,
                                   wandb_group=args.wandb_group, wandb_mode=args.wandb_mode, wandb_key=args.wandb_key,
                                   config=config_to_dict(args))
    metrics_logger.write_config(config_to_dict(args))
    metrics_logger.log_meta(run_plugins(args, plugin_set), rollout_id=-1 if resume_from is None else resume_from + 1)
    started = time.time()
    todo = (f"{args.num_rollout} rollouts" if resume_from is None else
            f"rollouts {resume_from + 1}-{args.num_rollout - 1} of {args.num_rollout} (resuming after rollout {resume_from})")
    print(f"plugrl train: {todo}, output in {args.output_dir}", flush=True)
    from .loop import ActorDiedError
    from .plugin_call import PluginCallError
    from .reward_call import RewardError
    from ray.exceptions import RayTaskError

    from .ray_connect import ClusterConnectError

    progress = ProgressBars()
    try:
        summary = run_training(args, plugin_set, logger_=metrics_logger, on_phase=progress.on_phase,
                               on_progress=progress.on_progress)
        progress.close()
    except (ActorDiedError, RewardError, PluginCallError) as exc:
        cause = getattr(exc, "cause", None)  # Ray wraps an actor's exception; its traceback is in the log above
        print(f"\nplugrl train: error: {cause if isinstance(cause, BaseException) else exc}", file=sys.stderr)
        if isinstance(exc, PluginCallError):  # (a dead actor's message already says what is kept)
            from .checkpoint import stopped_run_hint

            print(f"plugrl train: {stopped_run_hint(args.output_dir, args.save)}", file=sys.stderr)
        return 1
    except ClusterConnectError as exc:  # --ray-address: no cluster to join (nothing ran, nothing to resume)
        progress.close()
        print(f"\nplugrl train: error: {exc}", file=sys.stderr)
        return 1
    except RayTaskError as exc:  # anything else an actor method raised: one line, the traceback in a file
        from .run_errors import task_error_line

        return _stopped_with(args, progress, task_error_line(exc), exc)
    except OSError as exc:  # on the driver: its files (a full or read-only --output-dir), or a wait that ran out
        return _stopped_with(args, progress, driver_error_line(exc), exc)
    except (KeyboardInterrupt, SystemExit) as exc:  # the loop's cleanup has stopped the actors; say what is kept
        # SIGTERM (kill, timeout, a scheduler's preemption): the loop's handler raises KeyboardInterrupt and
        # records it; before that handler is installed, Ray's own turns it into sys.exit(SIGTERM)
        from .loop import SIGTERM_RECEIVED

        terminated = bool(SIGTERM_RECEIVED) or isinstance(exc, SystemExit)
        if isinstance(exc, SystemExit) and exc.code != signal.SIGTERM:
            raise
        progress.close()
        from .checkpoint import stopped_run_hint

        what = "terminated (SIGTERM)" if terminated else "interrupted"
        print(f"\nplugrl train: {what}. {stopped_run_hint(args.output_dir, args.save)}", file=sys.stderr)
        return 128 + signal.SIGTERM if terminated else 130  # the shell's codes for these signals
    totals = metrics_logger.reward_totals
    if totals["samples"] and totals["failed"] >= totals["samples"]:
        print(f"plugrl train: error: every reward call of the run failed ({totals['failed']} of {totals['samples']} "
              f"samples scored 0); see rollout/reward_errors in {args.output_dir}/metrics.jsonl and the first "
              "failure logged above", file=sys.stderr)
        return 1
    elapsed = time.time() - started
    print(f"done in {elapsed:.0f}s: {summary.rollouts} rollouts; metrics in {args.output_dir}/metrics.jsonl")
    for key in sorted(k for k in summary.last_eval if k.endswith("/pass@1")):
        first = summary.first_eval.get(key)
        last = summary.last_eval[key]
        if first is not None:
            print(f"{key}: first eval {first:.3f} -> last eval {last:.3f} ({last - first:+.3f})")
        else:
            print(f"{key}: last eval {last:.3f}")
    return 0


def driver_error_line(exc: OSError) -> str:
    """An ``OSError`` raised on the driver, in one line: a file operation (its path and the system's reason),
    a timed-out wait (Ray's ``GetTimeoutError`` is a ``TimeoutError``, an ``OSError``), or another."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, TimeoutError):
        return f"waiting on the actors timed out ({type(exc).__name__}: {text})"
    if exc.errno is not None and not isinstance(exc, ConnectionError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"a file operation on the driver failed{where}: {exc.strerror or text}"
    return f"{type(exc).__name__} on the driver: {text}"


def _stopped_with(args, progress, line: str, exc: BaseException) -> int:
    """Print ``line`` as the run's error (the full traceback to ``error.log``) and the stop hint; exit 1."""
    progress.close()
    from .checkpoint import stopped_run_hint
    from .run_errors import write_error_log

    log = write_error_log(args.output_dir, exc)
    print(f"\nplugrl train: error: {line}{f' (full traceback in {log})' if log else ''}", file=sys.stderr)
    print(f"plugrl train: {stopped_run_hint(args.output_dir, args.save)}", file=sys.stderr)
    return 1


def run_length(args) -> None:
    """``--num-epoch`` without ``--num-rollout``: the number of rollouts, from the prompts the run will load
    (on the driver, so the start line, the dry run and the LR schedule know it)."""
    from .flags import ConfigError
    from .prompt_check import resolve_num_rollout

    problem = resolve_num_rollout(args)
    if problem:
        raise ConfigError(problem)


def warn_plugin_problems(plugin_set) -> None:
    """Once, on the driver: installed plugins that failed to load or reuse a name, and
    PLUGRL_DISABLE_PLUGINS names that match nothing (strict mode has already refused problems)."""
    for warning in plugin_set.warnings:
        print(f"plugrl train: warning: {warning}", file=sys.stderr)
    for problem in plugin_set.problems:
        print(f"plugrl train: warning: {problem} (the run is unaffected unless it selects one of these names; "
              "`plugrl plugins check` lists every problem, PLUGRL_STRICT_PLUGINS=1 makes them fatal)", file=sys.stderr)


def run_plugins(args, plugin_set) -> dict:
    """What produced this run's numbers, for the ``phase: "meta"`` line of ``metrics.jsonl``: each selected
    plugin's name and origin (``--*-path`` functions by their import path)."""
    import plugrl

    def pick(kind: str, name: str | None, path_flag: str, path: str | None):
        if path:
            return {"name": None, "origin": f"{path_flag} {path}"}
        if not name:
            return None
        entry = plugin_set.entry(kind, name)
        return {"name": entry.name, "origin": entry.origin}

    plugins = {
        "reward": pick("reward", args.rm_type, "--custom-rm-path", args.custom_rm_path),
        "advantage_estimator": pick("advantage_estimator", args.advantage_estimator, "--custom-advantage-function-path",
                                    getattr(args, "custom_advantage_function_path", None)),
        "filter": pick("filter", args.dynamic_sampling_filter, "--dynamic-sampling-filter-path",
                       args.dynamic_sampling_filter_path),
        "buffer_policy": pick("buffer_policy", args.buffer_filter, "--buffer-filter-path", args.buffer_filter_path),
        "reward_post_processors": [pick("reward_post_processor", n, "", None) for n in args.reward_post_process],
        "train_backend": pick("train_backend", args.train_backend, "", None),
        "rollout_backend": pick("rollout_backend", args.rollout_backend, "", None),
        "placement": pick("placement", args.placement, "", None),
    }
    short = {k: (v["name"] or v["origin"]) if isinstance(v, dict) else v
             for k, v in plugins.items() if k in ("reward", "advantage_estimator", "filter")}
    return {**short, "plugrl_version": plugrl.__version__, "plugins": plugins,
            "rm_opt": dict(args.rm_opt or {}), "filter_opt": dict(args.filter_opt or {}),
            "adv_opt": dict(getattr(args, "adv_opt", None) or {}),
            "buffer_opt": dict(getattr(args, "buffer_opt", None) or {}),
            "placement_opt": dict(getattr(args, "placement_opt", None) or {})}


def prepare_dirs(args) -> int | None:
    """Before anything writes: tidy what a killed run left under ``--save`` / ``--load``, apply
    ``--overwrite-save``, and keep ``metrics.jsonl`` one history (a resumed run moves the lines it
    will log again to ``metrics.superseded.jsonl``; a new run renames an old file). Returns the rollout
    id of the checkpoint the run resumes from (None for a fresh run)."""
    from .checkpoint import checkpoint_rollout_id, clean_interrupted_writes, delete_checkpoints, find_latest_checkpoint
    from .metrics import set_aside_rows, start_fresh_metrics
    from .preflight import same_dir, start_point

    for root in dict.fromkeys(d for d in (args.load, args.save) if d):
        for change in clean_interrupted_writes(root):
            print(f"plugrl train: {root}: {change} (left by an interrupted checkpoint write)", flush=True)
    if args.save and getattr(args, "overwrite_save", False) and not same_dir(args.load, args.save):
        removed = delete_checkpoints(args.save)
        if removed:
            print(f"plugrl train: --overwrite-save: deleted {', '.join(removed)} from {args.save}", flush=True)
    latest = find_latest_checkpoint(args.load) if args.load else None
    resume_from = checkpoint_rollout_id(latest) if latest else None
    if resume_from is not None:
        moved = set_aside_rows(args.output_dir, resume_from + 1)
        if moved:
            print(f"plugrl train: resuming after rollout {resume_from}: {moved} metrics line(s) of later rollouts "
                  f"moved to {args.output_dir}/metrics.superseded.jsonl", flush=True)
    else:
        if args.load:  # a fresh start despite --load: say so (the first run of --load DIR --save DIR)
            print(f"plugrl train: {start_point(args)}", flush=True)
        kept = start_fresh_metrics(args.output_dir)
        if kept:
            print(f"plugrl train: {args.output_dir} held another run's metrics.jsonl; kept it as {kept.name}",
                  flush=True)
    return resume_from


class ProgressBars:
    """Driver-side progress: one bar per phase of the running rollout (generate, reward, train),
    fed by the actors' ``progress()`` while they work; closed when the rollout's line is printed.
    Outside a terminal (output redirected to a file) a plain line every ``every`` s instead of bars."""

    def __init__(self, stream=None, every: float = 30.0):
        from .progress import is_terminal

        self.bars: dict = {}
        self.rollout_id = None
        self.stream = stream or sys.stderr
        self.terminal = is_terminal(self.stream)
        self.every = every
        self._last_line = time.monotonic()

    def on_phase(self, name: str, rollout_id: int) -> None:
        if rollout_id != self.rollout_id:
            self.close()
            self.rollout_id = rollout_id
        if rollout_id < 0:
            print(f"[{name}]", flush=True)

    def on_progress(self, counters: dict) -> None:
        if not self.terminal:
            if time.monotonic() - self._last_line >= self.every:
                self._last_line = time.monotonic()
                shown = ", ".join(f"{name} {done}/{total}" for name, (done, total) in counters.items() if total)
                if shown:
                    print(f"rollout {self.rollout_id}: {shown}", file=self.stream, flush=True)
            return
        from tqdm import tqdm

        for name, (done, total) in counters.items():
            if not total:
                continue
            bar = self.bars.get(name)
            if bar is None:
                bar = self.bars[name] = tqdm(total=total, desc=f"rollout {self.rollout_id} {name}", leave=False,
                                             dynamic_ncols=True, file=self.stream, position=len(self.bars))
            bar.total = total
            bar.n = min(done, total)
            bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars = {}

"""The driver: starts Ray actors where the placement plan says and runs the training loop.

Actors: one rollout manager and a train group of N = --actor-num-nodes × --actor-num-gpus-per-node
ranks (``core/train_group.py``; one torch.distributed world). On GPU one placement group of
``plan.num_bundles`` bundles is created and its bundles are ordered by (node IP, GPU id) as slime
does, so logical bundle i (train rank i) is the i-th GPU in that order.

Sync loop order (slime ``train.py``, reference §1.2): push weights once before step 0; per rollout:
generate (+reward, filter) -> [colocated GPU: release engine memory, onload trainer] -> train ->
[colocated GPU, save due: write the trainer's state] -> [colocated GPU: offload trainer, resume engine
weights] -> push weights -> [colocated GPU: resume engine KV] -> eval? -> log line -> save?. When the
push streams from the trainer's GPU (CUDA IPC or broadcast, ``core/weight_sync.py``, chosen and
printed at start) the trainer offloads after the push instead: ... train -> [trainer frees its
cached GPU blocks, resume engine weights] -> push -> [offload trainer] -> [resume engine KV]
(``sync_steps``; the first push likewise comes before the first offload). Either way the first
rollout has the GPU to itself.
``--no-offload-train``/``--no-offload-rollout`` keep that side's memory where it is.

Per-rollout timers (driver wall seconds, in the rollout's ``metrics.jsonl`` line), which partition
``perf/step_time`` up to the loop's own bookkeeping (``benchmarks/step_breakdown.py`` reports the rest):
``perf/wait_rollout_time`` (blocked on the rollout manager: the whole generation in the sync loop; with
``--async`` taking the rollout generated ahead plus waiting for the generation running at a weight
push or eval: ``core/rollout_pipeline.py``, at most ``--max-staleness`` versions ahead),
``perf/offload_time`` (colocated GPU only: engine memory release/resume and trainer offload/onload),
``perf/train_time``, ``perf/weight_sync_time`` (the whole push, any transport), ``perf/eval_time`` (rollouts with an
eval), ``perf/save_time`` (colocated GPU, save due: the trainer's part of the checkpoint). The rollout
manager adds ``perf/rollout_time`` (its side of ``generate``) and ``perf/generate_time`` (generation +
reward), which in the sync loop sit inside ``wait_rollout`` and with ``--async`` overlap the previous
rollout's training. Checkpoint saves (the rest of them) and the log line come after
``perf/step_time``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

from .checkpoint import find_latest_checkpoint, stopped_run_hint, write_checkpoint_atomically
from .debug_modes import rollouts_only
from .flags import without_secrets
from .host_memory_monitor import HostMemoryMonitor
from .memory_plan import plan_memory
from .observers import observe
from .plugin_traits import drops_released_weights
from .precision import resolve_precision
from .rollout_pipeline import RolloutPipeline
from .train_group import RankDiedError, TrainGroup, probe_bundles, remote_actor_class
from .weight_sync import WeightSync, first_push_steps, sync_steps

logger = logging.getLogger(__name__)


@dataclass
class RunSummary:
    first_eval: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)
    rollouts: int = 0
    output_dir: str = ""


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


class ActorDiedError(RuntimeError):
    """A rollout or train actor process died (engine crash, out of memory, killed)."""


def _death_message(exc, args) -> str:
    if isinstance(exc, RankDiedError):
        which, exc = f"train worker (rank {exc.rank} of {exc.world_size})", exc.cause
    elif "RolloutManager" in str(exc):
        which = "rollout manager (it owns the rollout engine)"
    elif "TrainWorker" in str(exc):
        which = "train worker"
    else:
        which = "actor"
    text = _ANSI_ESCAPE.sub("", str(exc)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "creation task" in text and len(lines) > 1:
        # raised in the actor's __init__: Ray's first line names only the constructor; the cause (the
        # exception line) is the traceback's last line
        what, detail = "failed to start", lines[-1]
    else:
        what, detail = "process died", lines[0] if lines else type(exc).__name__
    return f"the {which} {what}: {detail.rstrip('.')}. {stopped_run_hint(args.output_dir, args.save)}"


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the actor's name in its error text


class Cluster:
    """Ray actors for one run: a rollout manager and the train group, placed by the placement plan.
    Runs on the driver."""

    def __init__(self, args, plugin_set, total_optimizer_steps: int):
        self.args = args
        self.rollout = self.train = self.placement_group = self.plan = None
        self.bundle_infos = None  # on GPU: (node IP, GPU id) of logical bundle i
        self.engine_gpu_ids = None  # on GPU, launched engines: the physical GPU ids of engine i
        self.engine_placement = None  # on GPU, in-process engines: the bundles the engine actors take
        self.weight_sync = None  # core/weight_sync.WeightSync, chosen once the actors report where they are
        from .plugin_traits import engine_pool

        # Engines that are processes of their own (SGLang servers, the router) must be stopped by the rollout
        # manager before it is killed; in-process engines die with it.
        self.launches_processes = engine_pool(args, plugin_set) == "processes"
        try:
            self._start(args, plugin_set, total_optimizer_steps)
        except BaseException:
            self.shutdown()  # run_training never sees a half-built cluster, so release it here
            raise

    def _start(self, args, plugin_set, total_optimizer_steps: int) -> None:
        import ray

        from .plugins import forwarded_env
        from .rollout_manager import RolloutManager
        from .train_worker import TrainWorker

        use_gpu = args.device in (None, "auto", "cuda") and _cuda_available()
        self.use_gpu = use_gpu
        world_size = int(args.actor_num_nodes) * int(args.actor_num_gpus_per_node)
        if not ray.is_initialized():
            # the actors' HF progress bars ("Loading weights") reach the terminal late through Ray's log
            # forwarding, among the driver's lines (even after "done in"); a user's own setting wins
            env = {**forwarded_env(), "TOKENIZERS_PARALLELISM": "false",
                   "HF_HUB_DISABLE_PROGRESS_BARS": os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "1")}
            init_kwargs = {"runtime_env": {"env_vars": env}, "include_dashboard": False, "log_to_driver": True,
                           "configure_logging": True, "logging_level": logging.WARNING}
            if args.ray_address:
                from .ray_connect import join_cluster

                join_cluster(args.ray_address, **init_kwargs)
            else:
                # One logical CPU per train rank plus the rollout manager, even on a 2-core box: the
                # ranks split the real cores between them (TrainWorker.build).
                try:
                    ray.init(num_cpus=max(2, os.cpu_count() or 2, world_size + 1), **init_kwargs)
                except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception when its node fails to start
                    from .ray_connect import ClusterConnectError

                    raise ClusterConnectError(
                        f"could not start a local Ray cluster ({type(exc).__name__}: {str(exc).strip()[:300]}); Ray "
                        "writes its logs under /tmp/ray/session_latest/logs. Check free disk space and memory there "
                        "(and file-size limits, `ulimit -f`), or join a running cluster with --ray-address") from exc
            _graceful_sigterm()
        config = vars(args)
        device = "cuda" if use_gpu else "cpu"
        if use_gpu:
            rollout_options, train_options = self._gpu_options(args, plugin_set, world_size)
        else:
            rollout_options, train_options = {"num_cpus": 1}, [{"num_cpus": 1}] * world_size
            cpus = ray.cluster_resources().get("CPU", 0)
            if cpus < world_size + 1:
                logger.warning("the Ray cluster has %g CPUs but %d CPU actors must start (%d train ranks from "
                               "--actor-num-nodes x --actor-num-gpus-per-node, one rollout manager): they "
                               "wait until enough CPUs join", cpus, world_size + 1, world_size)
        # --bf16/--fp32/auto resolved here, once, for the device the actors get (core/precision.py)
        self.precision = resolve_precision(args, device)
        print(f"plugrl train: {self.precision.describe()}", flush=True)
        worker_config = {**config, "device": device, "rollout_device": device, "engine_gpu_ids": self.engine_gpu_ids,
                         "engine_placement": self.engine_placement, "bf16": self.precision.dtype == "bf16",
                         "fp32": self.precision.dtype == "fp32"}
        self.rollout = remote_actor_class(RolloutManager).options(**rollout_options).remote(worker_config)
        if not rollouts_only(args):  # --debug-rollout-only: no train actors (their backend may not even be installed)
            self.train = TrainGroup(remote_actor_class(TrainWorker), worker_config, total_optimizer_steps,
                                    train_options)
        ray.get(self.rollout.__ray_ready__.remote())
        self.colocated_gpu = use_gpu and self.plan.colocated

    def _gpu_options(self, args, plugin_set, world_size: int) -> tuple[dict, list[dict]]:
        """One placement group for the plan; Ray options of the rollout manager and of each train rank."""
        import ray
        from .placement_layout import engine_gpu_ids, sort_bundles
        from .plugin_traits import engine_pool
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from .dry_run import placement_plan

        plan = placement_plan(args, plugin_set)
        if len(plan.actor_bundles) != world_size:
            raise ValueError(f"--placement {args.placement} gave {len(plan.actor_bundles)} train bundles for "
                             f"--actor-num-nodes x --actor-num-gpus-per-node = {world_size} train ranks")
        self.plan = plan
        self.placement_group = placement_group([{"GPU": 1, "CPU": 1}] * plan.num_bundles, strategy="PACK")
        ray.get(self.placement_group.ready())
        infos = probe_bundles(self.placement_group, plan.num_bundles)
        physical = sort_bundles(infos)  # physical[i]: the bundle playing logical bundle i
        self.bundle_infos = [infos[b] for b in physical]  # for logs and the rollout side
        for logical, bundle in enumerate(physical):
            logger.info("bundle %d: placement group bundle %d, node %s, gpu %s", logical, bundle, *infos[bundle])

        def pinned(logical_bundle):
            return PlacementGroupSchedulingStrategy(placement_group=self.placement_group,
                                                    placement_group_bundle_index=physical[logical_bundle])

        shared = set(plan.rollout_bundles)
        # A rank whose GPU the rollout side also uses takes a fraction so both fit on the bundle
        # (slime: 0.4 train, 0.2 engine); a rank alone on its bundle takes the whole GPU.
        train_options = [{"num_cpus": 0.4, "num_gpus": 0.4, "scheduling_strategy": pinned(b)} if b in shared
                         else {"num_cpus": 1, "num_gpus": 1, "scheduling_strategy": pinned(b)}
                         for b in plan.actor_bundles]
        rollout_options = {"num_cpus": 0.2, "num_gpus": 0.2, "scheduling_strategy": pinned(plan.rollout_bundles[0])}
        pool = engine_pool(args, plugin_set)
        if pool == "actors" and len(plan.engine_bundles) > 1:
            # Engines of the rollout backend itself (``from_placement``): one Ray actor per engine,
            # on the first bundle of each engine's share, next to the train rank on a shared GPU.
            self.engine_placement = {"placement_group": self.placement_group, "num_gpus": 0.2,
                                     "bundles": [physical[bundles[0]] for bundles in plan.engine_bundles]}
        elif pool == "processes":
            # Engines the rollout manager launches see their own GPUs, not the manager's one.
            self.engine_gpu_ids = engine_gpu_ids(plan.engine_bundles, physical, infos, plan.rollout_bundles[0])
        return rollout_options, train_options

    def shutdown(self, interrupted: bool = False) -> None:
        """Stop every actor. The rollout manager's ``stop`` (its engine's ``close``) runs in a concurrency group of
        its own, so it does not queue behind a running generate or eval. ``interrupted`` (Ctrl-C, SIGTERM): it is
        called only where the engine launched processes that would otherwise outlive the run (in-process engines
        die with the actor), and the wait is announced."""
        import ray

        if self.rollout is not None:
            if interrupted and self.launches_processes:
                print("plugrl train: stopping: waiting up to 60 s for the rollout manager to stop its engines",
                      flush=True)
            if not interrupted or self.launches_processes:
                try:  # let the engine stop what it launched (SGLang servers, router) before the kill; ``stop``
                    # runs in its own concurrency group, beside a generate that is still running
                    ray.get(self.rollout.stop.remote(), timeout=60)
                except Exception as exc:  # noqa: BLE001 - a dead actor has nothing left to close
                    logger.debug("rollout manager close failed: %s", exc)
            ray.kill(self.rollout)
        if self.train is not None:
            self.train.kill()
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement_group)


SIGTERM_RECEIVED: list[int] = []  # set by the handler below; ``plugrl train`` reads it to name the signal


def _graceful_sigterm() -> None:
    """After ``ray.init`` (main thread): SIGTERM stops the run the way Ctrl-C does. The handler first cancels the
    alarm that Ray's native failure-signal handler arms when it sees the signal (it aborts the process a few
    seconds later, exit -6, while the run is still stopping its actors and engines), then raises
    KeyboardInterrupt: Ray's blocking calls turn that into an interruption, where the SystemExit that Ray's own
    handler raises could end the process with exit 1 and no word."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def on_sigterm(signum, _frame):
        signal.alarm(0)
        SIGTERM_RECEIVED.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)


def _due(interval, rollout_id: int, last: bool) -> bool:
    return bool(interval) and ((rollout_id + 1) % interval == 0 or last)


def saves_after(args, rollout_id: int, last_rollout: int) -> bool:
    """A checkpoint after ``rollout_id``: every ``--save-interval`` rollouts and after the last; with
    ``--save`` and no interval, after the last only (slime saves nothing then, so a run given a place to
    save would end with nothing saved, and without a word)."""
    last = rollout_id == last_rollout
    return bool(args.save) and (_due(args.save_interval, rollout_id, last) or (not args.save_interval and last))


def run_training(args, plugin_set, *, logger_=None, on_phase=None, on_progress=None) -> RunSummary:
    """Run the whole job described by ``args`` (a validated config namespace)."""
    import ray

    from .metrics import MetricsLogger, console_line, eval_accuracies

    os.makedirs(args.output_dir, exist_ok=True)
    metrics_logger = logger_ or MetricsLogger(
        args.output_dir, use_tensorboard=bool(args.use_tensorboard), use_wandb=bool(args.use_wandb),
        wandb_project=getattr(args, "wandb_project", None), wandb_group=getattr(args, "wandb_group", None),
        wandb_mode=getattr(args, "wandb_mode", None), wandb_key=getattr(args, "wandb_key", None),
        config=without_secrets(vars(args)),
    )
    phase = on_phase or (lambda name, rollout_id: None)

    def watch(ref, actor):
        """``ray.get(ref)``, reporting the actor's progress every half second while it runs."""
        if on_progress is None:
            return ray.get(ref)
        while True:
            ready, _ = ray.wait([ref], timeout=0.5)
            if ready:  # no last progress round trip: the bars close when the rollout's line prints
                return ray.get(ref)
            on_progress(ray.get(actor.progress.remote()))
    steps_per_rollout = max(1, (args.rollout_batch_size * args.n_samples_per_prompt) // args.global_batch_size)
    cluster = None
    summary = RunSummary(output_dir=args.output_dir)
    from .configure import configure_plugins

    problems = configure_plugins(plugin_set, args)  # a no-op when the config check already ran it
    if problems:
        raise ValueError(problems[0])
    host_memory = HostMemoryMonitor()
    memory_plan = rollouts = exported = None  # exported: the rollout --save-hf last wrote
    try:
        phase("starting actors", -1)
        cluster = Cluster(args, plugin_set, total_optimizer_steps=max(1, args.num_rollout) * steps_per_rollout)
        if cluster.use_gpu:
            memory_plan = plan_memory(args, colocated=cluster.plan.colocated)
            for line in memory_plan.lines() if memory_plan else []:
                print(f"plugrl train: {line}", flush=True)
        if rollouts_only(args):
            _generate_only(cluster, args, plugin_set, metrics_logger, summary, phase, watch)
            return summary
        start_rollout = 0
        if args.load and find_latest_checkpoint(args.load):
            start_rollout = _restore(cluster, args.load) + 1
            logger.warning("resumed from %s at rollout %d", args.load, start_rollout)
        elif getattr(args, "sft_warmup_steps", 0) and args.sft_warmup_data:
            phase("format warm-up", -1)
            history = cluster.train.sft_warmup(
                args.sft_warmup_data, steps=int(args.sft_warmup_steps), batch_size=int(args.sft_warmup_batch_size),
                lr=float(args.sft_warmup_lr), prompt_loss_weight=float(args.sft_warmup_prompt_loss_weight),
                seed=int(args.seed))
            metrics_logger.log(-1, {"sft/loss_first": history[0], "sft/loss_last": history[-1]}, phase="sft")
        version = start_rollout
        phase("sync", start_rollout)
        cluster.weight_sync = _weight_sync(cluster, args)
        for step in first_push_steps(colocated=cluster.colocated_gpu, offload_train=bool(args.offload_train),
                                     streams=cluster.weight_sync.streams):
            if step == "push":
                _push_weights(cluster, args, version)
            else:  # the engines generate first (an object-store push then reads the host copy)
                cluster.train.offload()
        if args.eval_interval and start_rollout == 0 and args.eval_prompt_data:
            phase("eval", -1)
            summary.first_eval = ray.get(cluster.rollout.evaluate.remote(-1))
            observe(plugin_set.pm.hook.plugrl_on_eval_end, -1, summary.first_eval)
            metrics_logger.log(-1, summary.first_eval, phase="eval")
            accuracies = eval_accuracies(summary.first_eval)
            if accuracies:  # the baseline the rollout lines' accuracies are read against
                print(" | ".join(["before training", *accuracies]), flush=True)
        last_rollout = args.num_rollout - 1
        drop_engine_weights = drops_released_weights(args, plugin_set)
        if args.async_train:
            rollouts = _rollout_pipeline(cluster, args, start_rollout, version)
        for rollout_id in range(start_rollout, args.num_rollout):
            step_started = time.perf_counter()
            phase("generate", rollout_id)
            if rollouts is not None:  # --async: later rollouts generate while this one trains
                (data, metrics), generated_with = rollouts.take(rollout_id)
                metrics["rollout/weight_staleness"] = rollout_id - generated_with
            else:
                data, metrics = watch(cluster.rollout.generate.remote(rollout_id), cluster.rollout)
            metrics["perf/wait_rollout_time"] = time.perf_counter() - step_started
            metrics["train/tokens"] = sum(len(tokens) for tokens in data["tokens"])  # prompt + response, all ranks
            observe(plugin_set.pm.hook.plugrl_on_rollout_end, rollout_id, metrics)
            if cluster.colocated_gpu:
                with _timed(metrics, "offload"):
                    if args.offload_rollout:  # without a host copy of the weights when a full push follows
                        ray.get(cluster.rollout.release_memory.remote(keep_weights=not drop_engine_weights))
                    if args.offload_train:
                        cluster.train.onload()
            phase("train", rollout_id)
            poll = None if on_progress is None else (lambda: on_progress(cluster.train.progress()))
            with _timed(metrics, "train"):
                metrics.update(cluster.train.train(rollout_id, data, poll=poll))
            saving = saves_after(args, rollout_id, last_rollout)
            staged_train_state = None
            if saving and cluster.colocated_gpu and args.offload_train:
                # The trainer's state is written now, while it is on the GPU; the checkpoint is
                # completed (and becomes visible) after this rollout's metrics line, as below.
                with _timed(metrics, "save"):
                    staged_train_state = _stage_train_state(cluster, args, rollout_id)
            phase("sync", rollout_id)
            metrics["perf/weight_sync_time"] = 0.0  # logged every rollout, also when no push is due
            pushing = (rollout_id + 1) % max(1, int(args.update_weights_interval)) == 0
            evaluating = bool(args.eval_prompt_data) and _due(args.eval_interval, rollout_id, rollout_id == last_rollout)
            engines = contextlib.ExitStack()
            steps = sync_steps(colocated=cluster.colocated_gpu, offload_train=bool(args.offload_train),
                               offload_rollout=bool(args.offload_rollout), streams=cluster.weight_sync.streams,
                               pushing=pushing)
            if "push" not in steps and rollouts is not None and evaluating:
                with _timed(metrics, "wait_rollout"):
                    engines.enter_context(rollouts.engine())
            for step in steps:
                if step == "push":
                    if rollouts is not None:
                        # Never change weights mid-generation: wait for the generation running now (not the push)
                        with _timed(metrics, "wait_rollout"):
                            engines.enter_context(rollouts.engine())
                    with _timed(metrics, "weight_sync"):
                        _push_weights(cluster, args, rollout_id + 1)
                    if rollouts is not None:
                        rollouts.set_version(rollout_id + 1)
                    continue
                with _timed(metrics, "offload"):
                    if step == "offload_train":
                        cluster.train.offload()
                    elif step == "trim_train":
                        cluster.train.release_cached_memory()
                    elif step == "resume_weights":
                        ray.get(cluster.rollout.resume_memory.remote(["weights"]))
                    else:  # "resume_kv"
                        # slime's second resume: only what is still released. SGLang removes each tag from
                        # its offloaded set, so resuming "weights" twice (None = all tags) raises KeyError.
                        ray.get(cluster.rollout.resume_memory.remote(["kv_cache", "cuda_graph"]))
            if evaluating:
                phase("eval", rollout_id)
                with _timed(metrics, "eval"):
                    summary.last_eval = ray.get(cluster.rollout.evaluate.remote(rollout_id))
                observe(plugin_set.pm.hook.plugrl_on_eval_end, rollout_id, summary.last_eval)
                metrics.update(summary.last_eval)
            engines.close()  # the next generation may start
            metrics["perf/step_time"] = time.perf_counter() - step_started
            if host_memory.available:
                metrics["perf/host_mem_peak_gib"] = host_memory.peak_gib()  # since the run started
                if memory_plan is not None:
                    metrics["perf/host_mem_plan_gib"] = memory_plan.host_gib
            observe(plugin_set.pm.hook.plugrl_on_train_step_end, rollout_id, metrics)
            metrics_logger.log(rollout_id, metrics, phase="train")
            # Saved after its metrics line, so a kill never leaves a checkpoint whose line is missing.
            if saving:
                phase("save", rollout_id)
                _save(cluster, args, rollout_id, staged_train_state)
                if args.save_hf:  # slime exports with every checkpoint, to the pattern's {rollout_id}
                    exported = _save_hf(cluster, args, rollout_id)
            phase("log", rollout_id + 1)  # closes this rollout's progress bars before its line
            if (rollout_id + 1) % int(getattr(args, "log_interval", 1) or 1) == 0 or rollout_id == last_rollout:
                print(console_line(rollout_id, metrics), flush=True)
            summary.rollouts += 1
        if args.save_hf and exported != last_rollout:  # the final weights, unless that save just wrote them
            _save_hf(cluster, args, last_rollout)
    except (ray.exceptions.RayActorError, RankDiedError) as exc:
        raise ActorDiedError(_death_message(exc, args)) from exc
    finally:
        if rollouts is not None:
            rollouts.close()
        host_memory.close()
        if memory_plan is not None and host_memory.available:
            print(f"plugrl train: host memory peak {host_memory.peak_gib():.1f} GiB in use on this machine "
                  f"({host_memory.peak_above_baseline_gib():.1f} GiB above its use before the run); "
                  f"planned {memory_plan.host_gib:.1f} GiB", flush=True)
        try:  # a full disk fails the last flush: the actors must still be stopped
            metrics_logger.close()
        finally:
            if cluster is not None:
                cluster.shutdown(interrupted=isinstance(sys.exc_info()[1], (KeyboardInterrupt, SystemExit)))
    return summary


def _generate_only(cluster, args, plugin_set, metrics_logger, summary, phase, watch) -> None:
    """``--debug-rollout-only`` (slime's): every rollout generated, scored and logged, evals as scheduled;
    no training, weight pushes, warm-up or checkpoints (the engines keep the --hf-checkpoint weights)."""
    import ray

    from .metrics import console_line, eval_accuracies

    print("plugrl train: --debug-rollout-only: generating only (no train actors, training, weight pushes or "
          "checkpoints)", flush=True)
    last_rollout = args.num_rollout - 1
    if args.eval_interval and args.eval_prompt_data:
        phase("eval", -1)
        summary.first_eval = ray.get(cluster.rollout.evaluate.remote(-1))
        observe(plugin_set.pm.hook.plugrl_on_eval_end, -1, summary.first_eval)
        metrics_logger.log(-1, summary.first_eval, phase="eval")
        accuracies = eval_accuracies(summary.first_eval)
        if accuracies:
            print(" | ".join(["before training", *accuracies]), flush=True)
    for rollout_id in range(args.num_rollout):
        step_started = time.perf_counter()
        phase("generate", rollout_id)
        _, metrics = watch(cluster.rollout.generate.remote(rollout_id), cluster.rollout)
        metrics["perf/wait_rollout_time"] = time.perf_counter() - step_started
        observe(plugin_set.pm.hook.plugrl_on_rollout_end, rollout_id, metrics)
        if args.eval_prompt_data and _due(args.eval_interval, rollout_id, rollout_id == last_rollout):
            phase("eval", rollout_id)
            with _timed(metrics, "eval"):
                summary.last_eval = ray.get(cluster.rollout.evaluate.remote(rollout_id))
            observe(plugin_set.pm.hook.plugrl_on_eval_end, rollout_id, summary.last_eval)
            metrics.update(summary.last_eval)
        metrics["perf/step_time"] = time.perf_counter() - step_started
        metrics_logger.log(rollout_id, metrics, phase="train")  # one line per rollout, as in a training run
        phase("log", rollout_id + 1)
        if (rollout_id + 1) % int(getattr(args, "log_interval", 1) or 1) == 0 or rollout_id == last_rollout:
            print(console_line(rollout_id, metrics), flush=True)
        summary.rollouts += 1


def _rollout_pipeline(cluster, args, start_rollout: int, version: int):
    """--async: rollouts generated ahead of training, at most --max-staleness weight versions behind
    the step that trains them (``core/rollout_pipeline.py``; 1 when the flag is not given)."""
    import ray

    bound = args.max_staleness is not None
    staleness = int(args.max_staleness or 1)

    def launch(rollout_id: int, _version: int):
        # with the flag, buffered partial groups older than the bound are restarted or dropped
        return cluster.rollout.generate.remote(rollout_id, rollout_id - staleness if bound else None)

    return RolloutPipeline(launch, ray.get, start=start_rollout, num_rollout=args.num_rollout,
                           max_staleness=staleness, version=version)


@contextlib.contextmanager
def _timed(metrics: dict, name: str):
    """Add the wall seconds of the ``with`` body to ``metrics["perf/<name>_time"]`` (on the driver;
    adds, so a phase split over several blocks of one rollout is counted whole)."""
    key = f"perf/{name}_time"
    started = time.perf_counter()
    try:
        yield
    finally:
        metrics[key] = metrics.get(key, 0.0) + time.perf_counter() - started


def _forced_transport(args) -> str | None:
    """``--weight-transport`` when the user forces one; None lets ``WeightSync`` choose (auto)."""
    forced = getattr(args, "weight_transport", "auto") or "auto"
    return None if forced == "auto" else forced


def _weight_sync(cluster, args) -> WeightSync:
    """The run's weight transport, chosen from where train rank 0 and the engines are (printed)."""
    sync = WeightSync(cluster.train, cluster.rollout, use_gpu=cluster.use_gpu,
                      bucket_bytes=int(args.update_weight_buffer_size),
                      engine_by_reference=bool(cluster.engine_placement),
                      transport=_forced_transport(args))
    print(f"plugrl train: {sync.choice.describe()}", flush=True)
    return sync


def _push_weights(cluster, args, version: int) -> None:
    """Train rank 0's weights to every engine (``core/weight_sync.py``: CUDA IPC, broadcast or the
    object store, as chosen at start)."""
    cluster.weight_sync.push(version)


def _stage_train_state(cluster, args, rollout_id: int) -> str:
    """Colocated runs: the trainer's part of rollout ``rollout_id``'s checkpoint, written right
    after training (before the trainer offloads) into a hidden directory under ``--save``."""
    os.makedirs(args.save, exist_ok=True)
    staged = tempfile.mkdtemp(prefix=f".train_rollout_{rollout_id:06d}.", dir=args.save)
    try:
        cluster.train.save(staged)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged


def _save(cluster, args, rollout_id: int, staged_train_state: str | None = None) -> None:
    """Rollout ``rollout_id``'s checkpoint, complete or not at all (``write_checkpoint_atomically``);
    the trainer's files come from ``staged_train_state`` when the loop wrote them earlier."""
    import ray

    def write(tmp_dir: str) -> None:
        if staged_train_state is None:
            cluster.train.save(tmp_dir)
        else:  # same filesystem (both under --save): moving is a rename
            for name in os.listdir(staged_train_state):
                os.rename(os.path.join(staged_train_state, name), os.path.join(tmp_dir, name))
            os.rmdir(staged_train_state)
        with open(os.path.join(tmp_dir, "rollout_state.json"), "w") as f:
            json.dump(ray.get(cluster.rollout.state_dict.remote(before_rollout=rollout_id + 1)), f)
        with open(os.path.join(tmp_dir, "meta.json"), "w") as f:
            json.dump({"rollout_id": rollout_id, "config": {k: v for k, v in without_secrets(vars(args)).items()
                                                           if isinstance(v, (str, int, float, bool, list, dict, type(None)))}}, f)

    write_checkpoint_atomically(args.save, rollout_id, write)


def _save_hf(cluster, args, rollout_id: int) -> int:
    """``--save-hf``: a transformers checkpoint of the current weights at the pattern's path for
    ``rollout_id`` (driver; the train backend writes it). Returns ``rollout_id``."""
    path = args.save_hf.format(rollout_id=rollout_id)
    cluster.train.save_hf(path)
    print(f"plugrl train: --save-hf: wrote {path}", flush=True)
    return rollout_id


def _restore(cluster, load_dir: str) -> int:
    import ray

    path = find_latest_checkpoint(load_dir)
    with open(os.path.join(path, "meta.json")) as f:
        rollout_id = json.load(f)["rollout_id"]
    cluster.train.load(path)
    with open(os.path.join(path, "rollout_state.json")) as f:
        ray.get(cluster.rollout.load_state_dict.remote(json.load(f)))
    return rollout_id

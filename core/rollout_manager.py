"""``RolloutManager``: the body of the rollout Ray actor (plain Python, so tests can drive it directly).

Owns the data source, the buffer policy, the rollout engine, the reward, the dynamic-sampling filter,
reward post-processors and the estimator's reward shaping. The driver calls ``generate``, ``evaluate``,
``update_weights``, ``state_dict`` / ``load_state_dict`` on it, one call at a time.
"""

from __future__ import annotations

import functools
import logging
import statistics
import time
from types import SimpleNamespace
from typing import Any

from .plugin_call import calling
from .plugin_config import PluginConfig
from .registry import import_object
from .reward_call import rollout_reward_metrics
from .rollout import (
    EventLoopThread,
    SampleGenerator,
    generate_rollout,
    sampling_params_from_args,
    scalar_reward,
)
from .train_data import samples_to_train_data
from .types import FilterDecision, Sample, Status

logger = logging.getLogger(__name__)


def _build_filter(args, plugin_set):
    if getattr(args, "dynamic_sampling_filter_path", None):
        from .slime_compat import slime_dynamic_sampling_filter

        return slime_dynamic_sampling_filter(args.dynamic_sampling_filter_path, args), "dynamic_filter"
    name = getattr(args, "dynamic_sampling_filter", None)
    if not name:
        return None, "dynamic_filter"
    fn = plugin_set.get("filter", name)
    from .plugin_options import as_kwargs, build_options

    options = as_kwargs(build_options(plugin_set.entry("filter", name), args))  # the filter's declared options
    if getattr(args, "reward_key", None) and "reward_key" not in options:
        options["reward_key"] = args.reward_key

    def sample_filter(group):
        with calling(f"--dynamic-sampling-filter {name} (on a group of {len(group)} samples)"):
            return FilterDecision.coerce(fn(group, **options))

    return sample_filter, "dynamic_filter"


def _named_call(what: str, fn):
    """``fn``, whose exceptions name ``what`` (``core/plugin_call.py``)."""
    def call(*args, **kwargs):
        with calling(what):
            return fn(*args, **kwargs)

    return call


def _build_buffer(args, plugin_set):
    n = int(args.n_samples_per_prompt)
    if getattr(args, "buffer_filter_path", None):
        return _slime_buffer_adapter(args, plugin_set)(args.buffer_filter_path, args, n)
    from .plugin_options import as_kwargs, build_options

    name = getattr(args, "buffer_filter", None) or "fifo"
    options = as_kwargs(build_options(plugin_set.entry("buffer_policy", name), args, check=False))
    return plugin_set.get("buffer_policy", name)(n, **options)  # its declared options (--buffer-opt)


def _slime_buffer_adapter(args, plugin_set):
    """The ``slime_adapter`` a buffer policy declared (the selected one first) for ``--buffer-filter-path``."""
    from .plugin_traits import trait

    registry = plugin_set.registries["buffer_policy"]
    selected = getattr(args, "buffer_filter", None)
    for name in [selected] * (selected in registry) + registry.names():
        adapter = trait("buffer_policy", name, "slime_adapter", None, plugin_set)
        if adapter is not None:
            return adapter
    raise ValueError(f"--buffer-filter-path {args.buffer_filter_path}: no loaded buffer policy declares a "
                     "slime_adapter to run it on (the bundled 'fifo' does; is it blocked?)")


def _engine_counters(engine) -> dict | None:
    """The engine's own counters (the embedded ``hf`` engine's ``stats()``), or None for engines
    without them (SGLang, pools of actors)."""
    stats = getattr(engine, "stats", None)
    return stats() if callable(stats) else None


def engine_count(args, plugin_set=None) -> int:
    """Engines serving the rollouts: the running ones a backend was given (``external_engines`` trait),
    else ``--rollout-num-gpus`` / ``--rollout-num-gpus-per-engine`` (1 without GPUs). ``--rollout-concurrency``
    (slime's ``--sglang-server-concurrency``) is per engine, so the in-flight limit is it times this."""
    from .plugin_traits import external_engines

    external = external_engines(args, plugin_set)
    if external:
        return len(external)
    total, per_engine = getattr(args, "rollout_num_gpus", None), getattr(args, "rollout_num_gpus_per_engine", None)
    return max(1, int(total or 0) // max(1, int(per_engine or 1)))


def engine_counter_metrics(before: dict | None, after: dict | None) -> dict:
    """``perf/engine_*`` for one rollout from the engine's counters before and after it: decode
    steps and generated tokens, and where the decode thread's seconds went (prefill, launching decode
    forwards, waiting for the GPU, per-row host work). Tells a slow rollout's engine time from time
    spent elsewhere (rewards, the driver, dynamic sampling)."""
    if not before or not after:
        return {}
    out = {}
    for key in ("decode_steps", "prefill_forwards", "generated_tokens", "prefill_s", "decode_launch_s",
                "decode_wait_s", "decode_host_s"):
        if key in before and key in after:
            out[f"perf/engine_{key}"] = after[key] - before[key]
    return out


class RolloutManager:
    def __init__(self, config: dict):
        from transformers import AutoTokenizer

        from .data import PromptDataSource, load_eval_datasets, load_prompt_dataset
        from .plugins import load_plugins
        from .reward_call import needs_reward, no_reward, resolve_reward

        self.args = args = SimpleNamespace(**config)
        plugin_set = load_plugins()
        self.tokenizer = AutoTokenizer.from_pretrained(args.hf_checkpoint)
        data_kwargs = {
            "apply_chat_template": bool(args.apply_chat_template), "tokenizer": self.tokenizer,
            "apply_chat_template_kwargs": getattr(args, "apply_chat_template_kwargs", None) or None,
            "metadata_key": args.metadata_key, "tool_key": getattr(args, "tool_key", "tools"),
            "skip_bad_rows": bool(getattr(args, "skip_bad_rows", False)),
        }
        dataset = None
        if args.prompt_data:
            dataset = load_prompt_dataset(args.prompt_data, input_key=args.input_key, label_key=args.label_key,
                                          max_prompt_len=getattr(args, "rollout_max_prompt_len", None), **data_kwargs)
        self.data_source = PromptDataSource(dataset, int(args.n_samples_per_prompt),
                                            shuffle=bool(args.rollout_shuffle), seed=int(args.rollout_seed))
        self.num_prompts = len(dataset) if dataset is not None else 0
        self.eval_datasets = load_eval_datasets(
            getattr(args, "eval_prompt_data", None),
            input_key=getattr(args, "eval_input_key", None) or args.input_key,
            label_key=getattr(args, "eval_label_key", None) or args.label_key, **data_kwargs,
        )
        self.buffer = _build_buffer(args, plugin_set)
        self.sample_filter, self.filter_name = _build_filter(args, plugin_set)
        from .plugin_options import build_estimator, build_plugin_input

        self.estimator = build_estimator(plugin_set.entry("advantage_estimator", args.advantage_estimator), args)
        # (function, what it is called with): its declared options object, else the run config
        self.post_processors = [
            (_named_call(f"--reward-post-process {entry.name}", entry.load()), build_plugin_input(entry, args))
            for entry in (plugin_set.entry("reward_post_processor", name)
                          for name in (getattr(args, "reward_post_process", None) or []))
        ]
        custom = getattr(args, "custom_reward_post_process_path", None)
        self.custom_reward_post_process = import_object(custom) if custom else None
        engine_cls = plugin_set.get("rollout_backend", args.rollout_backend)
        extra = {}
        if getattr(engine_cls, "accepts_run_config", False):  # core's settings and its own flags only
            extra["args"] = PluginConfig.for_plugin(args, "rollout_backend", args.rollout_backend)
        placement = config.get("engine_placement")
        if placement and hasattr(engine_cls, "from_placement"):  # one engine per engine bundle (hf on GPUs)
            engine_cls = functools.partial(engine_cls.from_placement, placement=placement)
        self.engine = engine_cls(args.hf_checkpoint, device=getattr(args, "rollout_device", None),
                                 seed=int(args.rollout_seed),
                                 max_batch_size=int(getattr(args, "rollout_max_batch_size", 256) or 256), **extra)
        reward = (resolve_reward(SimpleNamespace(**{**config, "rm_type": args.rm_type}), dict(args.rm_opt or {}))
                  if needs_reward(args) else no_reward(args))
        self.loop = EventLoopThread()
        concurrency = int(getattr(args, "rollout_concurrency", None) or 512) * engine_count(args, plugin_set)
        self.generator = self.loop.run(self._make_generator(reward, concurrency))

    async def _make_generator(self, reward, concurrency):
        # The semaphore must be created on the loop that uses it.
        return SampleGenerator(self.args, self.engine, self.tokenizer, reward, concurrency=concurrency)

    # ---- training rollouts ------------------------------------------------------------------------
    def generate(self, rollout_id: int, min_weight_version: int | None = None) -> tuple[dict, dict]:
        """One rollout: ``(train_data, metrics)``; runs dynamic sampling and partial rollout.
        ``min_weight_version``: the async loop's staleness bound for buffered partial groups."""
        args = self.args
        started = time.perf_counter()
        self.generator.reward.new_window()  # this rollout's reward failures, for its metrics and threshold
        # The async loop saves a checkpoint while later rollouts generate (up to --max-staleness of
        # them): it needs the cursor and buffer as they were before the next one started. A run that
        # saves nothing needs no snapshot (the buffer policy's state_dict is then never called).
        if getattr(args, "save", None):
            window = 2 + int(getattr(args, "max_staleness", None) or 1)
            saved = {k: v for k, v in getattr(self, "_state_before", {}).items() if k > rollout_id - window}
            self._state_before = {**saved, rollout_id: self.state_dict()}
        self.generator.generated = self.generator.rewarded = 0
        engine_before = _engine_counters(self.engine)
        self._progress_total = int(args.rollout_batch_size) * int(args.n_samples_per_prompt)
        result = self.loop.run(generate_rollout(
            self.generator, self.data_source, self.buffer, rollout_id=rollout_id,
            rollout_batch_size=int(args.rollout_batch_size),
            over_sampling_batch_size=int(getattr(args, "over_sampling_batch_size", None) or args.rollout_batch_size),
            sampling_params=sampling_params_from_args(args), sample_filter=self.sample_filter,
            filter_name=self.filter_name, partial_rollout=bool(getattr(args, "partial_rollout", False)),
            min_weight_version=min_weight_version,
            stale_policy=getattr(args, "stale_partial_rollout", None) or "regenerate",
        ))
        for group in result.groups:
            for sample in group:
                sample.rollout_id = None  # every sample is its own rollout (slime's default)
        with calling(f"the rollout's rewards and advantages (--advantage-estimator {args.advantage_estimator})"):
            data = samples_to_train_data(result.groups, self.estimator, reward_key=getattr(args, "reward_key", None),
                                         post_processors=self.post_processors, args=args,
                                         reward_post_process=self.custom_reward_post_process)
        metrics = dict(result.metrics)
        metrics.update(self._sample_metrics([s for g in result.groups for s in g], getattr(args, "reward_key", None)))
        metrics.update(rollout_reward_metrics(self.generator.reward, rollout_id,
                                              getattr(args, "reward_error_threshold", None)))
        metrics["perf/rollout_time"] = time.perf_counter() - started
        metrics.update(engine_counter_metrics(engine_before, _engine_counters(self.engine)))
        if getattr(self, "_engine_left_gib", None) is not None:
            metrics["perf/engine_released_left_gib"] = self._engine_left_gib
        return data, metrics

    @staticmethod
    def _sample_metrics(samples: list[Sample], reward_key) -> dict:
        rewards = [scalar_reward(s, reward_key) for s in samples]
        lengths = [s.response_length for s in samples]
        n = max(1, len(samples))
        versions = [int(v) for s in samples for v in s.weight_versions if str(v).lstrip("-").isdigit()]
        return {
            "rollout/weight_version_min": min(versions) if versions else -1,
            "rollout/weight_version_max": max(versions) if versions else -1,
            "rollout/raw_reward": statistics.fmean(rewards) if rewards else 0.0,
            "rollout/response_len": statistics.fmean(lengths) if lengths else 0.0,
            "rollout/truncated_ratio": sum(s.status == Status.TRUNCATED for s in samples) / n,
            "rollout/num_samples": len(samples),
        }

    def progress(self) -> dict:
        """Samples generated and rewarded so far in the running rollout (polled by the driver)."""
        total = getattr(self, "_progress_total", 0)
        return {"generate": (self.generator.generated, total), "reward": (self.generator.rewarded, total)}

    # ---- eval -------------------------------------------------------------------------------------
    def evaluate(self, rollout_id: int) -> dict:
        """Every ``--eval-prompt-data`` set with ``--n-samples-per-eval-prompt`` samples per prompt."""
        return self.loop.run(self._evaluate(rollout_id))

    async def _evaluate(self, rollout_id: int) -> dict:
        import asyncio
        import copy

        from .eval_metrics import eval_metrics

        args = self.args
        n = int(getattr(args, "n_samples_per_eval_prompt", 1) or 1)
        params = sampling_params_from_args(args, evaluation=True)
        metrics: dict[str, float] = {}
        reward_key = getattr(args, "eval_reward_key", None) or getattr(args, "reward_key", None)
        for name, dataset in self.eval_datasets.items():
            groups = [[copy.deepcopy(s) for _ in range(n)] for s in dataset.samples]
            index = 0
            for group in groups:
                for sample in group:
                    sample.index = index
                    index += 1
            started = time.perf_counter()
            await asyncio.gather(*(self.generator.generate_group(g, params, evaluation=True, rollout_id=rollout_id)
                                   for g in groups))
            rewards = [[scalar_reward(s, reward_key) for s in g] for g in groups]
            truncated = [[s.status == Status.TRUNCATED for s in g] for g in groups]
            lengths = [[s.response_length for s in g] for g in groups]
            metrics.update(eval_metrics(name, rewards, truncated, lengths))
            metrics[f"eval/{name}/time"] = time.perf_counter() - started
        return metrics

    # ---- weights, memory, state ---------------------------------------------------------------------
    def update_weights(self, buckets: list | None, version: int, *, by_reference: list | None = None) -> None:
        """Push ``buckets`` to the engine. The driver passes ``by_reference=[ObjectRef]`` instead (in a
        list, so Ray hands over the reference unresolved): an engine pool lets each engine actor read
        the trainer's export from the object store, with no copy through this process. ``buckets``
        may also be a weight stream (``core/weight_stream.py``): an iterable of buckets that pulls
        its bytes by CUDA IPC or broadcast in whichever engine process iterates it."""
        if by_reference is not None:
            (ref,) = by_reference
            push = getattr(self.engine, "update_weights_from_ref", None)
            if push is not None:
                push(ref, version)
                return
            import ray

            buckets = ray.get(ref)
        self.engine.update_weights(buckets, version)

    def weight_receivers(self) -> list[dict] | None:
        """Where the engines' weights live, for the driver's choice of weight transport
        (``core/weight_sync.py``): one ``{"uuid", "node", "where"}`` per engine process, or None when
        the engines are not ours to stream into (launched servers: their own push path). An engine
        pool answers itself; an engine core builds in this process (engine_pool "actors") is on this
        process's device."""
        receivers = getattr(self.engine, "weight_receivers", None)
        if callable(receivers):
            return receivers()
        from .plugin_traits import engine_pool

        if engine_pool(self.args) != "actors":
            return None
        import ray

        from .weight_handles import device_uuid

        device = str(getattr(self.engine, "device", "cpu"))
        return [{"uuid": device_uuid() if device.startswith("cuda") else None,
                 "node": ray.util.get_node_ip_address(), "where": "rollout manager (in-process engine)"}]

    def join_weight_group(self, name: str, address: str, port: int, first_rank: int, world_size: int,
                          backend: str) -> None:
        """Join the weight broadcast group (``core/weight_broadcast.py``) as ranks ``first_rank``...:
        the engine pool's actors each, or this process for an in-process engine."""
        joiner = getattr(self.engine, "join_weight_group", None)
        if callable(joiner):
            joiner(name, address, port, first_rank, world_size, backend)
            return
        from .weight_broadcast import join

        join(name, address, port, first_rank, world_size, backend=backend)

    def release_memory(self, keep_weights: bool = True) -> None:
        """Colocated GPU runs, before training. Engines that can tell (the embedded one) report what
        they still hold on the GPU, logged with the next rollout as ``perf/engine_released_left_gib``.
        ``keep_weights=False`` (the loop, for a backend with the ``drops_released_weights`` trait, when
        a full push follows the resume): the engine keeps no host copy of its weights."""
        if keep_weights:
            self.engine.release_memory()
        else:
            self.engine.release_memory(keep_weights=False)
        report = getattr(self.engine, "gpu_memory_gib", None)
        self._engine_left_gib = report() if report else None

    def resume_memory(self, tags=None) -> None:
        self.engine.resume_memory(tags)

    def num_rollout_per_epoch(self) -> int:
        return self.data_source.num_rollout_per_epoch(int(self.args.rollout_batch_size))

    def state_dict(self, before_rollout: int | None = None) -> dict:
        """Data cursor and buffer; with ``before_rollout``, as they were before that rollout began
        (if it has begun), so a checkpoint taken mid-generation resumes without skipping prompts."""
        saved = getattr(self, "_state_before", {})
        if before_rollout is not None and before_rollout in saved:
            return saved[before_rollout]
        state = {"data_source": self.data_source.state_dict(), "buffer": self.buffer.state_dict()}
        if callable(getattr(self.engine, "state_dict", None)):
            state["engine"] = self.engine.state_dict()  # its sampling RNG: resumed generation == uninterrupted
        return state

    def load_state_dict(self, state: dict) -> None:
        self.data_source.load_state_dict(state["data_source"])
        self.buffer.load_state_dict(state["buffer"])
        if "engine" in state and callable(getattr(self.engine, "load_state_dict", None)):
            self.engine.load_state_dict(state["engine"])

    def close(self) -> None:
        """Stop the engine (and any processes it launched); called by the driver at shutdown."""
        closer = getattr(self.engine, "close", None)
        if closer is not None:
            closer()

    def engine_log_probs(self, sequences, response_lengths, temperature: float = 1.0) -> Any:
        """Teacher-forced log-probs from the engine's current weights (weight-push checks)."""
        return self.engine.log_probs_of(sequences, response_lengths, temperature)

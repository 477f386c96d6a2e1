"""The ``megatron`` train backend: megatron-core GPTModel (local layer spec + packed PyTorch attention).

One instance per train actor (one GPU, or one CPU process in tests); the train group starts
``--actor-num-nodes x --actor-num-gpus-per-node`` of them in one torch.distributed world (env vars
``MASTER_ADDR MASTER_PORT RANK WORLD_SIZE LOCAL_RANK``) and calls every method on every rank with
the same arguments; rank 0's return value is used. Ranks are split TP-major as Megatron does
(``--tensor-model-parallel-size``; PP = CP = EP = 1).

Per rollout, as the torch backend: old log-probs (or the one-step on-policy shortcut), reference
log-probs when a KL needs them, advantages from the estimator over the whole batch, then
``--num-steps-per-rollout`` optimizer steps. A DP rank trains on its share of each step's samples
(``core.packing.plan_micro_batches``); a micro-batch is one THD pack (cu_seqlens, no attention
across samples); log-probs and entropy come from the vocab-parallel logits in fp32. The per-sample
(or per-token) mean objective of a step does not depend on the packing, DP or TP.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from plugrl.core import losses
from plugrl.core.gpu_offload import StorageOffload
from plugrl.core.host_to_device import to_device
from plugrl.core.packing import plan_micro_batches, split_into_steps
from plugrl.core.types import option as _opt
from plugrl.core.weight_buckets import WeightBuckets
from plugrl.core.precision import resolve_precision
from plugrl.plugins.backends.trainer_common import (
    lr_lambda_factory,
    offload_report,
    resolve_device,
    response_log_probs,
    response_index,
    synced_clock,
)

from .parallel import dp_group, init_parallel, tp_group

logger = logging.getLogger(__name__)

def check_megatron_args(args) -> None:
    """In the train actor (the driver runs the same checks in ``validate_config``)."""
    from plugrl.plugins.backends.megatron.options import backend_problems

    problems = backend_problems(args)
    if problems:
        raise ValueError("; ".join(problems))


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    params: Any  # megatron PackedSeqParams (thd)


def pack_thd(token_lists: list[list[int]], device, pad_multiple: int = 1) -> PackedBatch:
    """Concatenate sequences into one THD row; pad the total to ``pad_multiple`` (TP with sequence
    parallelism splits the row over TP ranks) with one extra padding segment. Positions restart per
    segment (they select the per-token RoPE tables, ``rotary.PerTokenRotary.tables``)."""
    from .rotary import SegmentedPackParams

    lengths = [len(t) for t in token_lists]
    total = sum(lengths)
    pad = (-total) % pad_multiple
    flat = [tok for t in token_lists for tok in t] + [0] * pad
    seg_lengths = lengths + ([pad] if pad else [])
    cu = torch.zeros(len(seg_lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(seg_lengths, dtype=torch.int32), 0)
    positions = torch.cat([torch.arange(n) for n in seg_lengths])
    cu = to_device(cu, device)  # host_to_device.py: no host sync per micro-batch
    max_len = max(seg_lengths)
    params = SegmentedPackParams(qkv_format="thd", max_seqlen_q=max_len, max_seqlen_kv=max_len, segments=cu,
                                 max_segment=max_len)
    return PackedBatch(to_device(flat, device, torch.long)[None], to_device(positions, device)[None], params)


class MegatronTrainBackend:
    """megatron-core GPTModel + megatron's DDP and optimizer; ``train(rollout_id, data)`` runs all
    optimizer steps of one rollout."""

    def __init__(self, args: Any, *, estimator=None, total_optimizer_steps: int | None = None):
        from transformers import AutoConfig

        from .attention import choose_implementation

        check_megatron_args(args)
        self.args = args
        self.estimator = estimator
        self.device = resolve_device(getattr(args, "device", None))
        self.seed = int(_opt(args, "seed", 1234))
        self.tp_size = int(_opt(args, "tensor_model_parallel_size", 1))
        self.layout = init_parallel(self.tp_size, self.device, self.seed, getattr(args, "distributed_backend", None))
        from .custom_hooks import load_hook

        self.hooks = {name: load_hook(args, f"custom_megatron_{name}_path")
                      for name in ("init", "before_log_prob_hook", "before_train_step_hook")}
        self.hooks["model_provider"] = load_hook(args, "custom_model_provider_path")
        if self.hooks["init"]:
            self.hooks["init"](args)
        self.tp_group, self.dp_group = tp_group(), dp_group()
        self.hf_config = AutoConfig.from_pretrained(args.hf_checkpoint)
        self.bridge = _model_bridge(self.hf_config)
        self.cfg = self.bridge.model_config(args)
        # bf16 params with fp32 main params on GPUs (slime's guide passes --bf16; megatron-core's
        # optimizer is built for it); fp32 on CPU, where the backend runs for debugging and tests.
        # (core/precision.py resolves the same on the driver, which refuses --fp32 here on GPUs)
        self.dtype = torch.bfloat16 if resolve_precision(args, self.device.type).dtype == "bf16" else torch.float32
        self.sequence_parallel = bool(getattr(args, "sequence_parallel", False)) and self.tp_size > 1
        # packs are padded to a multiple of TP (sequence parallelism splits them) x --data-pad-size-multiplier
        self.pad_multiple = ((self.tp_size if self.sequence_parallel else 1)
                             * int(getattr(args, "data_pad_size_multiplier", None) or 1))
        self.attention = choose_implementation(getattr(args, "attention_backend", None), self.device.type,
                                               self.dtype)
        self.fusions = self._choose_fusions()
        self.wgrad_accumulation_fusion = self._choose_wgrad_accumulation_fusion()
        self.model = self._build_model(trainable=True)
        start = self._initial_weights()
        self._load_initial_weights(self.model, start)
        self.ddp_model = self._wrap_ddp(self.model)
        self.ref_model = None
        if self._needs_ref():
            self.ref_model = self._build_model(trainable=False)
            # the reference policy is --ref-load (slime), else the starting weights
            self._load_initial_weights(self.ref_model, getattr(args, "ref_load", None) or start)
        from .optimizers import build_optimizer

        self.base_lr = float(args.lr)
        self.optimizer = build_optimizer(self.ddp_model, args, device=self.device, lr=self.base_lr,
                                         tp_group=self.tp_group)
        self.lr_multiplier = lr_lambda_factory(args, total_optimizer_steps or 1)
        self.optimizer_steps = 0
        self.progress = (0, 0)
        self._offloaded = _OffloadedStorages(self)

    # ---- model construction ----------------------------------------------------------------------
    def _choose_fusions(self) -> dict[str, bool]:
        """Which elementwise parts run compiled (``fused_ops``; megatron-core's SwiGLU and
        bias-dropout-add): on CUDA, unless switched off by ``--no-<name>-fusion`` or torch.compile
        cannot build a kernel on this machine (then all are off, with one warning)."""
        from .fused_ops import check_compiler, round_like_eager

        names = ("rmsnorm", "rope", "bias_swiglu", "bias_dropout")
        if self.device.type != "cuda":
            return dict.fromkeys(names, False)
        problem = check_compiler(self.device)
        if problem:
            logger.warning("torch.compile cannot build a CUDA kernel here (%s): the megatron backend runs its "
                           "RMSNorm, RoPE, SwiGLU, residual adds and log-probs unfused (correct, slower; a working "
                           "Triton needs a C compiler on PATH)", problem)
            return dict.fromkeys(names, False)
        round_like_eager()
        return {name: not getattr(self.args, f"no_{name}_fusion", False) for name in names}

    def _choose_wgrad_accumulation_fusion(self) -> bool:
        """Weight-gradient GEMMs that add into megatron's gradient buffer (as slime's Megatron does
        with apex): on CUDA unless ``--no-gradient-accumulation-fusion``; megatron-core's
        ``gradient_accumulation_fusion`` then calls ``wgrad_accumulation``'s kernels."""
        if self.device.type != "cuda" or getattr(self.args, "no_gradient_accumulation_fusion", False):
            return False
        from .wgrad_accumulation import install

        if install():
            return True
        logger.warning("this torch has no mixed-precision addmm (out_dtype): weight gradients are added to the "
                       "gradient buffer by a separate kernel per weight and micro-batch")
        return False

    def _transformer_overrides(self, trainable: bool) -> dict:
        args = self.args
        overrides = {
            "params_dtype": self.dtype, "pipeline_dtype": self.dtype, "bf16": self.dtype == torch.bfloat16,
            "sequence_parallel": self.sequence_parallel,
            # slime's guide runs RL with both dropouts at 0; Megatron's own default would be 0.1.
            "attention_dropout": float(_opt(args, "attention_dropout", 0.0)),
            "hidden_dropout": float(_opt(args, "hidden_dropout", 0.0)),
            "use_cpu_initialization": self.device.type != "cuda",
            # Weights are loaded from the checkpoint right after, but megatron-core only marks
            # TP-sharded params (``tensor_model_parallel``, which grad-norm and clipping read) while
            # initialising them: skipping the init would count shards as replicas.
            "perform_initialization": True,
            # megatron-core's own SwiGLU and bias-dropout-add fusions are torch.compile'd PyTorch (no
            # TE / apex needed): on CUDA unless Megatron's --no-bias-swiglu-fusion / --no-bias-dropout-fusion.
            "bias_activation_fusion": self.fusions["bias_swiglu"],
            "bias_dropout_fusion": self.fusions["bias_dropout"],
            # RoPE is plugrl's (rotary.py, fused_ops.py); megatron's rope fusion and softmax fusion need TE / apex
            "masked_softmax_fusion": False, "apply_rope_fusion": False,
            # weight gradients accumulated into the gradient buffer by the GEMM (wgrad_accumulation.py)
            "gradient_accumulation_fusion": self.wgrad_accumulation_fusion,
        }
        from plugrl.plugins.backends.megatron.options import passthrough_overrides

        overrides.update(passthrough_overrides(args))  # --megatron-<field> flags win
        granularity = getattr(args, "recompute_granularity", None)
        if granularity and self.device.type != "cuda":
            # megatron-core's activation checkpointing saves and restores CUDA RNG states; recompute
            # only trades memory for time (the GPU tests check it leaves the step unchanged).
            logger.warning("--recompute-granularity %s is ignored on CPU (megatron-core's recompute needs CUDA)",
                           granularity)
            granularity = None
        if trainable and granularity:
            overrides["recompute_granularity"] = granularity
            if granularity == "full":
                overrides["recompute_method"] = _opt(args, "recompute_method", "uniform")
                overrides["recompute_num_layers"] = int(_opt(args, "recompute_num_layers", 1))
        return overrides

    def _build_model(self, *, trainable: bool):
        from .attention import local_spec_with_packed_attention
        from .config_bridge import build_gpt_model

        spec = local_spec_with_packed_attention(
            self.cfg.qk_layernorm, self.cfg.normalization, self.attention, self.cfg.num_layers,
            fuse_rope=self.fusions["rope"], fuse_rmsnorm=self.fusions["rmsnorm"])
        overrides = self._transformer_overrides(trainable)
        if self.hooks["model_provider"]:
            model = self._provided_model(spec, overrides)
        else:
            model = build_gpt_model(self.cfg, layer_spec=spec, **overrides)
        model.to(self.device)
        from .rotary import install

        install(model)
        if not trainable:
            model.eval().requires_grad_(False)
        return model

    def _provided_model(self, spec, overrides: dict):
        """``--custom-model-provider-path``'s model (``custom_hooks``), checked for what the backend
        needs: plugrl's packed core attention (its weights are checked when they are loaded)."""
        from .attention import PackedCoreAttention
        from .config_bridge import transformer_config
        from .custom_hooks import call_model_provider

        model = call_model_provider(self.hooks["model_provider"], config=transformer_config(self.cfg, **overrides),
                                    layer_spec=spec)
        if not any(isinstance(m, PackedCoreAttention) for m in model.modules()):
            raise ValueError(f"--custom-model-provider-path {self.args.custom_model_provider_path}: the model has no "
                             "plugrl packed core attention; build its layers from the layer_spec argument "
                             "(attention.local_spec_with_packed_attention), which packs samples without "
                             "cross-sample attention")
        return model

    def _wrap_ddp(self, model):
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
        )

        use_distributed = getattr(self.args, "use_distributed_optimizer", None)
        # Megatron's --accumulate-allreduce-grads-in-fp32 (off by default): fp32 main_grad buffers.
        # On CPU the params are fp32, so the grads are too.
        fp32_grads = bool(getattr(self.args, "accumulate_allreduce_grads_in_fp32", False)) or self.dtype == torch.float32
        # --overlap-grad-reduce: each bucket is reduced as the last micro-batch's backward fills it (train()
        # runs the step's other micro-batches under no_sync); with one DP rank there is nothing to overlap
        overlap = bool(getattr(self.args, "overlap_grad_reduce", False)) and self.layout.dp_size > 1
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=fp32_grads, overlap_grad_reduce=overlap, check_for_nan_in_grad=False,
            use_distributed_optimizer=self.device.type == "cuda" and use_distributed is not False,
        )
        return DistributedDataParallel(model.config, ddp_config, model)

    def _initial_weights(self) -> str:
        """Where the first weights come from, as slime picks them: ``--load`` when it holds model
        weights rather than a plugrl checkpoint (an HF or torch_dist directory), else ``--ref-load``,
        else ``--hf-checkpoint``. A plugrl checkpoint under ``--load`` is restored later by the loop."""
        from plugrl.core.checkpoint import find_latest_checkpoint

        load = getattr(self.args, "load", None)
        if load and os.path.isdir(load) and not find_latest_checkpoint(load) and _holds_weights(load):
            return load
        return getattr(self.args, "ref_load", None) or self.args.hf_checkpoint

    def _load_initial_weights(self, model, path: str) -> None:
        """An HF safetensors directory, or a megatron torch_dist checkpoint (``plugrl convert
        hf-to-megatron``, slime's converter); collective over all ranks for torch_dist."""
        from .dist_ckpt import is_torch_dist, load_torch_dist

        if is_torch_dist(path):
            load_torch_dist(model, path)
            return
        if not os.path.isdir(path) or not any(name.endswith(".safetensors") for name in os.listdir(path)):
            raise ValueError(f"{path}: neither an HF checkpoint (*.safetensors) nor a megatron torch_dist checkpoint "
                             "(metadata.json); convert one with `plugrl convert hf-to-megatron`")
        from .convert import load_hf_state

        shard = self.bridge.hf_to_megatron(load_hf_state(path), self.cfg, tp_size=self.tp_size,
                                           tp_rank=self.layout.tp_rank)
        self._load_shard(model, shard, path)

    @staticmethod
    def _load_shard(model, shard: dict, path: str) -> None:
        missing, unexpected = model.load_state_dict(shard, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not fit the model built from its config "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")

    def _needs_ref(self) -> bool:
        if getattr(self.args, "use_kl_loss", False):
            return True
        return bool(getattr(self.estimator, "needs_ref_log_probs", False)) or float(_opt(self.args, "kl_coef", 0.0)) != 0.0

    # ---- forward -----------------------------------------------------------------------------------
    @staticmethod
    def logits(model, batch: PackedBatch) -> torch.Tensor:
        """``[T, local vocab]`` logits of one pack (this TP rank's vocabulary slice)."""
        inner = _unwrap(model)
        params = dataclasses.replace(batch.params, rope=inner.rotary_pos_emb.tables(batch.position_ids[0],
                                                                                     inner.config.params_dtype))
        return model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=None,
                     packed_seq_params=params)[0]

    def _forward_response(self, model, token_lists, response_lengths, *, with_entropy: bool):
        """Response-token log-probs (and entropy) of each sequence, from one packed forward pass."""
        from .vocab_parallel import vocab_parallel_log_probs

        batch = pack_thd(token_lists, self.device, self.pad_multiple)
        logits = self.logits(model, batch)
        index = response_index(token_lists, response_lengths, self.device)
        targets = batch.input_ids[0][index + 1]
        local_vocab = logits.shape[-1]
        return vocab_parallel_log_probs(
            logits, index, targets, temperature=float(_opt(self.args, "rollout_temperature", 1.0)),
            vocab_start=self.layout.tp_rank * local_vocab, vocab_size=self.cfg.vocab_size, group=self.tp_group,
            with_entropy=with_entropy)

    def _plan(self, lengths: list[int], positions: list[int], dp_size: int | None = None) -> list[list[int]]:
        """This DP rank's micro-batches (positions into the rollout) of one step's samples; with
        ``dp_size=1``, micro-batches of ``positions`` already chosen for this rank."""
        args = self.args
        dp_size = self.layout.dp_size if dp_size is None else dp_size
        plan = plan_micro_batches(
            [lengths[p] for p in positions], micro_batch_size=int(_opt(args, "micro_batch_size", 1)),
            use_dynamic_batch_size=bool(getattr(args, "use_dynamic_batch_size", False)),
            max_tokens_per_gpu=getattr(args, "max_tokens_per_gpu", None), dp_size=dp_size,
            balance_data=bool(getattr(args, "balance_data", False)),
        )
        return [[positions[i] for i in mb] for mb in plan[self.layout.dp_rank if dp_size > 1 else 0]]

    @torch.no_grad()
    def _log_probs_all(self, model, tokens, response_lengths, micro_batches) -> dict[int, torch.Tensor]:
        """Response log-probs of the samples in ``micro_batches`` (no grad), by position."""
        model.eval()
        out: dict[int, torch.Tensor] = {}
        for mb in micro_batches:
            lp, _ = self._forward_response(model, [tokens[i] for i in mb], [response_lengths[i] for i in mb],
                                           with_entropy=False)
            for i, chunk in zip(mb, lp.split([response_lengths[i] for i in mb])):
                out[i] = chunk.float()
        return out

    def _gather_over_dp(self, local: dict[int, torch.Tensor], n: int) -> list[torch.Tensor]:
        """Per-sample tensors computed by their DP ranks, as one full list on every rank."""
        merged = dict(local)
        if self.layout.dp_size > 1:
            parts: list = [None] * self.layout.dp_size
            dist.all_gather_object(parts, {i: t.detach().cpu() for i, t in local.items()}, group=self.dp_group)
            for part in parts:
                merged.update(part)
        return [merged[i].to(self.device) for i in range(n)]

    # ---- training ----------------------------------------------------------------------------------
    def train(self, rollout_id: int, data: dict) -> dict:
        from plugrl.core.rl_step import prepare_rollout, run_rl_steps

        args = self.args
        tokens, response_lengths = data["tokens"], data["response_lengths"]
        lengths = [len(t) for t in tokens]
        steps = split_into_steps(data["rollout_ids"], int(_opt(args, "global_batch_size", len(tokens))))
        step_positions = steps.steps
        planned = [self._plan(lengths, list(positions)) for positions in step_positions]
        # This DP rank's samples: its share of every step, and of the samples of rollouts that fill no
        # step (not trained on, but the estimator's KL covers every sample).
        own_mbs = [mb for step in planned for mb in step]
        dropped = list(steps.dropped_positions)[self.layout.dp_rank::self.layout.dp_size]
        if dropped:
            own_mbs += self._plan(lengths, dropped, dp_size=1)

        def compute_log_probs(which: str) -> dict[int, torch.Tensor]:
            model = self.model if which == "old" else self.ref_model
            if self.hooks["before_log_prob_hook"]:  # slime's store prefixes: "" (old), "ref_"
                self.hooks["before_log_prob_hook"](args, [model], "" if which == "old" else "ref_")
            return self._log_probs_all(model, tokens, response_lengths, own_mbs)

        # the log-prob forwards (old policy, reference) and the updates are timed apart: the updates are
        # what benchmarks/train_throughput.py times, so the recipe's in-loop MFU compares with it
        started = synced_clock(self.device)
        prepared = prepare_rollout(args, data, self.estimator, self.device, num_steps=len(step_positions),
                                   has_ref=self.ref_model is not None, compute_log_probs=compute_log_probs,
                                   gather=self._gather_over_dp, trained=[p for s in step_positions for p in s])
        log_probs_done = synced_clock(self.device)
        self.model.train()
        self.progress = (0, sum(len(step) for step in planned))

        def before_step(step_id: int) -> None:
            if self.hooks["before_train_step_hook"]:
                self.hooks["before_train_step_hook"](args, rollout_id, step_id, [self.ddp_model],
                                                     self.optimizer.optimizer, None)

        def forward(mb: list[int]):
            return self._forward_response(self.ddp_model, [tokens[i] for i in mb], [response_lengths[i] for i in mb],
                                          with_entropy=True)

        def finish_step(step_metrics: dict[str, torch.Tensor]) -> dict[str, float]:
            self.optimizer.set_lr(self.base_lr * self.lr_multiplier(self.optimizer_steps))
            grad_norm = self.optimizer.step()  # megatron's step reads the grad norm on the host itself
            self.optimizer_steps += 1
            return {**self._sum_over_dp(losses.metrics_to_host(step_metrics)), "grad_norm": grad_norm,
                    "lr": self.base_lr * self.lr_multiplier(self.optimizer_steps - 1)}

        # Megatron's DDP averages gradients over DP; the step objective is a sum over all of the step's
        # samples (each scaled by 1/G or 1/tokens of the whole step), hence the loss x dp_size.
        overlapped = self.ddp_model.ddp_config.overlap_grad_reduce  # --overlap-grad-reduce with DP > 1
        totals = run_rl_steps(prepared, step_positions, planned, forward=forward, zero_grad=self.optimizer.zero_grad,
                              finish_step=finish_step, loss_multiplier=self.layout.dp_size, before_step=before_step,
                              on_micro_batch=self._count_micro_batch,
                              no_sync=self.ddp_model.no_sync if overlapped else None)
        update_time = synced_clock(self.device) - log_probs_done
        totals.update(getattr(self, "offload_report", {}))
        return {**{f"train/{k}": v for k, v in totals.items()},
                "perf/train_log_probs_time": log_probs_done - started, "perf/train_update_time": update_time}

    def _count_micro_batch(self) -> None:
        self.progress = (self.progress[0] + 1, self.progress[1])

    def _sum_over_dp(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.layout.dp_size == 1:
            return metrics
        parts: list = [None] * self.layout.dp_size
        dist.all_gather_object(parts, metrics, group=self.dp_group)
        summed: dict[str, float] = {}
        for part in parts:
            for key, value in part.items():
                summed[key] = summed.get(key, 0.0) + value
        return summed

    # ---- weights and checkpoints ------------------------------------------------------------------
    def _full_shards(self) -> list[dict[str, torch.Tensor]] | None:
        """Every TP rank's model shard on CPU, on DP rank 0's TP group (collective over TP); None elsewhere."""
        if self.layout.dp_rank != 0:
            return None
        offloaded = bool(self._offloaded.cpu_state)  # host views of the offload buffers
        local = self._offloaded.cpu_state or {k: v for k, v in self.model.state_dict().items()
                                              if not k.endswith("_extra_state")}
        if self.tp_size == 1:  # host views stay views (a copy would double the host memory of a 4B export)
            return [{k: v.detach().to("cpu", copy=not offloaded) for k, v in local.items()}]
        shards: list[dict] = [{} for _ in range(self.tp_size)]
        for name, tensor in local.items():
            tensor = tensor.detach().to(self.device).contiguous()  # one tensor at a time (nccl gathers on the GPU)
            parts = [torch.empty_like(tensor) for _ in range(self.tp_size)]
            dist.all_gather(parts, tensor, group=self.tp_group)
            for rank, part in enumerate(parts):
                shards[rank][name] = part.to("cpu")
        return shards

    def export_weights(self, bucket_bytes: int | None = None) -> list[dict[str, torch.Tensor]]:
        """HF-named CPU tensors in buckets of at most ``bucket_bytes`` (rank 0; others return [])."""
        shards = self._full_shards()
        if shards is None or self.layout.rank != 0:
            return []
        hf_state = self.bridge.megatron_to_hf(shards, self.cfg)
        pairs = [(name, tensor.to(self.dtype) if tensor.is_floating_point() else tensor) for name, tensor in hf_state.items()]
        del hf_state, shards
        if not bucket_bytes:
            return WeightBuckets([dict(pairs)])
        return WeightBuckets(dict(bucket) for bucket in self.bridge.export_hf_buckets(pairs, int(bucket_bytes)))

    def weight_stream_problem(self) -> str | None:
        """Why this trainer cannot stream its weights from rank 0 alone (None: it can)."""
        if self.tp_size != 1:
            return (f"--tensor-model-parallel-size {self.tp_size}: train rank 0 holds one TP shard, the export "
                    "gathers the shards over TP first")
        return None

    def weight_sources(self) -> tuple[list, torch.dtype]:
        """A streamed push (``core/weight_source.py``, train rank 0, TP 1): HF-named views of the live
        megatron parameters on the GPU (the built-in bridge maps names and fused tensors without a
        copy: ``weights.hf_views``; another bridge's ``megatron_to_hf`` runs on the GPU tensors), and
        the dtype they travel in (as ``export_weights``)."""
        if self._offloaded.cpu_state:
            raise RuntimeError("a streamed weight push reads the trainer's weights on its device, but they are "
                               "offloaded; push before offload() (core/loop.py does when streaming)")
        problem = self.weight_stream_problem()
        if problem:
            raise RuntimeError(f"streamed weight push: {problem}")
        state = {k: v for k, v in self.model.state_dict().items() if not k.endswith("_extra_state")}
        from .bridge import DenseDecoderBridge

        if type(self.bridge) is DenseDecoderBridge:
            from .weights import hf_shapes, hf_views

            shapes = hf_shapes(self.cfg)
            return [(name, view, shapes[name]) for name, view in hf_views(state, self.cfg)], self.dtype
        return list(self.bridge.megatron_to_hf([state], self.cfg).items()), self.dtype

    def save(self, path: str) -> None:
        """Per-rank model shard, optimizer state and RNG; ``meta`` from rank 0. Every rank calls it."""
        rank = self.layout.rank
        directory = os.path.join(path, "megatron")
        os.makedirs(directory, exist_ok=True)
        state = {"model": {k: v for k, v in self.model.state_dict().items() if not k.endswith("_extra_state")},
                 "rng": {"torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None}}
        torch.save(state, os.path.join(directory, f"model_rank{rank:05d}.pt"))
        if not getattr(self.args, "no_save_optim", False):
            self.optimizer.save(directory, rank)
        if rank == 0:
            with open(os.path.join(directory, "meta.json"), "w") as f:
                json.dump({"optimizer_steps": self.optimizer_steps, "tp_size": self.tp_size,
                           "world_size": self.layout.world_size}, f)
        dist.barrier()

    def load(self, path: str) -> None:
        directory = os.path.join(path, "megatron")
        with open(os.path.join(directory, "meta.json")) as f:
            meta = json.load(f)
        if meta["tp_size"] != self.tp_size or meta["world_size"] != self.layout.world_size:
            raise ValueError(f"{directory} was saved with TP {meta['tp_size']} on {meta['world_size']} ranks; resume "
                             f"with the same --tensor-model-parallel-size and train GPUs (now TP {self.tp_size} on "
                             f"{self.layout.world_size})")
        rank = self.layout.rank
        state = torch.load(os.path.join(directory, f"model_rank{rank:05d}.pt"), map_location="cpu", weights_only=False)
        self._load_shard(self.model, state["model"], directory)
        from .optimizers import optimizer_file

        if os.path.exists(optimizer_file(directory, rank)):
            self.optimizer.load(directory, rank)
        else:  # saved with --no-save-optim: fresh moments, fp32 main params from the loaded weights
            logger.warning("%s holds no optimizer state (saved with --no-save-optim): Adam starts fresh", directory)
            self.optimizer.reload_model_params()
        self.optimizer_steps = meta["optimizer_steps"]
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"])

    def log_probs(self, sequences: list[list[int]], response_lengths: list[int]) -> list[list[float]]:
        """Every rank calls it (with TP the forward is a collective)."""
        return response_log_probs(self, sequences, response_lengths)

    def save_hf(self, path: str) -> None:
        """An HF checkpoint of the current weights (rank 0 writes; all ranks take part in the gather)."""
        from .convert import write_hf_checkpoint

        shards = self._full_shards()
        if shards is not None and self.layout.rank == 0:
            write_hf_checkpoint(self.bridge.megatron_to_hf(shards, self.cfg), self.args.hf_checkpoint, path,
                                max_shard_bytes=5 * 2**30)
        dist.barrier()

    def torch_optimizers(self) -> list[torch.optim.Optimizer]:
        """The torch optimizers that step this rank's parameters or their fp32 master copies."""
        return self.optimizer.torch_optimizers()

    def state_memory(self) -> dict[str, int]:
        """Bytes this rank's weights, reference weights, grad buffers, fp32 master weights and
        optimizer state hold now (plugins/backends/state_memory.py)."""
        from ..state_memory import state_bytes

        return state_bytes(self.model.parameters(), optimizers=self.torch_optimizers(),
                           ref_params=self.ref_model.parameters() if self.ref_model is not None else ())

    def offload(self) -> None:
        """Colocated: move params, grad buffers and optimizer state to CPU while the engine generates."""
        if self.device.type == "cuda":
            before = torch.cuda.memory_allocated()
            self._offloaded.offload()
            torch.cuda.empty_cache()
            self.offload_report = offload_report(before)

    def onload(self) -> None:
        if self.device.type == "cuda":
            self._offloaded.onload()

    # ---- supervised warm-up -----------------------------------------------------------------------
    def sft_warmup(self, batches, *, lr: float, prompt_loss_weight: float = 0.0) -> list[float]:
        """Supervised steps before RL, as the torch backend's (per-sample mean of −log p over response
        tokens, prompt tokens weighted by ``prompt_loss_weight``), with a separate optimizer so the RL
        optimizer starts fresh; every DP rank takes its share of each batch."""
        from plugrl.core.plugin_config import with_settings

        from .optimizers import build_optimizer
        from .vocab_parallel import vocab_parallel_log_probs

        warm_args = with_settings(self.args, weight_decay=0.0, lr=lr)
        optimizer = build_optimizer(self.ddp_model, warm_args, device=self.device, lr=lr, tp_group=self.tp_group)
        self.model.train()
        history = []
        for token_lists, response_lengths in batches:
            optimizer.zero_grad()
            share = list(range(self.layout.dp_rank, len(token_lists), self.layout.dp_size))
            loss_sum = torch.zeros((), device=self.device)
            if share:
                mine = [token_lists[i] for i in share]
                batch = pack_thd(mine, self.device, self.pad_multiple)
                logits = self.logits(self.ddp_model, batch)
                n_real = sum(len(t) for t in mine)
                lp, _ = vocab_parallel_log_probs(
                    logits, torch.arange(n_real - 1, device=self.device), batch.input_ids[0][1:n_real], temperature=1.0,
                    vocab_start=self.layout.tp_rank * logits.shape[-1], vocab_size=self.cfg.vocab_size,
                    group=self.tp_group)
                offset = 0
                for i, tokens in zip(share, mine):
                    n = len(tokens)
                    weights = torch.full((n - 1,), float(prompt_loss_weight), device=self.device)
                    weights[n - 1 - response_lengths[i]:] = 1.0
                    loss_sum = loss_sum - (lp[offset:offset + n - 1] * weights).sum() / weights.sum().clamp(min=1.0)
                    offset += n
            loss = loss_sum / len(token_lists)
            (loss * self.layout.dp_size).backward()
            optimizer.step()
            total = loss.detach().clone()
            if self.layout.dp_size > 1:
                dist.all_reduce(total, group=self.dp_group)
            history.append(float(total))
        self.optimizer.reload_model_params()
        del optimizer
        return history


class _OffloadedStorages:
    """Colocated runs: frees the GPU storages behind the params, the fp32 grad buffers and the
    optimizer state while the rollout engine generates, and restores them in place (see
    ``core/gpu_offload.py``: the views megatron's DDP buffers hand out stay valid)."""

    def __init__(self, backend: MegatronTrainBackend):
        self.backend = backend
        self.storages = StorageOffload()
        self.cpu_state: dict[str, torch.Tensor] = {}  # the model's state dict while offloaded

    def _tensors(self):
        backend = self.backend
        for module in (backend.model, backend.ref_model):
            if module is not None:
                for param in module.parameters():
                    yield param.data, True
                    if getattr(param, "main_grad", None) is not None:
                        yield param.main_grad, False  # gradients are zeroed before every step anyway
        for torch_optimizer in backend.torch_optimizers():
            for group in torch_optimizer.param_groups:
                for param in group["params"]:
                    yield param.data, True
            for state in torch_optimizer.state.values():
                for value in state.values():
                    if torch.is_tensor(value) and value.is_cuda:
                        yield value, True

    def offload(self) -> None:
        # Host views of the model's state: weights are exported to the engines while offloaded.
        state = {k: v for k, v in self.backend.model.state_dict().items() if not k.endswith("_extra_state")}
        self.storages.offload((tensor, keep) for tensor, keep in self._tensors() if tensor.is_cuda)
        self.cpu_state = {name: self.storages.host_view(tensor) for name, tensor in state.items()}

    def onload(self) -> None:
        self.cpu_state = {}
        self.storages.onload()


def _holds_weights(path: str) -> bool:
    from .dist_ckpt import is_torch_dist

    return is_torch_dist(path) or any(name.endswith(".safetensors") for name in os.listdir(path))


def _unwrap(model):
    """The GPTModel inside megatron's DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def _model_bridge(hf_config):
    from plugrl.core.plugins import load_plugins

    bridge = load_plugins().pm.hook.plugrl_model_bridge(hf_config=hf_config)
    if bridge is None:
        raise ValueError(f"no plugrl_model_bridge plugin supports model_type {getattr(hf_config, 'model_type', None)!r} "
                         "(built in: qwen3, qwen2, llama); install a plugin that implements the hook")
    return bridge

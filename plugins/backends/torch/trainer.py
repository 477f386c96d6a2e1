"""The embedded train backend ``torch``: an HF ``AutoModelForCausalLM`` trained with AdamW.

Runs inside each train actor (one rank: CPU or one GPU). Per rollout: recompute old log-probs (or
reuse the current ones when there is one optimizer step and no KL, as slime does), reference
log-probs when a KL needs them, advantages from the estimator, then ``--num-steps-per-rollout``
optimizer steps over micro-batches. A micro-batch is one packed row: samples concatenated with
positions restarting per sample, attended by plugrl's packed attention over cu_seqlens
(``hf/packed_attention.py``: varlen flash attention on CUDA), so no token attends across samples.

Data parallelism (WORLD_SIZE > 1, env rendezvous of ``core/train_group.py``): every rank gets the
whole rollout and takes a token-balanced share of each optimizer step's samples; it packs its share
into micro-batches, scales each micro-batch loss by the WHOLE step's normaliser (rollouts or loss
tokens), and the gradients are summed over ranks before clipping, so the step's objective and update
equal the single-rank ones. Each rank recomputes old/ref log-probs for its own samples only; the
per-token KL is all-gathered so advantages (which need whole groups) are computed on the full batch,
identically on every rank. Metrics are summed over ranks, so rank 0 reports single-rank numbers.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from typing import Any

import torch
from plugrl.core import losses
from plugrl.core.gpu_offload import StorageOffload
from plugrl.core.host_to_device import to_device
from plugrl.core.packing import karmarkar_karp, plan_micro_batches, split_into_steps
from plugrl.core.precision import resolve_precision
from plugrl.core.types import option as _opt
from plugrl.core.weight_buckets import WeightBuckets

from . import liger
from ..state_memory import state_bytes
from .fused_log_probs import CHUNK_ELEMENTS, linear_log_probs, plain_lm_head
from .options import grad_cache_bytes

from ..trainer_common import (  # noqa: F401 - resolve_device and friends stay importable from here
    lr_lambda_factory,
    offload_report,
    resolve_device,
    response_log_probs,
    response_index,
    response_slices,
    synced_clock,
)

logger = logging.getLogger(__name__)


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Join the env:// process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA). Runs in the
    train actor when the backend is built; the env vars come from ``core/train_group.py``.

    Returns (rank, world size, device); on CUDA the device becomes ``cuda:$LOCAL_RANK``.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world <= 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return dist.get_rank(), dist.get_world_size(), device


def rank_share(positions: list[int], lengths: list[int], rank: int, world: int) -> list[int]:
    """The positions of ``positions`` that ``rank`` trains on: a token-balanced split (Karmarkar–Karp,
    equal sample counts when they divide evenly), in original order. Same answer on every rank."""
    if world == 1:
        return list(positions)
    parts = karmarkar_karp([lengths[p] for p in positions], world, equal_size=len(positions) % world == 0)
    return [positions[i] for i in parts[rank]]


def packed_inputs(token_lists: list[list[int]], device, *, dense_mask: bool = False,
                  dtype: torch.dtype = torch.float32) -> dict:
    """One row holding every sequence, positions restarting per sequence, so the logits equal those of
    each sequence run alone: the sample boundaries go to the ``plugrl_packed`` attention as
    ``cu_seq_lens_q`` (``hf/packed_attention.py``), or, with ``dense_mask`` (models that cannot take
    that attention), as a block-diagonal causal ``[1, 1, T, T]`` additive mask in ``dtype`` (0 where
    attended, the dtype's minimum elsewhere: what HF's eager and SDPA attentions both add)."""
    lengths = [len(t) for t in token_lists]
    # built on the host, copied without a host sync (host_to_device.py)
    ids = to_device([tok for t in token_lists for tok in t], device, torch.long)
    positions = to_device(torch.cat([torch.arange(n) for n in lengths]), device)
    if not dense_mask:
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
        cu = to_device(cu, device)
        longest = max(lengths)
        return {"input_ids": ids[None], "position_ids": positions[None], "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                "max_length_q": longest, "max_length_k": longest}
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    total = ids.numel()
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril_()
    allowed = causal & (segment[:, None] == segment[None, :])
    mask = torch.zeros(total, total, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return {"input_ids": ids[None], "position_ids": positions[None], "attention_mask": mask[None, None]}


def response_logits(model, inputs: dict, index: torch.Tensor) -> torch.Tensor:
    """``[len(index), V]`` logits at the packed row's positions ``index`` (the tokens before each
    response token). The LM head runs on those positions only (``logits_to_keep``, which HF causal LMs
    take), not on every prompt token: at 4B scale a full row of logits is ~0.3 MB per token in bf16,
    plus as much again for its gradient. Models whose forward lacks it get the full row, then index."""
    if _takes_logits_to_keep(type(model)):
        return model(**inputs, logits_to_keep=index).logits.squeeze(0)
    return model(**inputs).logits.squeeze(0)[index]


@functools.cache
def _takes_logits_to_keep(model_type: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_type.forward).parameters


def _load_model(path: str, dtype: torch.dtype, device: torch.device):
    """-> ``(model, dense_mask)``: the HF model with plugrl's packed attention, or, for an architecture
    whose attention cannot be swapped (HF raises at load), with its own attention fed dense masks."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..hf.packed_attention import register, supports

    lacking = supports(AutoConfig.from_pretrained(path))
    if lacking is None:
        try:
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=register()).to(device), False
        except ValueError as exc:  # HF refuses a custom attention for this architecture
            lacking = str(exc)
    logger.warning("%s: plugrl's packed attention does not fit this model (%s); packing with dense block masks",
                   path, lacking)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device), True


class TorchTrainBackend:
    """HF model + AdamW; ``train(rollout_id, data)`` runs all optimizer steps of one rollout."""

    def __init__(self, args: Any, *, estimator=None, total_optimizer_steps: int | None = None):

        self.args = args
        self.rank, self.world_size, self.device = init_distributed(resolve_device(getattr(args, "device", None)))
        torch.manual_seed(int(_opt(args, "seed", 1234)))
        # The driver resolves --bf16/--fp32/auto for the device it gives this actor (core/precision.py).
        self.dtype = torch.bfloat16 if resolve_precision(args, self.device.type).dtype == "bf16" else torch.float32
        self.model, self.dense_mask = _load_model(args.hf_checkpoint, self.dtype, self.device)
        # Liger's RoPE / RMSNorm / SwiGLU kernels on CUDA (--liger-kernels auto|on|off), before checkpointing wraps layers
        use_liger, why = liger.choose(getattr(args, "liger_kernels", None), self.device.type,
                                      getattr(self.model.config, "model_type", None))
        self.liger_kernels = liger.apply(self.model) if use_liger else []
        logger.info("torch backend: Liger kernels %s [%s]", ", ".join(self.liger_kernels) or "off", why)
        if getattr(args, "gradient_checkpointing", False):
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.config.use_cache = False
        # log-probs from hidden states in slices (fused_log_probs.py): --fused-log-probs auto|always|never
        self.fused_log_probs = getattr(args, "fused_log_probs", None) or "auto"
        compile_slices = getattr(args, "compile_log_prob_slices", None) or "auto"
        self.compile_log_prob_slices = compile_slices == "on" or (compile_slices == "auto" and self.device.type == "cuda")
        self.grad_cache_bytes = 0  # the fused log-probs' kept gradient basis, set per train call
        self.estimator = estimator
        self.ref_model = None
        if self._needs_ref():
            ref_path = getattr(args, "ref_load", None) or args.hf_checkpoint
            self.ref_model, ref_dense = _load_model(ref_path, self.dtype, self.device)
            self.ref_model.eval()
            if ref_dense != self.dense_mask:
                raise ValueError(f"--ref-load {ref_path}: its architecture takes a different attention than "
                                 f"--hf-checkpoint {args.hf_checkpoint}'s; use the same architecture")
            self.ref_model.requires_grad_(False)
        self._offloaded = StorageOffload()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=float(args.lr), weight_decay=float(_opt(args, "weight_decay", 0.0)),
            betas=(float(_opt(args, "adam_beta1", 0.9)), float(_opt(args, "adam_beta2", 0.999))),
            eps=float(_opt(args, "adam_eps", 1e-8)),
            fused=True if self.device.type == "cuda" else None,  # one kernel for the whole step on CUDA
        )
        total = total_optimizer_steps or 1
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda_factory(args, total))
        self.optimizer_steps = 0
        self.progress = (0, 0)  # (micro-batches done, planned) of the running train call

    # ---- setup helpers -------------------------------------------------------------------------
    def _needs_ref(self) -> bool:
        if getattr(self.args, "use_kl_loss", False):
            return True
        return bool(getattr(self.estimator, "needs_ref_log_probs", False)) or float(_opt(self.args, "kl_coef", 0.0)) != 0.0

    # ---- log-probs -----------------------------------------------------------------------------
    def _forward_response(self, model, token_lists, response_lengths, *, with_entropy: bool):
        inputs = packed_inputs(token_lists, self.device, dense_mask=self.dense_mask, dtype=self.dtype)
        temperature = float(_opt(self.args, "rollout_temperature", 1.0))
        index = response_index(token_lists, response_lengths, self.device)
        targets = inputs["input_ids"][0][index + 1]
        head = plain_lm_head(model) if self.fused_log_probs != "never" else None
        if head is not None and (self.fused_log_probs == "always" or len(index) * head.out_features > CHUNK_ELEMENTS):
            # log-probs from hidden states in slices: no [tokens, vocab] logits (fused_log_probs.py). Below one
            # slice the full logits are small and the backward's recomputation would cost more than it saves.
            hidden = model.model(**inputs).last_hidden_state.squeeze(0)[index]  # squeeze: no select backward
            return linear_log_probs(hidden, head.weight, targets, temperature=temperature, with_entropy=with_entropy,
                                    compiled=self.compile_log_prob_slices, grad_cache_bytes=self.grad_cache_bytes)
        selected = response_logits(model, inputs, index)
        log_probs = losses.log_probs_from_logits(selected, targets, temperature)
        entropy = losses.entropy_from_logits(selected, temperature) if with_entropy else None
        return log_probs, entropy

    @torch.no_grad()
    def _log_probs_all(self, model, token_lists, response_lengths, micro_batches) -> dict[int, torch.Tensor]:
        """Response log-probs of the samples in ``micro_batches`` (no grad), by position."""
        model.eval()
        out: dict[int, torch.Tensor] = {}
        for mb in micro_batches:
            lp, _ = self._forward_response(model, [token_lists[i] for i in mb],
                                           [response_lengths[i] for i in mb], with_entropy=False)
            for i, chunk in zip(mb, lp.split([response_lengths[i] for i in mb])):
                out[i] = chunk.float()
        return out

    def _micro_batches(self, positions: list[int], lengths: list[int]) -> list[list[int]]:
        plan = plan_micro_batches(
            [lengths[p] for p in positions], micro_batch_size=int(_opt(self.args, "micro_batch_size", 1)),
            use_dynamic_batch_size=bool(getattr(self.args, "use_dynamic_batch_size", False)),
            max_tokens_per_gpu=getattr(self.args, "max_tokens_per_gpu", None), dp_size=1,
            balance_data=False,
        )
        return [[positions[i] for i in mb] for mb in plan[0]]

    # ---- data parallelism ------------------------------------------------------------------------
    def _share(self, positions: list[int], lengths: list[int]) -> list[int]:
        if self.world_size > 1 and len(positions) < self.world_size:
            raise ValueError(
                f"an optimizer step has {len(positions)} samples but the train group has {self.world_size} "
                "data-parallel ranks (--actor-num-nodes x --actor-num-gpus-per-node): every rank needs at least "
                "one sample; raise --global-batch-size or lower the number of train ranks")
        return rank_share(list(positions), lengths, self.rank, self.world_size)

    def _all_reduce_grads(self, bucket_elements: int = 1 << 26) -> None:
        """Sum every parameter's gradient over ranks, a flat bucket at a time (few collectives). A rank
        that had no sample in the step contributes zeros."""
        import torch.distributed as dist

        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[torch.nn.Parameter] = []
        size = 0
        for i, p in enumerate(params):
            bucket.append(p)
            size += p.numel()
            if size >= bucket_elements or i == len(params) - 1 or params[i + 1].grad.dtype != p.grad.dtype:
                flat = torch.cat([q.grad.reshape(-1) for q in bucket])
                dist.all_reduce(flat)
                for q, chunk in zip(bucket, flat.split([q.numel() for q in bucket])):
                    q.grad.copy_(chunk.view_as(q.grad))
                bucket, size = [], 0

    def _all_reduce_metrics(self, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The step's 0-d metric tensors summed over ranks, in one collective, left on the device."""
        import torch.distributed as dist

        keys = sorted(metrics)
        values = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float64, device=self.device).reshape(())
                              for k in keys])
        dist.all_reduce(values)
        return dict(zip(keys, values.unbind()))

    def _all_gather_samples(self, local: dict[int, torch.Tensor], n: int) -> list[torch.Tensor]:
        """Per-sample tensors computed by their owning ranks, as one full list on every rank."""
        import torch.distributed as dist

        if self.world_size == 1:
            return [local[i] for i in range(n)]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, {i: t.detach().cpu() for i, t in local.items()})
        merged = {i: t for part in gathered for i, t in part.items()}
        return [merged[i].to(self.device) for i in range(n)]

    # ---- training ------------------------------------------------------------------------------
    def train(self, rollout_id: int, data: dict) -> dict:
        from plugrl.core.rl_step import prepare_rollout, run_rl_steps

        args = self.args
        tokens = data["tokens"]
        response_lengths = data["response_lengths"]
        lengths = [len(t) for t in tokens]
        n = len(tokens)
        steps = split_into_steps(data["rollout_ids"], int(_opt(args, "global_batch_size", n)))
        step_positions = steps.steps
        # This rank's samples of every step (all of them on a single rank); samples of rollouts that
        # fill no step are not trained on but still get log-probs (for the KL the estimator may see).
        step_shares = [self._share(positions, lengths) for positions in step_positions]
        own = [p for share in step_shares for p in share]
        if steps.dropped_positions:
            own += rank_share(steps.dropped_positions, lengths, self.rank, self.world_size)
        own_mbs = self._micro_batches(sorted(own), lengths)

        def compute_log_probs(which: str) -> dict[int, torch.Tensor]:
            model = self.model if which == "old" else self.ref_model
            return self._log_probs_all(model, tokens, response_lengths, own_mbs)

        # the log-prob forwards (old policy, reference) and the updates are timed apart: the updates are
        # what benchmarks/train_throughput.py times, so the recipe's in-loop MFU compares with it
        started = synced_clock(self.device)
        prepared = prepare_rollout(args, data, self.estimator, self.device, num_steps=len(step_positions),
                                   has_ref=self.ref_model is not None, compute_log_probs=compute_log_probs,
                                   gather=self._all_gather_samples, trained=[p for s in step_positions for p in s])
        log_probs_done = synced_clock(self.device)
        self.model.train()
        self.grad_cache_bytes = grad_cache_bytes(getattr(args, "log_prob_grad_cache", None), self.device,
                                                 float(_opt(args, "entropy_coef", 0.0)))
        planned = [self._micro_batches(share, lengths) for share in step_shares]
        self.progress = (0, sum(len(p) for p in planned))

        def forward(mb: list[int]):
            return self._forward_response(self.model, [tokens[i] for i in mb], [response_lengths[i] for i in mb],
                                          with_entropy=True)

        def finish_step(step_metrics: dict[str, torch.Tensor]) -> dict:
            if self.world_size > 1:
                # Each rank holds its share of the step's sum: summing over ranks gives the full step.
                self._all_reduce_grads()
                step_metrics = self._all_reduce_metrics(step_metrics)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(_opt(args, "clip_grad", 1.0)))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer_steps += 1
            # the grad norm stays a device tensor: reading it here would idle the GPU while the host
            # launches the optimizer (run_rl_steps reads all of the step's metrics after this)
            return {**step_metrics, "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0]}

        totals = run_rl_steps(prepared, step_positions, planned, forward=forward,
                              zero_grad=lambda: self.optimizer.zero_grad(set_to_none=True), finish_step=finish_step,
                              on_micro_batch=self._count_micro_batch)
        update_time = synced_clock(self.device) - log_probs_done
        totals.update(getattr(self, "offload_report", {}))
        return {**{f"train/{k}": v for k, v in totals.items()},
                "perf/train_log_probs_time": log_probs_done - started, "perf/train_update_time": update_time}

    def _count_micro_batch(self) -> None:
        self.progress = (self.progress[0] + 1, self.progress[1])

    # ---- weights and checkpoints ----------------------------------------------------------------
    def export_weights(self, bucket_bytes: int | None = None) -> list[dict[str, torch.Tensor]]:
        """HF-named CPU tensors in buckets of at most ``bucket_bytes`` (one bucket if None); ``[]`` on
        ranks other than 0 (all ranks hold the same weights, the driver uses rank 0's)."""
        if self.rank != 0:
            return []
        buckets, current, size = WeightBuckets(), {}, 0
        offloaded = self._offloaded.offloaded
        for name, tensor in self.model.state_dict().items():
            if offloaded:  # colocated: weights are pushed while the trainer is offloaded
                tensor = self._offloaded.host_view(tensor)  # a view of the offload buffer: no host copy
            # a live CPU parameter is copied (an in-process reader must not see the next step's values)
            t = tensor.detach().to("cpu", copy=not offloaded)
            nbytes = t.numel() * t.element_size()
            if bucket_bytes and current and size + nbytes > bucket_bytes:
                buckets.append(current)
                current, size = {}, 0
            current[name] = t
            size += nbytes
        if current:
            buckets.append(current)
        return buckets

    def weight_sources(self) -> tuple[list, None]:
        """A streamed push (``core/weight_source.py``, train rank 0): the live HF-named tensors on
        this rank's device (no copy) and no dtype change. The loop pushes before it offloads."""
        if self._offloaded.offloaded:
            raise RuntimeError("a streamed weight push reads the trainer's weights on its device, but they are "
                               "offloaded; push before offload() (core/loop.py does when streaming)")
        return list(self.model.state_dict().items()), None

    def state_dict(self) -> dict:
        """The checkpointed state; ``--no-save-optim`` leaves out the AdamW moments (a resume starts
        them fresh; the LR schedule and step count are kept)."""
        state = {
            "model": self.model.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "optimizer_steps": self.optimizer_steps,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }
        if not getattr(self.args, "no_save_optim", False):
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            logger.warning("the checkpoint holds no optimizer state (saved with --no-save-optim): AdamW starts fresh")
        self.scheduler.load_state_dict(state["scheduler"])
        self.optimizer_steps = state["optimizer_steps"]
        # RNG states must be CPU byte tensors; ``load`` maps the checkpoint to the train device
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if state["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])

    def save(self, path: str) -> None:
        """Rank 0 writes (every rank holds the same weights and optimizer state); the others return."""
        if self.rank == 0:
            torch.save(self.state_dict(), os.path.join(path, "train_state.pt"))

    def load(self, path: str) -> None:
        """Every rank restores the same state (``path`` must be readable from every rank's node)."""
        self.load_state_dict(torch.load(os.path.join(path, "train_state.pt"), map_location=self.device, weights_only=False))

    def log_probs(self, sequences: list[list[int]], response_lengths: list[int]) -> list[list[float]]:
        return response_log_probs(self, sequences, response_lengths)

    def save_hf(self, path: str) -> None:
        from transformers import AutoTokenizer

        if self.rank != 0:
            return
        state = None
        if self._offloaded.offloaded:  # colocated runs end offloaded: write the host copy
            state = {name: self._offloaded.host_view(t) for name, t in self.model.state_dict().items()}
        self.model.save_pretrained(path, state_dict=state)
        AutoTokenizer.from_pretrained(self.args.hf_checkpoint).save_pretrained(path)

    def torch_optimizers(self) -> list[torch.optim.Optimizer]:
        """The torch optimizers that step this rank's parameters (benchmarks hook their step)."""
        return [self.optimizer]

    def state_memory(self) -> dict[str, int]:
        """Bytes this rank's weights, reference weights, grads and optimizer state hold now
        (plugins/backends/state_memory.py)."""
        return state_bytes(self.model.parameters(), optimizers=self.torch_optimizers(),
                           ref_params=self.ref_model.parameters() if self.ref_model is not None else ())

    def offload(self) -> None:
        """Colocated on a GPU: free the memory of the model, the reference model and the optimizer
        state while the engine generates (reused pinned host buffers, see core/gpu_offload.py)."""
        if self.device.type == "cuda":
            before = torch.cuda.memory_allocated()
            self._release_storages()
            torch.cuda.empty_cache()
            self.offload_report = offload_report(before)

    def onload(self) -> None:
        if self.device.type == "cuda":
            self._restore_storages()

    def _release_storages(self) -> None:
        """The device-independent part of ``offload`` (tests run it on CPU)."""
        self._offloaded.offload(self._offload_tensors())

    def _restore_storages(self) -> None:
        self._offloaded.onload()

    def _offload_tensors(self):
        for module in (self.model, self.ref_model):
            if module is not None:
                for tensor in (*module.parameters(), *module.buffers()):
                    yield tensor.data, True
                    if tensor.grad is not None:
                        yield tensor.grad, False  # zeroed (set to None) before every step anyway
        for state in self.optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value) and value.device.type == self.device.type:  # not Adam's host step count on GPU
                    yield value, True

    # ---- supervised warm-up -----------------------------------------------------------------------
    def sft_warmup(self, batches, *, lr: float, prompt_loss_weight: float = 0.0) -> list[float]:
        """Supervised steps before RL (``--loss-type sft_loss`` semantics: per-sample mean of −log p
        over response tokens). ``prompt_loss_weight`` > 0 also trains on prompt tokens as plain
        language modelling. Uses its own AdamW so the RL optimizer starts fresh.

        Under data parallelism every rank gets the same ``batches`` and trains on a token-balanced
        share of each (divided by the whole batch size); gradients and the loss are summed over
        ranks, so the steps and the returned history equal the single-rank ones."""
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0)
        self.model.train()
        history = []
        for token_lists, response_lengths in batches:
            optimizer.zero_grad(set_to_none=True)
            share = rank_share(list(range(len(token_lists))), [len(t) for t in token_lists], self.rank, self.world_size)
            loss = torch.zeros((), device=self.device)
            if share:  # a batch smaller than the world leaves some ranks without a sample
                mine = [token_lists[i] for i in share]
                inputs = packed_inputs(mine, self.device, dense_mask=self.dense_mask, dtype=self.dtype)
                logits = self.model(**inputs).logits[0]
                offset = 0
                for tokens, response_length in zip(mine, [response_lengths[i] for i in share]):
                    n = len(tokens)
                    weights = torch.full((n - 1,), float(prompt_loss_weight), device=self.device)
                    weights[n - 1 - response_length:] = 1.0
                    targets = inputs["input_ids"][0][offset + 1:offset + n]
                    lp = losses.log_probs_from_logits(logits[offset:offset + n - 1], targets)
                    loss = loss - (lp * weights).sum() / weights.sum().clamp(min=1.0)
                    offset += n
                loss = loss / len(token_lists)
                loss.backward()
            loss_value = float(loss.detach())
            if self.world_size > 1:
                self._all_reduce_grads()
                loss_value = float(self._all_reduce_metrics({"loss": loss_value})["loss"])
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(_opt(self.args, "clip_grad", 1.0)))
            optimizer.step()
            history.append(loss_value)
        return history

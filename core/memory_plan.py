"""Host and GPU memory of a run, planned on the driver like its placement (``--dry-run`` and the start
of every run), so a plan that cannot fit is refused before any actor starts.

Where the host memory of a GPU run goes (per node):
- the trainer's offloaded state (colocated, ``--offload-train``): kept tensors are copied once into
  reused, pinned host buffers (``core/gpu_offload.py``): parameters, fp32 main parameters and both
  Adam moments (megatron; sharded over DP with the distributed optimizer) or parameters and AdamW
  moments (torch); the reference model's parameters when a KL term needs it. Gradients are not kept;
- the engines' host copy of their weights (colocated, ``--offload-rollout``);
- one weight export in Ray's object store during a push (``core/weight_buckets.py``: readers map it,
  nobody copies it), plus the export's conversion temporaries on train rank 0 (megatron: the
  qkv split and gate/up halves; with TP > 1 the gathered shards); only where the push goes through
  the object store (``core/weight_sync.py``): a streamed push (CUDA IPC, broadcast) touches no host
  memory, but on a colocated GPU it holds the trainer's whole state, the engine's weights and two
  flat buckets (``--update-weight-buffer-size``) at once, listed as that moment's GPU peak;
- a fixed cost per process that holds a CUDA context and torch (measured below).

The sizes come from the checkpoint's ``config.json`` (read as JSON: no torch import).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

GIB = 2**30
# Measured on one H200 (torch 2.11, 2026-12-04): RSS of a train actor / an engine process with a CUDA
# context, torch, transformers (and megatron-core) imported, before any model: ~2.5 GiB each; the
# driver, Ray's GCS/raylet and idle workers together ~2 GiB.
GPU_PROCESS_GIB = 2.5
RAY_AND_DRIVER_GIB = 2.0
# Ray's memory monitor kills workers above this share of the node's memory (RAY_memory_usage_threshold).
RAY_KILL_FRACTION = 0.95


def pinned_bytes(nbytes: int) -> int:
    """Host bytes a pinned buffer of ``nbytes`` takes: torch's caching host allocator (behind
    ``torch.empty(..., pin_memory=True)``) rounds every block up to a power of two, so per-tensor
    pinned copies of a model cost up to twice its size (a 4B model's fp32 moments: ~1.33x)."""
    return 0 if nbytes <= 0 else 1 << (int(nbytes) - 1).bit_length()


@dataclass
class ModelShape:
    params: int  # every parameter, tied embeddings counted once
    converted: int  # parameters the megatron -> HF export rebuilds (fused qkv, gate/up)
    hf_tensors: list[int] = field(default_factory=list)  # element counts of the HF parameters
    megatron_tensors: list[int] = field(default_factory=list)  # ... of megatron's (fused qkv, fc1), TP 1

    @classmethod
    def from_config(cls, config: dict, *, vocab_multiple: int = 1) -> ModelShape | None:
        """``vocab_multiple``: megatron pads the vocabulary (embedding and output rows) to a multiple of
        ``--make-vocab-size-divisible-by`` x TP; those rows are trained state but never exported."""
        text = config.get("text_config", config)
        try:
            hidden, layers, vocab = int(text["hidden_size"]), int(text["num_hidden_layers"]), int(text["vocab_size"])
            heads = int(text["num_attention_heads"])
            kv_heads = int(text.get("num_key_value_heads") or heads)
            head_dim = int(text.get("head_dim") or hidden // heads)
            ffn = int(text["intermediate_size"])
        except (KeyError, TypeError, ValueError):
            return None
        q, kv, o = hidden * heads * head_dim, hidden * kv_heads * head_dim, heads * head_dim * hidden
        qk_norms = [head_dim, head_dim] if text.get("model_type", config.get("model_type")) == "qwen3" else []
        tied = bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings")))
        hf_layer = [q, kv, kv, o, hidden * ffn, hidden * ffn, ffn * hidden, hidden, hidden, *qk_norms]
        megatron_layer = [q + 2 * kv, o, 2 * hidden * ffn, ffn * hidden, hidden, hidden, *qk_norms]
        heads_out = [] if tied else [vocab * hidden]
        hf = [vocab * hidden, *hf_layer * layers, hidden, *heads_out]
        padded = -(-vocab // max(1, vocab_multiple)) * max(1, vocab_multiple)
        megatron = [padded * hidden, *megatron_layer * layers, hidden, *([] if tied else [padded * hidden])]
        return cls(params=sum(hf), converted=layers * (q + 2 * kv + 2 * hidden * ffn), hf_tensors=hf,
                   megatron_tensors=megatron)

    def pinned_copies(self, layout: str, element_bytes: int, shards: int = 1) -> int:
        """Host bytes of one pinned copy per parameter tensor (``shards``: TP x PP split)."""
        tensors = self.megatron_tensors if layout == "megatron" else self.hf_tensors
        return sum(pinned_bytes(n * element_bytes // shards) for n in tensors)


def read_model_shape(hf_checkpoint: str | None, *, vocab_multiple: int = 1) -> ModelShape | None:
    try:
        config = json.loads((Path(hf_checkpoint) / "config.json").read_text())
    except (TypeError, OSError, ValueError):
        return None
    return ModelShape.from_config(config, vocab_multiple=vocab_multiple) if isinstance(config, dict) else None


def node_memory_bytes() -> int | None:
    """MemTotal of this machine (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_used_bytes() -> int | None:
    """Memory in use on this machine as Ray's memory monitor counts it (total - available)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemTotal"] - info["MemAvailable"]
    except (OSError, KeyError, ValueError, IndexError):
        return None


@dataclass
class MemoryPlan:
    host_items: list[tuple[str, float]] = field(default_factory=list)  # (what, GiB) on the busiest node
    gpu_items: list[tuple[str, float]] = field(default_factory=list)  # (what, GiB) on the busiest GPU
    node_gib: float | None = None
    weight_transport: str = "object_store"  # the push the plan assumes (core/weight_sync.expected_transport)

    @property
    def host_gib(self) -> float:
        return sum(gib for _, gib in self.host_items)

    @property
    def gpu_state_gib(self) -> float:
        return sum(gib for _, gib in self.gpu_items)

    def lines(self) -> list[str]:
        limit = (f" of {self.node_gib:.0f} GiB on this machine (Ray kills workers above "
                 f"{RAY_KILL_FRACTION * self.node_gib:.0f})") if self.node_gib else ""
        out = [f"host memory, busiest node: ~{self.host_gib:.1f} GiB at peak{limit}"]
        out += [f"  {gib:6.1f} GiB  {what}" for what, gib in self.host_items]
        out.append(f"GPU memory, busiest GPU: ~{self.gpu_state_gib:.1f} GiB of model state, before activations and KV"
                   f" (weight push: {self.weight_transport})")
        out += [f"  {gib:6.1f} GiB  {what}" for what, gib in self.gpu_items]
        return out


def _needs_ref(args) -> bool:
    return bool(getattr(args, "use_kl_loss", False)) or float(getattr(args, "kl_coef", 0.0) or 0.0) != 0.0


def plan_memory(args, *, colocated: bool, on_gpu: bool = True, node_bytes: int | None = None) -> MemoryPlan | None:
    """The plan for a validated config, or None when the checkpoint's size is unknown. ``colocated``:
    the placement puts engines on the train GPUs."""
    from .plugin_traits import parallel_sizes, train_trait

    megatron = train_trait(args, "memory_model", "hf") == "megatron"  # the backend's declared memory model
    sizes = parallel_sizes(args)  # the train backend's declared TP/PP/CP (all 1 when it declares none)
    tp, pp = int(sizes.tp), int(sizes.pp)
    shape = read_model_shape(getattr(args, "hf_checkpoint", None), vocab_multiple=int(sizes.vocab_multiple))
    if shape is None:
        return None
    node = node_bytes if node_bytes is not None else node_memory_bytes()
    plan = MemoryPlan(node_gib=node / GIB if node else None)
    P = sum(shape.megatron_tensors) if megatron else shape.params  # the trained parameters (padded vocab)
    bf16 = on_gpu and not getattr(args, "fp32", False) and getattr(args, "bf16", None) is not False
    param_bytes = 2 if bf16 else 4
    world = int(args.actor_num_nodes) * int(args.actor_num_gpus_per_node)
    dp = max(1, world // (tp * pp * int(sizes.cp)))
    ranks_per_node = int(args.actor_num_gpus_per_node)
    model_parallel = tp * pp
    distributed = megatron and on_gpu and sizes.distributed_optimizer
    if megatron:  # bf16 params + fp32 main params and two fp32 moments (sharded over DP when distributed)
        optimizer_bytes = 12 / (dp if distributed else 1) if bf16 else 8
        grad_bytes = 4  # fp32 main grads
    else:  # AdamW moments in the parameter dtype
        optimizer_bytes, grad_bytes = 2 * param_bytes, param_bytes
    params_rank = P * param_bytes / model_parallel
    optimizer_rank = P * optimizer_bytes / model_parallel
    ref_rank = P * param_bytes / model_parallel if _needs_ref(args) else 0
    per_engine = int(getattr(args, "rollout_num_gpus_per_engine", 1) or 1)
    engine_gpus_node = (ranks_per_node if colocated else
                        min(int(getattr(args, "rollout_num_gpus", 0) or 0), int(getattr(args, "num_gpus_per_node", 8) or 8)))
    engine_weights_gpu = shape.params * 2 / per_engine  # engines serve bf16 on GPUs (HF shape)

    offload_train = colocated and bool(getattr(args, "offload_train", False))
    offload_rollout = colocated and bool(getattr(args, "offload_rollout", False))
    if offload_train:
        # What the offload keeps, as the pinned blocks it allocates (core/gpu_offload.py: one per storage)
        layout = "megatron" if megatron else "hf"
        if megatron and distributed:  # DDP's one contiguous parameter buffer; per-tensor fp32 main params
            params_host = pinned_bytes(int(params_rank))  # and moments (their DP shards when DP > 1)
            optimizer_host = 3 * shape.pinned_copies(layout, 4, model_parallel * dp) if bf16 else \
                2 * shape.pinned_copies(layout, 4, model_parallel * dp)
        else:
            params_host = shape.pinned_copies(layout, param_bytes, model_parallel)
            states = 3 if megatron and bf16 else 2
            optimizer_host = states * shape.pinned_copies(layout, 4 if megatron else param_bytes, model_parallel)
        ref_host = shape.pinned_copies(layout, param_bytes, model_parallel) if ref_rank else 0
        plan.host_items.append((f"trainer state offloaded by {ranks_per_node} rank(s): parameters + optimizer"
                                + (" + reference model" if ref_rank else "") + " (--offload-train; pinned blocks "
                                "rounded up to powers of two)", ranks_per_node * (params_host + optimizer_host + ref_host) / GIB))
    if offload_rollout:
        from .plugin_traits import drops_released_weights

        if drops_released_weights(args):  # a full push follows every resume: no host copy is kept
            plan.host_items.append(("engine weights while training: released without a host copy (a full push "
                                    "follows every resume; --update-weights-interval 1)", 0.0))
        else:
            plan.host_items.append((f"engine weights held on the host by {engine_gpus_node} engine GPU(s) while "
                                    "training (--offload-rollout; pinned, per tensor)",
                                    engine_gpus_node * shape.pinned_copies("hf", 2, per_engine) / GIB))
    from .weight_sync import OBJECT_STORE, WINDOW_BUCKETS, expected_transport

    transport = expected_transport(args, colocated=colocated, on_gpu=on_gpu)
    streamed = transport != OBJECT_STORE
    export = shape.params * 2  # HF names and shapes: the vocabulary padding is not exported
    if not streamed:
        plan.host_items.append(("one weight export in Ray's object store during a push (--update-weight-buffer-size "
                                "buckets, read in place by the engines)", export / GIB))
    temporaries = (P * 2) if (megatron and tp > 1) else (shape.converted * 2 if megatron else 0)
    if temporaries and not streamed:
        plan.host_items.append(("export conversion on train rank 0 (megatron -> HF names; TP shards gathered)",
                                temporaries / GIB))
    processes = ranks_per_node + (0 if colocated else engine_gpus_node // per_engine) + 1  # + rollout manager
    plan.host_items.append((f"{processes} processes with CUDA and torch loaded, Ray and the driver",
                            processes * GPU_PROCESS_GIB + RAY_AND_DRIVER_GIB))

    plan.gpu_items.append((f"trainer parameters, gradients and optimizer state per rank (TP {tp} × PP {pp}, DP {dp})",
                           (params_rank + optimizer_rank + P * grad_bytes / model_parallel + ref_rank) / GIB))
    if colocated:
        plan.gpu_items.append(("engine weights on the same GPU" + (" (released while training)" if offload_rollout else ""),
                               engine_weights_gpu / GIB))
    if streamed:
        # The push packs at most WINDOW_BUCKETS flat buckets at a time (a tensor larger than the
        # buffer size travels alone: the largest HF tensor bounds one bucket from below).
        bucket = max(int(getattr(args, "update_weight_buffer_size", 0) or 0), max(shape.hf_tensors) * 2)
        where = "CUDA IPC push on the trainer's GPU while the trainer's state and the engine's weights are " \
                "both resident" if colocated else "broadcast push, on the trainer's GPU and on each engine's"
        plan.gpu_items.append((f"{WINDOW_BUCKETS} weight buckets in flight ({transport}: {where})",
                               WINDOW_BUCKETS * bucket / GIB))
    plan.weight_transport = transport
    return plan


def host_memory_problem(plan: MemoryPlan | None, args) -> str | None:
    """The refusal for a plan whose host peak cannot fit this machine, naming what to change."""
    if plan is None or not plan.node_gib:
        return None
    limit = RAY_KILL_FRACTION * plan.node_gib
    if plan.host_gib <= limit:
        return None
    fixes = []
    if getattr(args, "offload_train", False):
        fixes.append("--no-offload-train (the trainer keeps its state on the GPU while the engine generates)")
    if getattr(args, "offload_rollout", False):
        fixes.append("--no-offload-rollout")
    if _needs_ref(args) and float(getattr(args, "kl_coef", 0.0) or 0.0) == 0.0 and \
            float(getattr(args, "kl_loss_coef", 0.0) or 0.0) == 0.0:
        fixes.append("--no-use-kl-loss (its coefficient is 0: the reference model only costs memory)")
    fixes.append("more train GPUs per node or more nodes (the state is split over ranks)")
    return (f"host memory: this plan needs ~{plan.host_gib:.0f} GiB at peak on one node, but Ray kills workers above "
            f"{limit:.0f} GiB on this {plan.node_gib:.0f} GiB machine (--dry-run lists where it goes); try "
            + "; or ".join(fixes) + ". PLUGRL_SKIP_MEMORY_CHECK=1 starts anyway")


def skip_check() -> bool:
    return os.environ.get("PLUGRL_SKIP_MEMORY_CHECK", "") not in ("", "0")

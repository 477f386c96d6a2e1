"""Optimizers of the megatron train backend, behind one small interface.

Built once in each train actor by the backend's constructor, around the megatron-core
``DistributedDataParallel`` wrapper (fp32 ``main_grad`` buffers; its ``finalize_model_grads``
reduces over DP and, with sequence parallelism, the replicated norm weights over TP).

* CUDA: megatron-core's optimizer (Adam, bf16 params with fp32 main params, ``--use-distributed-
  optimizer`` shards the fp32 state over DP ranks; on by default as in slime's guide). Without TE
  or apex its grad norm and clipping run on torch's ``_foreach`` kernels (``foreach_grad_ops.py``).
* CPU: megatron-core's optimizers allocate CUDA buffers, so ``torch.optim.AdamW`` steps the fp32
  params from the same ``main_grad`` buffers; the grad norm and clipping follow Megatron's rules
  (TP-sharded params counted on every TP rank, replicated ones once).
Both exclude biases and norm weights (1-D tensors) from weight decay, as megatron-core does.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from plugrl.core.types import option as _opt


def optimizer_file(directory: str, rank: int) -> str:
    """Where rank ``rank``'s optimizer state lives in a checkpoint's megatron directory."""
    return os.path.join(directory, f"optimizer_rank{rank:05d}.pt")


class MegatronCoreOptimizer:
    """megatron-core's Adam (optionally distributed) on CUDA."""

    def __init__(self, ddp_model, args, *, lr: float, use_distributed_optimizer: bool):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        from .foreach_grad_ops import install_foreach_grad_ops

        install_foreach_grad_ops()  # grad norm / clipping without per-parameter loops and syncs (no TE, no apex)
        self.ddp_model = ddp_model
        self.config = OptimizerConfig(
            optimizer="adam", lr=lr, min_lr=float(_opt(args, "min_lr", 0.0)),
            weight_decay=float(_opt(args, "weight_decay", 0.0)), adam_beta1=float(_opt(args, "adam_beta1", 0.9)),
            adam_beta2=float(_opt(args, "adam_beta2", 0.999)), adam_eps=float(_opt(args, "adam_eps", 1e-8)),
            clip_grad=float(_opt(args, "clip_grad", 1.0)), bf16=True, params_dtype=torch.bfloat16,
            use_distributed_optimizer=use_distributed_optimizer,
        )
        self.optimizer = get_megatron_optimizer(self.config, [ddp_model])
        # Without apex / Transformer Engine megatron-core steps torch's Adam, whose default foreach
        # path allocates temporaries the size of all fp32 moments at once (an OOM for a 4B model on
        # one 80 GB GPU next to 12 bytes/param of fp32 state); the fused kernel needs none.
        for inner in self.torch_optimizers():
            if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
                for group in inner.param_groups:
                    group["foreach"], group["fused"] = False, True

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> float:
        """After every micro-batch's backward: reduce grads, clip, step. Returns the grad norm."""
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads([self.ddp_model])
        _ok, grad_norm, _zeros = self.optimizer.step()
        return float(grad_norm) if grad_norm is not None else float("nan")

    def zero_grad(self) -> None:
        self.ddp_model.zero_grad_buffer()
        self.optimizer.zero_grad()

    def reload_model_params(self) -> None:
        """The model's params changed outside this optimizer (SFT warm-up): refresh the fp32 copies."""
        self.optimizer.reload_model_params()

    def torch_optimizers(self) -> list:
        """The torch optimizers megatron wraps, each over this rank's fp32 main params (its DP shard
        with the distributed optimizer)."""
        chained = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        return [wrapper.optimizer for wrapper in chained]

    def save(self, directory: str, rank: int) -> None:
        # Each rank keeps its own shard: fp32 main params and Adam moments as the inner torch optimizer
        # holds them. (megatron-core 0.19's save/load_parameter_state round trip fails on the 'step'
        # tensor of torch's Adam, which it does not save; resume needs the same TP and world size.)
        inner = self.torch_optimizers()
        torch.save({"inner": [opt.state_dict() for opt in inner],
                    "main_params": [[p.detach().cpu() for g in opt.param_groups for p in g["params"]] for opt in inner]},
                   optimizer_file(directory, rank))

    def load(self, directory: str, rank: int) -> None:
        state = torch.load(optimizer_file(directory, rank), map_location="cpu",
                           weights_only=False)
        for opt, saved_state, saved_params in zip(self.torch_optimizers(), state["inner"], state["main_params"], strict=True):
            with torch.no_grad():
                for param, saved in zip((p for g in opt.param_groups for p in g["params"]), saved_params, strict=True):
                    param.copy_(saved)
            opt.load_state_dict(saved_state)


class TorchAdamWOptimizer:
    """``torch.optim.AdamW`` over the DDP-wrapped fp32 params (CPU train actors)."""

    def __init__(self, ddp_model, args, *, lr: float, tp_group=None):
        self.ddp_model = ddp_model
        self.tp_group = tp_group
        self.clip_grad = float(_opt(args, "clip_grad", 1.0))
        decay, no_decay = [], []
        for param in ddp_model.parameters():
            if param.requires_grad:
                (no_decay if param.ndim == 1 else decay).append(param)
        self.params = decay + no_decay
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": float(_opt(args, "weight_decay", 0.0))},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=lr, betas=(float(_opt(args, "adam_beta1", 0.9)), float(_opt(args, "adam_beta2", 0.999))),
            eps=float(_opt(args, "adam_eps", 1e-8)),
        )

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _grad_norm(self) -> float:
        from megatron.core import parallel_state

        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        total = torch.zeros((), dtype=torch.float64)
        for param in self.params:
            # A TP-sharded param holds a different slice on every TP rank; a replicated one is counted once.
            if getattr(param, "tensor_model_parallel", False) or tp_rank == 0:
                total += param.main_grad.double().pow(2).sum()
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            dist.all_reduce(total, group=self.tp_group)
        return math.sqrt(float(total))

    def step(self) -> float:
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads([self.ddp_model])
        norm = self._grad_norm()
        coef = self.clip_grad / (norm + 1e-6)
        for param in self.params:
            grad = param.main_grad
            if self.clip_grad > 0 and coef < 1.0:
                grad = grad * coef
            param.grad = grad.to(param.dtype)
        self.optimizer.step()
        for param in self.params:
            param.grad = None
        return norm

    def zero_grad(self) -> None:
        self.ddp_model.zero_grad_buffer()
        self.optimizer.zero_grad(set_to_none=True)

    def torch_optimizers(self) -> list:
        """The one AdamW, over the model's own fp32 params."""
        return [self.optimizer]

    def reload_model_params(self) -> None:
        """Params are stepped in place here; nothing is cached."""

    def save(self, directory: str, rank: int) -> None:
        torch.save(self.optimizer.state_dict(), optimizer_file(directory, rank))

    def load(self, directory: str, rank: int) -> None:
        self.optimizer.load_state_dict(torch.load(optimizer_file(directory, rank),
                                                  map_location="cpu", weights_only=False))


def build_optimizer(ddp_model, args, *, device: torch.device, lr: float, tp_group=None):
    if device.type == "cuda":
        use_distributed = getattr(args, "use_distributed_optimizer", None)
        return MegatronCoreOptimizer(ddp_model, args, lr=lr,
                                     use_distributed_optimizer=True if use_distributed is None else bool(use_distributed))
    return TorchAdamWOptimizer(ddp_model, args, lr=lr, tp_group=tp_group)

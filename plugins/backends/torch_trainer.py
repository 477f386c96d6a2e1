"""The embedded train backend ``torch``: an HF ``AutoModelForCausalLM`` trained with AdamW.

Runs inside the train actor (one process, CPU or one GPU). Per rollout: recompute old log-probs (or
reuse the current ones when there is one optimizer step and no KL, as slime does), reference
log-probs when a KL needs them, advantages from the estimator, then ``--num-steps-per-rollout``
optimizer steps over micro-batches. A micro-batch is one packed row: samples concatenated with
positions restarting per sample and a block-diagonal causal mask, so no token attends across samples.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch

from plugrl.core import losses
from plugrl.core.packing import plan_micro_batches, split_into_steps

logger = logging.getLogger(__name__)


def _opt(args, key, default):
    value = getattr(args, key, None)
    return default if value is None else value


def resolve_device(requested: str | None) -> torch.device:
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def lr_lambda_factory(args, total_steps: int):
    """LR multiplier per optimizer step: linear warmup, then constant / linear / cosine to ``--min-lr``."""
    base = float(args.lr)
    min_ratio = (float(_opt(args, "min_lr", 0.0)) / base) if base > 0 else 0.0
    warmup = int(_opt(args, "lr_warmup_iters", 0) or 0)
    if getattr(args, "lr_warmup_fraction", None):
        warmup = int(args.lr_warmup_fraction * total_steps)
    decay_steps = int(_opt(args, "lr_decay_iters", 0) or total_steps) or 1
    style = _opt(args, "lr_decay_style", "constant")

    def multiplier(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if style == "constant":
            return 1.0
        progress = min(1.0, max(0.0, (step - warmup) / max(1, decay_steps - warmup)))
        if style == "linear":
            return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
        if style == "cosine":
            return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"--lr-decay-style must be constant, linear or cosine, got '{style}'")

    return multiplier


def packed_inputs(token_lists: list[list[int]], device) -> dict:
    """One row holding every sequence: positions restart per sequence and the causal mask is
    block-diagonal, so the logits equal those of each sequence run alone."""
    lengths = [len(t) for t in token_lists]
    ids = torch.tensor([tok for t in token_lists for tok in t], dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    total = ids.numel()
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril_()
    mask = causal & (segment[:, None] == segment[None, :])
    return {"input_ids": ids[None], "position_ids": positions[None], "attention_mask": mask[None, None]}


def response_slices(token_lists: list[list[int]], response_lengths: list[int]) -> list[tuple[int, int]]:
    """For each packed sequence, the [start, end) range of logits that predict its response tokens
    (the logit at position p predicts token p + 1)."""
    slices, offset = [], 0
    for tokens, resp in zip(token_lists, response_lengths):
        end = offset + len(tokens) - 1
        slices.append((end - resp, end))
        offset += len(tokens)
    return slices


class TorchTrainBackend:
    """HF model + AdamW; ``train(rollout_id, data)`` runs all optimizer steps of one rollout."""

    def __init__(self, args: Any, *, estimator=None, total_optimizer_steps: int | None = None):
        from transformers import AutoModelForCausalLM

        self.args = args
        self.device = resolve_device(getattr(args, "device", None))
        torch.manual_seed(int(_opt(args, "seed", 1234)))
        use_bf16 = bool(getattr(args, "bf16", None)) or (getattr(args, "bf16", None) is None and self.device.type == "cuda")
        self.dtype = torch.bfloat16 if use_bf16 else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(args.hf_checkpoint, dtype=self.dtype).to(self.device)
        if getattr(args, "gradient_checkpointing", False):
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.config.use_cache = False
        self.estimator = estimator
        self.ref_model = None
        if self._needs_ref():
            ref_path = getattr(args, "ref_load", None) or args.hf_checkpoint
            self.ref_model = AutoModelForCausalLM.from_pretrained(ref_path, dtype=self.dtype).to(self.device).eval()
            self.ref_model.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=float(args.lr), weight_decay=float(_opt(args, "weight_decay", 0.0)),
            betas=(float(_opt(args, "adam_beta1", 0.9)), float(_opt(args, "adam_beta2", 0.999))),
            eps=float(_opt(args, "adam_eps", 1e-8)),
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
        inputs = packed_inputs(token_lists, self.device)
        logits = model(**inputs).logits[0]
        temperature = float(_opt(self.args, "rollout_temperature", 1.0))
        spans = response_slices(token_lists, response_lengths)
        index = torch.cat([torch.arange(s, e, device=self.device) for s, e in spans])
        targets = inputs["input_ids"][0][index + 1]
        selected = logits[index]
        log_probs = losses.log_probs_from_logits(selected, targets, temperature)
        entropy = losses.entropy_from_logits(selected, temperature) if with_entropy else None
        return log_probs, entropy

    @torch.no_grad()
    def _log_probs_all(self, model, token_lists, response_lengths, micro_batches) -> list[torch.Tensor]:
        """Per-sample response log-probs, computed micro-batch by micro-batch (no grad)."""
        model.eval()
        out: list[torch.Tensor | None] = [None] * len(token_lists)
        for mb in micro_batches:
            lp, _ = self._forward_response(model, [token_lists[i] for i in mb],
                                           [response_lengths[i] for i in mb], with_entropy=False)
            for i, chunk in zip(mb, lp.split([response_lengths[i] for i in mb])):
                out[i] = chunk.float()
        return out  # type: ignore[return-value]

    def _micro_batches(self, positions: list[int], lengths: list[int]) -> list[list[int]]:
        plan = plan_micro_batches(
            [lengths[p] for p in positions], micro_batch_size=int(_opt(self.args, "micro_batch_size", 1)),
            use_dynamic_batch_size=bool(getattr(self.args, "use_dynamic_batch_size", False)),
            max_tokens_per_gpu=getattr(self.args, "max_tokens_per_gpu", None), dp_size=1,
            balance_data=False,
        )
        return [[positions[i] for i in mb] for mb in plan[0]]

    # ---- training ------------------------------------------------------------------------------
    def train(self, rollout_id: int, data: dict) -> dict:
        from plugrl.core.protocols import AdvantageInputs
        from plugrl.plugins.estimators.returns import whiten_advantages

        args = self.args
        tokens = data["tokens"]
        response_lengths = data["response_lengths"]
        lengths = [len(t) for t in tokens]
        n = len(tokens)
        loss_masks = [torch.tensor(m, dtype=torch.float32, device=self.device) for m in data["loss_masks"]]
        all_mbs = self._micro_batches(list(range(n)), lengths)
        global_batch = int(_opt(args, "global_batch_size", n))
        steps = split_into_steps(data["rollout_ids"], global_batch)
        step_positions = steps.steps if hasattr(steps, "steps") else steps
        kl_coef = float(_opt(args, "kl_coef", 0.0))
        use_tis = bool(getattr(args, "use_tis", False))
        reuse_current = len(step_positions) == 1 and kl_coef == 0.0 and not use_tis
        old_log_probs = None
        if getattr(args, "use_rollout_logprobs", False):
            old_log_probs = [torch.tensor(x, dtype=torch.float32, device=self.device) for x in data["rollout_log_probs"]]
        elif not reuse_current:
            old_log_probs = self._log_probs_all(self.model, tokens, response_lengths, all_mbs)
        ref_log_probs = None
        if self.ref_model is not None:
            ref_log_probs = self._log_probs_all(self.ref_model, tokens, response_lengths, all_mbs)
        kl = None
        if kl_coef != 0.0 and ref_log_probs is not None and old_log_probs is not None:
            kl = [losses.approx_kl(o, r, _opt(args, "kl_loss_type", "k1")) for o, r in zip(old_log_probs, ref_log_probs)]
        advantages, _returns = self.estimator.compute(AdvantageInputs(
            rewards=data["rewards"], raw_rewards=data.get("raw_reward"), loss_masks=loss_masks,
            response_lengths=response_lengths, kl=kl,
        ))
        advantages = [a.to(self.device).float() for a in advantages]
        if getattr(args, "normalize_advantages", False):
            advantages = whiten_advantages(advantages, loss_masks)
        rollout_lp = [torch.tensor(x, dtype=torch.float32, device=self.device) for x in data["rollout_log_probs"]]
        per_token = bool(getattr(args, "calculate_per_token_loss", False))
        sequence_level = bool(getattr(self.estimator, "sequence_level_ratio", False))
        totals: dict[str, float] = {}
        self.model.train()
        planned = [self._micro_batches(list(positions), lengths) for positions in step_positions]
        self.progress = (0, sum(len(p) for p in planned))
        for positions, micro_batches in zip(step_positions, planned):
            step_rollouts = len({data["rollout_ids"][p] for p in positions})
            step_tokens = sum(float(loss_masks[p].sum()) for p in positions)
            self.optimizer.zero_grad(set_to_none=True)
            step_metrics: dict[str, float] = {}
            for mb in micro_batches:
                mb_tokens = [tokens[i] for i in mb]
                mb_resp = [response_lengths[i] for i in mb]
                log_probs, entropy = self._forward_response(self.model, mb_tokens, mb_resp, with_entropy=True)

                def cat(values):
                    return None if values is None else torch.cat([values[i] for i in mb])

                loss, metrics = losses.compute_rl_loss(
                    log_probs, loss_masks=[loss_masks[i] for i in mb], response_lengths=mb_resp, config=args,
                    mask_sums=[data["rollout_mask_sums"][i] for i in mb], old_log_probs=cat(old_log_probs),
                    advantages=cat(advantages), entropy=entropy, ref_log_probs=cat(ref_log_probs),
                    rollout_log_probs=cat(rollout_lp), sequence_level_ratio=sequence_level,
                )
                # The step objective is (1/G) sum over rollouts of their token mean (or the token mean
                # of the whole step), whatever the micro-batch split.
                scale = 1.0 / max(1.0, step_tokens) if per_token else 1.0 / step_rollouts
                (loss * scale).backward()
                for key, value in metrics.items():
                    step_metrics[key] = step_metrics.get(key, 0.0) + value * scale
                self.progress = (self.progress[0] + 1, self.progress[1])
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(_opt(args, "clip_grad", 1.0)))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer_steps += 1
            step_metrics["grad_norm"] = float(grad_norm)
            step_metrics["lr"] = self.scheduler.get_last_lr()[0]
            for key, value in step_metrics.items():
                totals[key] = totals.get(key, 0.0) + value / len(step_positions)
        return {f"train/{k}": v for k, v in totals.items()}

    # ---- weights and checkpoints ----------------------------------------------------------------
    def export_weights(self, bucket_bytes: int | None = None) -> list[dict[str, torch.Tensor]]:
        """HF-named CPU tensors in buckets of at most ``bucket_bytes`` (one bucket if None)."""
        buckets, current, size = [], {}, 0
        for name, tensor in self.model.state_dict().items():
            t = tensor.detach().to("cpu", copy=True)
            nbytes = t.numel() * t.element_size()
            if bucket_bytes and current and size + nbytes > bucket_bytes:
                buckets.append(current)
                current, size = {}, 0
            current[name] = t
            size += nbytes
        if current:
            buckets.append(current)
        return buckets

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "optimizer_steps": self.optimizer_steps,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.optimizer_steps = state["optimizer_steps"]
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def save(self, path: str) -> None:
        torch.save(self.state_dict(), os.path.join(path, "train_state.pt"))

    def load(self, path: str) -> None:
        self.load_state_dict(torch.load(os.path.join(path, "train_state.pt"), map_location=self.device, weights_only=False))

    def save_hf(self, path: str) -> None:
        from transformers import AutoTokenizer

        self.model.save_pretrained(path)
        AutoTokenizer.from_pretrained(self.args.hf_checkpoint).save_pretrained(path)

    def offload(self) -> None:
        """Colocated on a GPU: free GPU memory while the engine generates."""
        if self.device.type == "cuda":
            self.model.to("cpu")
            for state in self.optimizer.state.values():
                for k, v in state.items():
                    if torch.is_tensor(v):
                        state[k] = v.to("cpu")
            torch.cuda.empty_cache()

    def onload(self) -> None:
        if self.device.type == "cuda":
            self.model.to(self.device)
            for state in self.optimizer.state.values():
                for k, v in state.items():
                    if torch.is_tensor(v):
                        state[k] = v.to(self.device)

    # ---- supervised warm-up -----------------------------------------------------------------------
    def sft_warmup(self, batches, *, lr: float, prompt_loss_weight: float = 0.0) -> list[float]:
        """Supervised steps before RL (``--loss-type sft_loss`` semantics: per-sample mean of −log p
        over response tokens). ``prompt_loss_weight`` > 0 also trains on prompt tokens as plain
        language modelling. Uses its own AdamW so the RL optimizer starts fresh."""
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0)
        self.model.train()
        history = []
        for token_lists, response_lengths in batches:
            optimizer.zero_grad(set_to_none=True)
            inputs = packed_inputs(token_lists, self.device)
            logits = self.model(**inputs).logits[0]
            loss = torch.zeros((), device=self.device)
            offset = 0
            for tokens, response_length in zip(token_lists, response_lengths):
                n = len(tokens)
                weights = torch.full((n - 1,), float(prompt_loss_weight), device=self.device)
                weights[n - 1 - response_length:] = 1.0
                targets = inputs["input_ids"][0][offset + 1:offset + n]
                lp = losses.log_probs_from_logits(logits[offset:offset + n - 1], targets)
                loss = loss - (lp * weights).sum() / weights.sum().clamp(min=1.0)
                offset += n
            loss = loss / len(token_lists)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(_opt(self.args, "clip_grad", 1.0)))
            optimizer.step()
            history.append(float(loss.detach()))
        return history

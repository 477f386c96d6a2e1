"""Requests and the left-padded decode batch of the embedded ``hf`` rollout engine.

Used only by the engine's decode thread (inside the rollout manager actor). A batch keeps one HF
``DynamicCache`` for all its rows, left-padded to a common length, an attention mask that hides the
padding, and explicit position ids that count only real tokens, so every row computes exactly what an
unpadded forward would. Rows leave the batch as soon as they finish (``keep``) and new rows join
between decode steps (``merge``), which is what makes the batching continuous.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from .sampling import SamplingParams


@dataclass
class StopContext:
    """What every finish check needs: the tokenizer (stop strings, text) and the EOS ids of the
    tokenizer, config and generation config."""

    tokenizer: Any
    eos_ids: frozenset[int]


@dataclass(eq=False)
class Request:
    """One ``generate`` call: inputs, outputs so far, and where to deliver the result."""

    seq: int
    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int  # params.max_new_tokens clipped to the context length
    deliver: Any  # callable(result: dict | BaseException), called once from the decode thread
    tokens: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    finish: dict | None = None
    cancelled: bool = False
    running: bool = False  # admitted to the decode batch and not answered yet

    def banned_tokens(self, ctx: StopContext) -> list[int]:
        """min_new_tokens: EOS and stop ids cannot be sampled yet (SGLang's MinNewTokensPenalizer)."""
        if len(self.tokens) >= self.params.min_new_tokens:
            return []
        return sorted(ctx.eos_ids | self.params.stop_token_ids)

    def observe(self, token: int, log_prob: float, ctx: StopContext) -> bool:
        """Append one sampled token; True when the request is finished. Order as in SGLang's
        ``Req.check_finished``: length first, then stop/EOS token ids (off with ``ignore_eos``),
        then stop strings. The token that triggers a stop is kept (``tokens`` always hold every
        generated token, like SGLang's ``output_token_logprobs``)."""
        self.tokens.append(token)
        self.log_probs.append(log_prob)
        p = self.params
        if len(self.tokens) >= self.max_new_tokens:
            self.finish = {"type": "length", "matched": None, "length": self.max_new_tokens}
        elif not p.ignore_eos and (token in p.stop_token_ids or token in ctx.eos_ids):
            self.finish = {"type": "stop", "matched": token}
        elif p.stop:
            # A new match must end in the newest token, and it spans at most len(utf-8 bytes) tokens
            # (every token decodes to at least one byte), so decoding that tail is enough.
            window = max(len(s.encode("utf-8")) for s in p.stop) + 1
            tail = ctx.tokenizer.decode(self.tokens[-window:], skip_special_tokens=False)
            matched = next((s for s in p.stop if s in tail), None)
            if matched is not None:
                self.finish = {"type": "stop", "matched": matched}
        return self.finish is not None

    def abort(self, message: str) -> None:
        self.finish = {"type": "abort", "matched": None, "message": message}

    def result(self, ctx: StopContext, weight_version: str) -> dict:
        """The /generate answer. ``text`` follows SGLang's detokenizer: unless ``no_stop_trim``, a
        matched stop token is left out of the text and the text is cut before a matched stop string."""
        p, matched = self.params, (self.finish or {}).get("matched")
        text_tokens = self.tokens
        if not p.no_stop_trim and isinstance(matched, int) and self.finish["type"] == "stop":
            text_tokens = self.tokens[:-1]
        text = ctx.tokenizer.decode(text_tokens, skip_special_tokens=p.skip_special_tokens)
        if not p.no_stop_trim and isinstance(matched, str) and matched in text:
            text = text[: text.index(matched)]
        return {
            "tokens": list(self.tokens),
            "log_probs": list(self.log_probs),
            "text": text,
            "finish_reason": dict(self.finish or {"type": "abort", "matched": None}),
            "prompt_tokens": len(self.prompt),
            "completion_tokens": len(self.tokens),
            "cached_tokens": 0,
            "weight_version": weight_version,
        }


def cache_kwarg(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); use whichever forward takes."""
    return _cache_kwarg(type(model))


@functools.lru_cache(maxsize=None)
def _cache_kwarg(model_class) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _layers_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def _new_cache(kv=None):
    from transformers import DynamicCache

    # The positional argument builds a cache from per-layer (keys, values); plain DynamicLayers
    # (no config) so that rows can be padded, selected and concatenated freely.
    return DynamicCache(kv) if kv is not None else DynamicCache()


def _left_pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class DecodeBatch:
    """Rows being decoded. Invariant between steps: the cache holds prompt + all generated tokens
    but the newest (``next_tokens``, to be fed at ``next_pos``); ``mask`` covers the cache columns."""

    def __init__(self, requests, cache, mask, next_pos, next_tokens=None):
        self.requests: list[Request] = requests
        self.cache = cache
        self.mask = mask  # [B, L] long, 0 on left padding
        self.next_pos = next_pos  # [B] long
        self.next_tokens = next_tokens  # [B] long
        self.sampling = None  # hf_sampling.RowSampling of these rows, built by the decode loop

    def __len__(self) -> int:
        return len(self.requests)

    @classmethod
    def prefill(cls, model, requests: list[Request], device) -> tuple["DecodeBatch", torch.Tensor]:
        """Run the prompts (left-padded) through the model; returns the batch and the next-token
        logits ``[B, V]`` of each row."""
        width = max(len(r.prompt) for r in requests)
        ids = torch.zeros((len(requests), width), dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, width - len(r.prompt):] = torch.tensor(r.prompt, dtype=torch.long)
            mask[i, width - len(r.prompt):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = _new_cache()
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **{cache_kwarg(model): cache})
        next_pos = torch.tensor([len(r.prompt) for r in requests], dtype=torch.long, device=device)
        return cls(requests, cache, mask, next_pos), out.logits[:, -1]

    def decode(self, model) -> torch.Tensor:
        """Feed ``next_tokens``; returns the logits ``[B, V]`` for the following token."""
        mask = torch.cat([self.mask, self.mask.new_ones((len(self), 1))], dim=1)
        out = model(input_ids=self.next_tokens.unsqueeze(1), attention_mask=mask,
                    position_ids=self.next_pos.unsqueeze(1), use_cache=True,
                    **{cache_kwarg(model): self.cache})
        self.mask = mask
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1]

    def advance(self, tokens: torch.Tensor) -> None:
        self.next_tokens = tokens

    def keep(self, indices: list[int]) -> None:
        """Drop every row not in ``indices``, then cut columns that are padding for all rows left."""
        if len(indices) == len(self):
            return
        self.sampling = None
        self.requests = [self.requests[i] for i in indices]
        if not indices:
            self.cache = None
            return
        idx = torch.tensor(indices, dtype=torch.long, device=self.mask.device)
        mask = self.mask[idx]
        first = int(mask.any(dim=0).to(torch.int8).argmax())  # first column some row still uses
        self.cache = _new_cache([(k[idx, :, first:], v[idx, :, first:]) for k, v in _layers_kv(self.cache)])
        self.mask = mask[:, first:]
        self.next_pos = self.next_pos[idx]
        self.next_tokens = self.next_tokens[idx]

    def merge(self, other: "DecodeBatch") -> None:
        """Append ``other``'s rows; the shorter cache is left-padded (masked) to the longer one."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        pad_a, pad_b = width - self.mask.shape[1], width - other.mask.shape[1]
        kv = [
            (torch.cat([_left_pad(ka, pad_a, 2), _left_pad(kb, pad_b, 2)]),
             torch.cat([_left_pad(va, pad_a, 2), _left_pad(vb, pad_b, 2)]))
            for (ka, va), (kb, vb) in zip(_layers_kv(self.cache), _layers_kv(other.cache))
        ]
        self.cache = _new_cache(kv)
        self.mask = torch.cat([_left_pad(self.mask, pad_a, 1), _left_pad(other.mask, pad_b, 1)])
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.next_tokens = torch.cat([self.next_tokens, other.next_tokens])
        self.requests = self.requests + other.requests
        self.sampling = None

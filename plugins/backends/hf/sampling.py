"""Sampling for the embedded ``hf`` rollout engine: SGLang's sampling-parameter semantics and a
per-row sampler. Runs inside the engine's decode thread (rollout manager actor, CPU or one GPU).

What the returned log-probs mean (the GRPO rollout log-probs):
    ``log_softmax(logits.float() / T)[token]`` with ``T`` the request's temperature (``T = 1`` for
    greedy requests), *before* top-p / top-k / min-p truncation and without renormalising over the
    nucleus. This is what SGLang's ``output_token_logprobs`` holds by default (its sampler takes
    ``log(softmax(logits / T))`` before ``top_k_top_p`` sampling, and greedy requests are turned into
    ``T = 1, top_k = 1``), and what slime's trainer recomputes (logits divided by
    ``--rollout-temperature`` before log-softmax). ``min_new_tokens`` masks EOS / stop tokens in the
    logits first (SGLang's penalizer runs before its sampler), so those log-probs see the mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

_SAMPLING_EPS = 1e-6  # SGLang: temperature below this means greedy

# SGLang /generate sampling fields the engine accepts but that only matter for features it does not
# have; a request is refused only when it asks for a non-default value (see _UNSUPPORTED_DEFAULTS).
_IGNORED_KEYS = {"spaces_between_special_tokens", "custom_params", "stream_interval"}
_UNSUPPORTED_DEFAULTS = {
    "n": 1, "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
    "json_schema": None, "regex": None, "ebnf": None, "structural_tag": None, "stop_regex": None,
    "logit_bias": None,
}


@dataclass(frozen=True)
class SamplingParams:
    """One request's SGLang sampling parameters, validated; defaults are SGLang's."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    no_stop_trim: bool = False
    skip_special_tokens: bool = True
    min_new_tokens: int = 0
    sampling_seed: int | None = None

    @classmethod
    def from_dict(cls, params: dict[str, Any] | None) -> "SamplingParams":
        """Parse a /generate ``sampling_params`` dict; ``None`` values mean "default" (as in SGLang)."""
        params = {k: v for k, v in (params or {}).items() if v is not None}
        for key, default in _UNSUPPORTED_DEFAULTS.items():
            if key in params and params.pop(key) != default:
                raise ValueError(f"sampling param {key!r} is not supported by the hf engine (use sglang)")
        for key in _IGNORED_KEYS:
            params.pop(key, None)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown sampling params {unknown}; known: {sorted(known)}")
        if "max_new_tokens" not in params:
            raise ValueError("sampling_params needs 'max_new_tokens'")
        stop = params.get("stop", ())
        params["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        params["stop_token_ids"] = frozenset(int(t) for t in params.get("stop_token_ids", ()))
        for key in ("max_new_tokens", "top_k", "min_new_tokens"):
            if key in params:
                params[key] = int(params[key])
        for key in ("temperature", "top_p", "min_p"):
            if key in params:
                params[key] = float(params[key])
        out = cls(**params)
        out._validate()
        return out

    def _validate(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a non-negative finite number, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"top_k must be -1 (off) or at least 1, got {self.top_k}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS or self.top_k == 1

    @property
    def effective_temperature(self) -> float:
        """SGLang turns temperature 0 into ``T = 1, top_k = 1``; log-probs use this ``T``."""
        return 1.0 if self.temperature < _SAMPLING_EPS else self.temperature


def _seeded_generator(device: torch.device, seed: int, step: int) -> torch.Generator:
    # One stream per (request seed, output position): the draw for token t of a seeded request does
    # not depend on which other requests share its batch.
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    return gen


def _truncate(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero the probabilities outside each row's top-k / top-p nucleus / min-p floor (SGLang's rules:
    a token stays in the nucleus while the mass *before* it is <= top_p)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    rank = torch.arange(probs.shape[-1], device=probs.device).unsqueeze(0)
    drop = (mass_before > top_p.unsqueeze(1)) | (rank >= top_k.unsqueeze(1))
    drop |= sorted_probs < (sorted_probs[:, :1] * min_p.unsqueeze(1))
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


class RowSampling:
    """The per-row sampling tensors of one batch composition. Building them copies host lists to
    the device, which synchronises a GPU, so the decode loop rebuilds them only when rows join or
    leave, not every step."""

    def __init__(self, params: Sequence[SamplingParams], device: torch.device, vocab: int):
        self.params = list(params)
        self.vocab = vocab
        self.temps = torch.tensor([p.effective_temperature for p in params], device=device).unsqueeze(1)
        greedy = [p.greedy for p in params]
        self.all_greedy = all(greedy)
        self.greedy = torch.tensor(greedy, device=device) if any(greedy) and not self.all_greedy else None
        self.truncation = None
        if any(p.top_k not in (-1, 1) or p.top_p < 1.0 or p.min_p > 0.0 for p in params):
            self.truncation = (
                torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device),
                torch.tensor([p.top_p for p in params], device=device),
                torch.tensor([p.min_p for p in params], device=device),
            )
        self.seeded = [i for i, p in enumerate(params) if p.sampling_seed is not None]

    def sample(self, logits: torch.Tensor, steps: Sequence[int], generator: torch.Generator | None,
               banned: Sequence[Sequence[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row of ``logits`` ``[B, V]`` -> ``(tokens[B], log_probs[B])``.

        ``steps[i]``: tokens row i has generated (keys per-request seeds); ``banned[i]``: ids masked
        to -inf first (``min_new_tokens``). Sampling is an exponential race (``argmax(p / E)``,
        ``E ~ Exp(1)``): an exact draw from ``p`` in which every row can have its own random stream.
        """
        logits = logits.float()
        if banned is not None and any(banned):
            logits = logits.clone()
            for i, ids in enumerate(banned):
                if ids:
                    logits[i, list(ids)] = float("-inf")
        log_probs = torch.log_softmax(logits / self.temps, dim=-1)
        greedy_tokens = logits.argmax(dim=-1)
        if self.all_greedy:
            tokens = greedy_tokens
        else:
            probs = log_probs.exp()
            if self.truncation is not None:
                probs = _truncate(probs, *self.truncation)
            noise = torch.empty_like(probs).exponential_(generator=generator)
            for i in self.seeded:
                noise[i].exponential_(generator=_seeded_generator(probs.device, self.params[i].sampling_seed, steps[i]))
            # Exp(1) draws can be exactly 0 (u = 0 in -log(1 - u)); 0/0 would be NaN and win the argmax.
            tokens = (probs / noise.clamp_(min=1e-30)).argmax(dim=-1)
            if self.greedy is not None:
                tokens = torch.where(self.greedy, greedy_tokens, tokens)
        return tokens, log_probs.gather(1, tokens.unsqueeze(1)).squeeze(1)


def sample_tokens(logits: torch.Tensor, params: Sequence[SamplingParams], steps: Sequence[int],
                  generator: torch.Generator | None, banned: Sequence[Sequence[int]] | None = None):
    """One-off ``RowSampling(params).sample(...)``."""
    return RowSampling(params, logits.device, logits.shape[-1]).sample(logits, steps, generator, banned)

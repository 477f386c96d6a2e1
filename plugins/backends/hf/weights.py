"""Loading pushed weights into the embedded ``hf`` engine's model (rollout manager actor).

The trainer exports HF parameter names (``model.layers.0.self_attn.q_proj.weight``, ...) in buckets;
this module accepts every shape of that payload, checks *all* names and shapes before touching the
model (a bad push leaves the old weights intact), and copies in place, converting dtype/device.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, Iterable

import torch


def flatten_named_tensors(named_tensors: Any) -> list[tuple[str, torch.Tensor]]:
    """A dict, an iterable of ``(name, tensor)``, or an iterable of buckets (each a dict or a list of
    pairs) -> one list of pairs, in order."""
    if isinstance(named_tensors, Mapping):
        return list(named_tensors.items())
    pairs: list[tuple[str, torch.Tensor]] = []
    for item in named_tensors:
        if isinstance(item, Mapping):
            pairs.extend(item.items())
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            pairs.append(item)
        elif isinstance(item, Iterable) and not isinstance(item, (str, bytes, torch.Tensor)):
            for pair in item:
                if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
                    raise TypeError(f"update_weights: a bucket must hold (name, tensor) pairs, got {type(pair).__name__}")
                pairs.append(pair)
        else:
            raise TypeError(f"update_weights: expected a dict, (name, tensor) pairs or buckets, got {type(item).__name__}")
    return pairs


def load_named_tensors(model: torch.nn.Module, named_tensors: Any) -> int:
    """Copy the tensors into ``model`` (strict names and shapes); returns how many were copied.

    Tied embeddings: ``model.state_dict()`` lists ``lm_head.weight`` and ``model.embed_tokens.weight``
    as one storage, so either name (or both, if equal) updates both.
    """
    pairs = flatten_named_tensors(named_tensors)
    targets = model.state_dict()
    by_storage: dict[int, tuple[str, torch.Tensor]] = {}
    for name, tensor in pairs:
        if name not in targets:
            close = difflib.get_close_matches(name, list(targets), n=3)
            hint = f"; close matches: {close}" if close else f"; the model has e.g. {sorted(targets)[:3]}"
            raise ValueError(f"update_weights: unknown parameter {name!r}{hint}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"update_weights: {name!r} is a {type(tensor).__name__}, not a tensor")
        target = targets[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(
                f"update_weights: shape mismatch for {name!r}: got {tuple(tensor.shape)}, model has {tuple(target.shape)}"
            )
        seen = by_storage.get(target.data_ptr())
        if seen is not None and seen[0] != name and not torch.equal(seen[1].to(tensor.device), tensor):
            raise ValueError(f"update_weights: {seen[0]!r} and {name!r} are tied in the model but differ")
        by_storage[target.data_ptr()] = (name, tensor)
    with torch.no_grad():
        for name, tensor in pairs:
            targets[name].copy_(tensor)
    return len(pairs)

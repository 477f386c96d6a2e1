"""Loading pushed weights into the embedded ``hf`` engine's model (rollout manager actor).

The trainer exports HF parameter names (``model.layers.0.self_attn.q_proj.weight``, ...) in buckets;
this module accepts every shape of that payload, checks *all* names and shapes before touching the
model (a bad push leaves the old weights intact), and copies in place, converting dtype/device.

A streamed push (``plugrl.core.weight_stream``: CUDA IPC handles from the trainer on this GPU, or a
broadcast) arrives as an object with ``is_weight_stream``: its manifest (names, dtypes, shapes) is
checked against the model first, then its buckets are copied in one at a time, each a set of views
of a flat buffer that is gone once the next bucket is taken.
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


def _check(targets: Mapping[str, torch.Tensor], name: str, shape) -> None:
    if name not in targets:
        close = difflib.get_close_matches(name, list(targets), n=3)
        hint = f"; close matches: {close}" if close else f"; the model has e.g. {sorted(targets)[:3]}"
        raise ValueError(f"update_weights: unknown parameter {name!r}{hint}")
    if tuple(shape) != tuple(targets[name].shape):
        raise ValueError(
            f"update_weights: shape mismatch for {name!r}: got {tuple(shape)}, model has {tuple(targets[name].shape)}"
        )


def load_weight_stream(model: torch.nn.Module, stream: Any, written_storages: set | None = None) -> int:
    """Load a streamed push (see the module docstring); returns how many tensors were copied.

    Every name and shape is checked before the first copy (a refused stream tells its sender, so
    nothing is sent). Tied names (one storage) may both come: the second must equal what the first
    wrote, or the push fails naming both (the model then holds part of the new weights)."""
    targets = model.state_dict()
    try:
        for name, _dtype, shape in stream.entries():
            _check(targets, name, shape)
    except ValueError as exc:
        stream.refuse(str(exc))
        raise
    written: dict[int, str] = {}
    count = 0
    with torch.no_grad():
        for bucket in stream:
            for name, tensor in bucket.items():
                target = targets[name]
                first = written.get(target.data_ptr())
                if first is not None and first != name:
                    if not torch.equal(target, tensor.to(target.device, target.dtype)):
                        raise ValueError(f"update_weights: {first!r} and {name!r} are tied in the model but differ")
                    continue
                target.copy_(tensor)
                written[target.data_ptr()] = name
                if written_storages is not None:
                    written_storages.add(target.untyped_storage()._cdata)
                count += 1
    return count


def load_named_tensors(model: torch.nn.Module, named_tensors: Any, written_storages: set | None = None) -> int:
    """Copy the tensors into ``model`` (strict names and shapes); returns how many were copied.
    ``written_storages``: a set that receives the storage of every tensor written (``missing_parameters``).

    Tied embeddings: ``model.state_dict()`` lists ``lm_head.weight`` and ``model.embed_tokens.weight``
    as one storage, so either name (or both, if equal) updates both.
    """
    if getattr(named_tensors, "is_weight_stream", False):
        return load_weight_stream(model, named_tensors, written_storages)
    pairs = flatten_named_tensors(named_tensors)
    targets = model.state_dict()
    by_storage: dict[int, tuple[str, torch.Tensor]] = {}
    for name, tensor in pairs:
        if name in targets and not isinstance(tensor, torch.Tensor):
            raise TypeError(f"update_weights: {name!r} is a {type(tensor).__name__}, not a tensor")
        _check(targets, name, getattr(tensor, "shape", ()))
        target = targets[name]
        seen = by_storage.get(target.data_ptr())
        if seen is not None and seen[0] != name and not torch.equal(seen[1].to(tensor.device), tensor):
            raise ValueError(f"update_weights: {seen[0]!r} and {name!r} are tied in the model but differ")
        by_storage[target.data_ptr()] = (name, tensor)
    with torch.no_grad():
        for name, tensor in pairs:
            targets[name].copy_(tensor)
            if written_storages is not None:
                written_storages.add(targets[name].untyped_storage()._cdata)
    return len(pairs)


def missing_parameters(model: torch.nn.Module, written_storages: set) -> list[str]:
    """Parameters whose storage no push wrote (a tied parameter counts as written through its twin)."""
    return [name for name, param in model.named_parameters(remove_duplicate=False)
            if param.untyped_storage()._cdata not in written_storages]

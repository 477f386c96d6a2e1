"""Conformance checks and pytest fixtures for plugin authors.

Call a check from one test of your plugin package; it runs the plugin on tiny fake inputs and raises
``AssertionError`` naming the plugin and the broken rule::

    from plugrl.core.testing import check_reward
    def test_conformance():
        check_reward("my_reward")          # a registered name (entry points are loaded) or the function

Fixtures (opt in, so that plain pytest runs never import plugrl): put
``pytest_plugins = ["plugrl.core.testing"]`` in your ``conftest.py`` to get ``plugin_set`` (a fresh
plugin manager without entry points) and ``make_samples`` (a factory of fake samples).
pytest is imported only if installed; the checks work without it.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
import math
import numbers
import sys
import types
from typing import Any, Callable, Sequence

from .protocols import AdvantageInputs, BufferPolicy, PlacementPlan, PlacementRequest
from .types import FilterDecision, Sample, Status

# ---------------------------------------------------------------------------------------------------
# Fake inputs
# ---------------------------------------------------------------------------------------------------

DEFAULT_RESPONSES = (
    "6 * 7 = 42. The answer is \\boxed{42}.",
    "<think>6 * 7 is 42</think> The answer is \\boxed{42}",
    "I think it is 41. \\boxed{41}",
    "",
    "Answer: 42",
)


def fake_sample(response: str = "", *, label: Any = "42", reward: float | dict | None = None, index: int = 0,
                group_index: int = 0, prompt: str = "What is 6 * 7?", response_length: int | None = None,
                status: Status = Status.COMPLETED) -> Sample:
    """A generated sample with consistent tokens, loss mask and log-probs (one token per word)."""
    if response_length is None:
        response_length = max(1, len(response.split()))
    prompt_tokens = [1, 2, 3]
    return Sample(
        group_index=group_index, index=index, prompt=prompt, label=label, response=response,
        tokens=prompt_tokens + [100 + i for i in range(response_length)], response_length=response_length,
        loss_mask=[1] * response_length, rollout_log_probs=[-0.5] * response_length,
        reward=reward, status=status,
    )


def fake_samples(n: int | None = None, *, rewards: Sequence | None = None, responses: Sequence[str] | None = None,
                 label: Any = "42", group_index: int = 0, start_index: int = 0,
                 response_lengths: Sequence[int] | None = None) -> list[Sample]:
    """One group of fake samples; its size is ``n`` or the length of whichever list is given."""
    if n is None:
        n = next((len(x) for x in (rewards, responses, response_lengths) if x is not None), len(DEFAULT_RESPONSES))
    responses = list(responses) if responses is not None else [DEFAULT_RESPONSES[i % len(DEFAULT_RESPONSES)]
                                                               for i in range(n)]
    return [
        fake_sample(responses[i], label=label, reward=rewards[i] if rewards is not None else None,
                    index=start_index + i, group_index=group_index,
                    response_length=response_lengths[i] if response_lengths is not None else None)
        for i in range(n)
    ]


# ---------------------------------------------------------------------------------------------------
# Resolution and small helpers
# ---------------------------------------------------------------------------------------------------


def _resolve(kind: str, obj_or_name: Any) -> tuple[Any, str, dict]:
    """(object, label for messages, registration metadata)."""
    if isinstance(obj_or_name, str):
        from .plugins import make_plugin_manager
        from .registry import PluginError

        plugin_set = make_plugin_manager()
        try:
            entry = plugin_set.entry(kind, obj_or_name)
            obj = entry.load()
        except PluginError as exc:
            raise AssertionError(f"{kind} '{obj_or_name}': {exc}") from exc
        return obj, f"{kind} '{entry.name}' (plugin {entry.plugin})", dict(entry.metadata)
    name = getattr(obj_or_name, "name", None) or getattr(obj_or_name, "__qualname__", None) or repr(obj_or_name)
    return obj_or_name, f"{kind} '{name}'", {}


def _option_kwargs(kind: str, fn: Any, label: str, metadata: dict, options: dict | None,
                   options_type: type | None) -> dict:
    """The keyword arguments core would pass for ``--rm-opt``/``--filter-opt`` pairs ``options``: with a
    declared options dataclass, every field (defaults filled in, types checked); without one, the
    pairs themselves, refused when the function has no such keyword."""
    from .plugin_options import OptionsError, as_kwargs, build_options
    from .registry import Entry

    metadata = {**metadata, **({"options": options_type} if options_type is not None else {})}
    entry = Entry(kind, label, fn, plugin="(under test)", builtin=False, metadata=metadata)
    try:
        return as_kwargs(build_options(entry, None, dict(options or {})))
    except OptionsError as exc:
        raise _fail(label, f"options {options or {}} are refused as core would refuse them: {exc}") from exc
    except TypeError as exc:  # e.g. a declared options field without a default
        raise _fail(label, f"its options type cannot be built from {options or {}}: {exc}") from exc


def _fail(label: str, message: str) -> AssertionError:
    return AssertionError(f"{label}: {message}")


def _call(label: str, fn: Callable, *args, **kwargs) -> Any:
    try:
        result = fn(*args, **kwargs)
        if inspect.isawaitable(result):  # async plugins are awaited by core; do the same here
            result = asyncio.run(_await(result))
    except AssertionError:
        raise
    except Exception as exc:
        raise _fail(label, f"raised {type(exc).__name__}: {exc}") from exc
    return result


async def _await(awaitable):
    return await awaitable


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------------


def _check_reward_value(label: str, value: Any, where: str) -> None:
    if value is None:
        return  # "not applicable": excluded from weighted sums
    if isinstance(value, bool):
        raise _fail(label, f"{where} returned a bool ({value}); return a float")
    if _is_number(value):
        if not math.isfinite(float(value)):
            raise _fail(label, f"{where} returned a non-finite reward {value!r}")
        return
    if isinstance(value, dict):
        if not value or not all(isinstance(k, str) for k in value):
            raise _fail(label, f"{where} returned a dict reward without string keys: {value!r}")
        if not any(_is_number(v) for v in value.values()):
            raise _fail(label, f"{where} returned a dict reward with no numeric value (select one with --reward-key)")
        return
    raise _fail(label, f"{where} returned {type(value).__name__} {value!r}; expected float, dict or None")


def check_reward(fn_or_name: Callable | str, samples: Sequence[Sample] | None = None, batched: bool = False,
                 options: dict | None = None, deterministic: bool = True,
                 options_type: type | None = None) -> list:
    """Run a reward on fake samples the way the rollout manager calls it: per-sample ``fn(sample,
    **kwargs) -> float | dict | None`` or, when batched, ``fn(samples, **kwargs) -> list`` of the same
    length; sync or async. ``kwargs`` are built from ``options`` (``--rm-opt`` pairs) as core builds
    them: with an options dataclass (registered ``options=``, or ``options_type`` for a bare function)
    every field is passed, defaults included, so a reward that cannot take its own options fails here.
    Checks values (finite number, dict with a number, or None), determinism. Returns the rewards."""
    fn, label, metadata = _resolve("reward", fn_or_name)
    batched = bool(metadata.get("batched", batched))
    if not callable(fn):
        raise _fail(label, f"is not callable ({type(fn).__name__})")
    kwargs = _option_kwargs("reward", fn, label, metadata, options, options_type)
    samples = list(samples) if samples is not None else fake_samples()

    def run(batch):
        if batched:
            out = _call(label, fn, batch, **kwargs)
            if not isinstance(out, (list, tuple)):
                raise _fail(label, f"batched reward returned {type(out).__name__}; expected a list")
            if len(out) != len(batch):
                raise _fail(label, f"batched reward returned {len(out)} values for {len(batch)} samples")
            return list(out)
        return [_call(label, fn, sample, **kwargs) for sample in batch]

    rewards = run(copy.deepcopy(samples))
    for i, value in enumerate(rewards):
        _check_reward_value(label, value, f"sample {i} ({samples[i].response[:40]!r})")
    if deterministic:
        again = run(copy.deepcopy(samples))
        if again != rewards:
            raise _fail(label, f"is not deterministic: {rewards} then {again} on the same samples")
    return rewards


# ---------------------------------------------------------------------------------------------------
# Advantage estimators
# ---------------------------------------------------------------------------------------------------


def _default_estimator_args(name: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(advantage_estimator=name, n_samples_per_prompt=4, rollout_batch_size=3)


def check_estimator(cls_or_name: type | str, args: Any = None) -> None:
    """Build the estimator and run ``check_config``, ``shape_rewards`` on ``[3, 4]`` rewards and
    ``compute`` on 4 samples of lengths 3, 1, 4, 2: shapes, finiteness, no input mutation, determinism."""
    import torch

    cls, label, _ = _resolve("advantage_estimator", cls_or_name)
    if not isinstance(cls, type):
        raise _fail(label, f"must be registered as a class, got {type(cls).__name__}")
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name:
        raise _fail(label, "needs a non-empty class attribute `name`")
    for flag in ("needs_critic", "needs_ref_log_probs"):
        if not isinstance(getattr(cls, flag, False), bool):
            raise _fail(label, f"`{flag}` must be a bool")
    given = args is not None
    args = args if given else _default_estimator_args(name)
    if hasattr(cls, "check_config"):
        try:
            cls.check_config(args)
        except Exception as exc:
            hint = "" if given else f"; the default args {vars(args)} are not a valid config for it: pass args="
            raise _fail(label, f"check_config raised {type(exc).__name__}: {exc}{hint}") from exc
    estimator = _call(label + "()", cls, args)

    # Rollout side: [n_groups, n] -> same shape.
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.25, 1.0, 0.0]])
    original = rewards.clone()
    shaped = _call(label + ".shape_rewards", estimator.shape_rewards, rewards)
    if not isinstance(shaped, torch.Tensor):
        raise _fail(label, f"shape_rewards returned {type(shaped).__name__}; expected a tensor")
    if tuple(shaped.shape) != tuple(original.shape):
        raise _fail(label, f"shape_rewards changed the shape {tuple(original.shape)} -> {tuple(shaped.shape)}")
    if not torch.isfinite(shaped).all():
        raise _fail(label, f"shape_rewards produced non-finite values {shaped.tolist()}")
    if not torch.equal(rewards, original):
        raise _fail(label, "shape_rewards modified its input in place")
    if not torch.equal(_call(label + ".shape_rewards", estimator.shape_rewards, original.clone()), shaped):
        raise _fail(label, "shape_rewards is not deterministic")

    # Train side: per-sample tensors of response_lengths[i].
    lengths = [3, 1, 4, 2]
    generator = torch.Generator().manual_seed(0)

    def inputs():
        generator.manual_seed(0)
        masks = [torch.ones(n) for n in lengths]
        masks[2][2] = 0.0  # a non-trainable (environment) token
        return AdvantageInputs(
            rewards=[0.5, -0.5, 1.0, 0.0], raw_rewards=[1.0, 0.0, 1.0, 0.0], loss_masks=masks, response_lengths=lengths,
            kl=[0.01 * torch.randn(n, generator=generator) for n in lengths],
            values=[torch.rand(n, generator=generator) for n in lengths],
        )

    batch = inputs()
    snapshot = copy.deepcopy(batch)
    result = _call(label + ".compute", estimator.compute, batch)
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise _fail(label, f"compute must return (advantages, returns), got {type(result).__name__}")
    for what, values in zip(("advantages", "returns"), result):
        if len(values) != len(lengths):
            raise _fail(label, f"compute returned {len(values)} {what} for {len(lengths)} samples")
        for i, (tensor, n) in enumerate(zip(values, lengths)):
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != (n,):
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise _fail(label, f"compute: {what}[{i}] must be a tensor of shape ({n},), got {shape}")
            if not torch.isfinite(tensor).all():
                raise _fail(label, f"compute: {what}[{i}] has non-finite values {tensor.tolist()}")
    for field_name in ("kl", "values", "loss_masks"):
        if any(not torch.equal(a, b) for a, b in zip(getattr(batch, field_name), getattr(snapshot, field_name))):
            raise _fail(label, f"compute modified inputs.{field_name} in place")
    again = _call(label + ".compute", estimator.compute, inputs())
    for what, first, second in zip(("advantages", "returns"), result, again):
        if any(not torch.equal(a, b) for a, b in zip(first, second)):
            raise _fail(label, f"compute is not deterministic ({what} differ on equal inputs)")


# ---------------------------------------------------------------------------------------------------
# Dynamic-sampling filters
# ---------------------------------------------------------------------------------------------------

FILTER_GROUPS = {
    "spread": [0.0, 1.0, 0.0, 1.0],
    "all_one": [1.0, 1.0, 1.0, 1.0],
    "all_zero": [0.0, 0.0, 0.0, 0.0],
    "fractional": [0.2, 0.9, 0.5, 0.1],
}


def check_filter(fn_or_name: Callable | str, groups: Sequence[Sequence[Sample]] | None = None,
                 options: dict | None = None, options_type: type | None = None) -> list[FilterDecision]:
    """Run a filter on fake groups (by default four groups of 4 with rewards spread, all 1, all 0 and
    fractional) as the rollout manager calls it: ``fn(group, **kwargs)`` with ``kwargs`` built from
    ``options`` (``--filter-opt`` pairs) like ``check_reward``'s. It must return ``FilterDecision`` or
    bool, leave the group unchanged and decide the same way twice, and accept ``reward_key=``. Returns the
    decisions (coerced)."""
    fn, label, metadata = _resolve("filter", fn_or_name)
    options = _option_kwargs("filter", fn, label, metadata, options, options_type)
    from .plugin_options import takes_keyword

    if not takes_keyword(fn, "reward_key"):
        raise _fail(label, "takes no reward_key keyword (nor **kwargs): core passes reward_key= when --reward-key is "
                           "set; add a reward_key=None parameter")
    if groups is None:
        groups = [fake_samples(rewards=r, group_index=g) for g, r in enumerate(FILTER_GROUPS.values())]
    decisions = []
    for g, group in enumerate(groups):
        group = list(group)
        before = [s.to_dict() for s in group]
        raw = _call(label, fn, group, **options)
        try:
            decision = FilterDecision.coerce(raw)
        except TypeError as exc:
            raise _fail(label, f"group {g}: {exc}") from exc
        if not isinstance(decision.keep, bool):
            raise _fail(label, f"group {g}: keep must be a bool, got {type(decision.keep).__name__}")
        if decision.reason is not None and not isinstance(decision.reason, str):
            raise _fail(label, f"group {g}: reason must be a str or None, got {decision.reason!r}")
        if not isinstance(decision.keep_when_insufficient, bool):
            raise _fail(label, f"group {g}: keep_when_insufficient must be a bool")
        if [s.to_dict() for s in group] != before:
            raise _fail(label, f"group {g}: the filter modified the group's samples")
        if FilterDecision.coerce(_call(label, fn, copy.deepcopy(group), **options)) != decision:
            raise _fail(label, f"group {g}: not deterministic")
        decisions.append(decision)
    return decisions


# ---------------------------------------------------------------------------------------------------
# Buffer policies
# ---------------------------------------------------------------------------------------------------


def _ids(groups) -> list[int]:
    return [group[0].group_index for group in groups]


def check_buffer_policy(cls_or_name: type | str, n_samples_per_prompt: int = 2, options: dict | None = None) -> None:
    """Add 5 fake groups, take some, round-trip ``state_dict`` through JSON into a fresh instance and
    drain both: every group comes out exactly once, in the same order from both, with its size."""
    cls, label, _ = _resolve("buffer_policy", cls_or_name)
    options = dict(options or {})
    n = n_samples_per_prompt

    def build():
        return _call(label + "()", cls, n_samples_per_prompt=n, **options)

    buffer = build()
    if not isinstance(buffer, BufferPolicy):
        missing = [m for m in ("add", "take", "__len__", "state_dict", "load_state_dict") if not hasattr(buffer, m)]
        raise _fail(label, f"does not implement the BufferPolicy protocol (missing {missing})")
    if len(buffer) != 0:
        raise _fail(label, f"a new buffer has length {len(buffer)}")
    empty = _call(label + ".take", buffer.take, 3, rollout_id=0)
    if list(empty) != []:
        raise _fail(label, f"take() on an empty buffer returned {empty!r}")

    groups = [fake_samples(n, rewards=[float(g)] * n, group_index=g, start_index=g * n) for g in range(5)]
    _call(label + ".add", buffer.add, copy.deepcopy(groups))
    if len(buffer) != 5:
        raise _fail(label, f"len() is {len(buffer)} after adding 5 groups")
    try:
        buffer.add([fake_samples(n + 1, group_index=99)])
    except ValueError:
        pass
    else:
        raise _fail(label, f"add() accepted a group of {n + 1} samples with n_samples_per_prompt={n} (raise ValueError)")
    if len(buffer) != 5:
        raise _fail(label, "a rejected add() changed the buffer")
    if list(_call(label + ".take", buffer.take, 0, rollout_id=1)) != []:
        raise _fail(label, "take(0) returned groups")

    taken = list(_call(label + ".take", buffer.take, 2, rollout_id=1))
    if len(taken) > 2:
        raise _fail(label, f"take(2) returned {len(taken)} groups")
    for group in taken:
        if not isinstance(group, list) or len(group) != n or not all(isinstance(s, Sample) for s in group):
            raise _fail(label, f"take() must return lists of {n} Samples, got {group!r:.200}")
    if len(buffer) != 5 - len(taken):
        raise _fail(label, f"len() is {len(buffer)} after taking {len(taken)} of 5 groups")

    state = _call(label + ".state_dict", buffer.state_dict)
    try:
        state = json.loads(json.dumps(state))
    except TypeError as exc:
        raise _fail(label, f"state_dict() is not JSON-serialisable: {exc}") from exc
    restored = build()
    _call(label + ".load_state_dict", restored.load_state_dict, state)
    if len(restored) != len(buffer):
        raise _fail(label, f"load_state_dict() restored {len(restored)} groups, the original holds {len(buffer)}")

    def drain(policy):
        out = []
        for rollout_id in range(2, 2 + 5 * 3):
            if len(policy) == 0:
                return out
            out.extend(_call(label + ".take", policy.take, 3, rollout_id=rollout_id))
        raise _fail(label, f"take(3) did not drain {len(policy)} remaining groups in 15 calls")

    rest, rest_restored = drain(buffer), drain(restored)
    if _ids(rest) != _ids(rest_restored):
        raise _fail(label, f"after a state_dict round trip the buffer yields {_ids(rest_restored)}, not {_ids(rest)}")
    if [[s.to_dict() for s in g] for g in rest] != [[s.to_dict() for s in g] for g in rest_restored]:
        raise _fail(label, "samples changed in a state_dict round trip")
    if sorted(_ids(taken) + _ids(rest)) != list(range(5)):
        raise _fail(label, f"groups in {list(range(5))}, groups out {_ids(taken) + _ids(rest)}")


# ---------------------------------------------------------------------------------------------------
# Placements
# ---------------------------------------------------------------------------------------------------

PLACEMENT_REQUESTS = (
    PlacementRequest(actor_num_nodes=1, actor_num_gpus_per_node=8, rollout_num_gpus=8, rollout_num_gpus_per_engine=1),
    PlacementRequest(actor_num_nodes=1, actor_num_gpus_per_node=8, rollout_num_gpus=8, rollout_num_gpus_per_engine=2),
    PlacementRequest(actor_num_nodes=2, actor_num_gpus_per_node=8, rollout_num_gpus=32, rollout_num_gpus_per_engine=2),
    PlacementRequest(actor_num_nodes=1, actor_num_gpus_per_node=4, rollout_num_gpus=4, rollout_num_gpus_per_engine=4,
                     num_gpus_per_node=4),
    PlacementRequest(actor_num_nodes=1, actor_num_gpus_per_node=1, rollout_num_gpus=1, rollout_num_gpus_per_engine=1),
    PlacementRequest(actor_num_nodes=2, actor_num_gpus_per_node=8, rollout_num_gpus=32, rollout_num_gpus_per_engine=16),
)


def _check_plan(label: str, request: PlacementRequest, plan: Any) -> None:
    from .placement_layout import plan_problems

    problems = plan_problems(request, plan)
    if problems:
        raise AssertionError(f"{label} on {request}: " + "; ".join(problems))


def check_placement(fn_or_name: Callable | str, requests: Sequence[PlacementRequest] | None = None) -> None:
    """Plan a few clusters (1-16 train GPUs, engines of 1-16 GPUs): bundle counts, disjoint roles unless
    colocated, engines partitioning the rollout GPUs, determinism, a ValueError naming
    ``--rollout-num-gpus-per-engine`` for indivisible rollout GPUs, a plan with rollout GPUs or a ValueError
    naming ``--rollout-num-gpus`` when that flag is not given (``rollout_num_gpus=None``), and no Ray import."""
    fn, label, _ = _resolve("placement", fn_or_name)
    ray_before = "ray" in sys.modules
    for request in requests if requests is not None else PLACEMENT_REQUESTS:
        plan = _call(label, fn, request)
        _check_plan(label, request, plan)
        if _call(label, fn, request) != plan:
            raise AssertionError(f"{label} on {request}: not deterministic")
    # Without --rollout-num-gpus a placement that is not colocated gets None: it must pick a count itself
    # or refuse with a ValueError naming the flag, never plan the engines no GPUs.
    unset = PlacementRequest(actor_num_nodes=1, actor_num_gpus_per_node=2, rollout_num_gpus=None)
    try:
        _check_plan(label, unset, fn(unset))
    except ValueError as exc:
        if "--rollout-num-gpus" not in str(exc):
            raise AssertionError(f"{label}: the error for rollout_num_gpus=None (--rollout-num-gpus not given) must "
                                 f"name --rollout-num-gpus, got: {exc}") from exc
    bad = PlacementRequest(actor_num_nodes=1, actor_num_gpus_per_node=4, rollout_num_gpus=3, rollout_num_gpus_per_engine=2)
    try:
        fn(bad)
    except ValueError as exc:
        if "--rollout-num-gpus-per-engine" not in str(exc):
            raise AssertionError(f"{label}: the error for 3 rollout GPUs in engines of 2 must name "
                                 f"--rollout-num-gpus-per-engine, got: {exc}") from exc
    except Exception as exc:
        raise AssertionError(f"{label}: 3 rollout GPUs in engines of 2 raised {type(exc).__name__}, not ValueError") from exc
    else:
        raise AssertionError(f"{label}: accepted 3 rollout GPUs in engines of 2 GPUs")
    if not ray_before and "ray" in sys.modules:
        raise AssertionError(f"{label}: planning imported ray; plans must be pure (core creates the placement group)")


# ---------------------------------------------------------------------------------------------------
# pytest fixtures (``pytest_plugins = ["plugrl.core.testing"]``)
# ---------------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # the checks above do not need pytest
    pytest = None

if pytest is not None:

    @pytest.fixture
    def plugin_set():
        """A fresh plugin manager with the built-ins only: ambient installs cannot leak into the test."""
        from .plugins import make_plugin_manager

        return make_plugin_manager(entry_points=False)

    @pytest.fixture
    def make_samples():
        """``make_samples(n=None, *, rewards=None, responses=None, label="42", group_index=0, ...)``."""
        return fake_samples

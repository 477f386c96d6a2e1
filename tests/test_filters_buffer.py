"""Dynamic-sampling filters, the FIFO buffer policy, slime-signature adapters and the overlong penalty."""

import json
import textwrap
import types

import pytest

from plugrl.core import FilterDecision
from plugrl.core.testing import check_buffer_policy, check_filter, fake_samples
from plugrl.core.testing import plugin_set  # noqa: F401  (fixture)
from plugrl.plugins.filters.fifo import FifoBuffer
from plugrl.plugins.filters.nonzero_std import nonzero_std, nonzero_std_with_fallback
from plugrl.plugins.filters.overlong import overlong_penalty, overlong_penalty_value
from plugrl.plugins.filters.slime_compat import SlimeBufferPolicy, slime_filter_adapter

# ---------------------------------------------------------------------------------------------------
# nonzero_std
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rewards, keep, reason",
    [
        ([1, 1, 1, 1], False, "zero_std_1"),  # an int reward stays an int, as in slime's reason
        ([1.0, 1.0, 1.0, 1.0], False, "zero_std_1.0"),
        ([0, 1, 0, 0], True, None),
        ([0.0, 0.0, 0.0, 0.0], False, "zero_std_0.0"),
        ([-0.96, -0.96], False, "zero_std_-1.0"),
        ([0.5], False, "zero_std_0.5"),  # one sample: no spread
        ([0.0, 2e-6], True, None),  # std = 1.41e-6 > 1e-6
        ([0.0, 1e-6], False, "zero_std_0.0"),  # std = 7.1e-7
    ],
)
def test_nonzero_std_decisions(rewards, keep, reason):
    decision = nonzero_std(fake_samples(rewards=rewards))
    assert decision == FilterDecision(keep=keep, reason=reason)


def test_threshold_is_unbiased_float64_std():
    # Population std of [0, 1.8e-6] is 0.9e-6 (would drop); the unbiased one is 1.27e-6 (keeps).
    assert nonzero_std(fake_samples(rewards=[0.0, 1.8e-6])).keep
    # 1 + 1e-9 differs from 1 in float64 but not in float32; the spread is still below the threshold.
    assert not nonzero_std(fake_samples(rewards=[1.0, 1.0 + 1e-9, 1.0])).keep


def test_fallback_sets_keep_when_insufficient():
    dropped = nonzero_std_with_fallback(fake_samples(rewards=[1, 1, 1]))
    assert dropped == FilterDecision(keep=False, reason="zero_std_1", keep_when_insufficient=True)
    kept = nonzero_std_with_fallback(fake_samples(rewards=[0, 1, 1]))
    assert kept.keep and kept.keep_when_insufficient


def test_dict_rewards_use_reward_key():
    group = fake_samples(rewards=[{"acc": 1.0, "score": 0.0}, {"acc": 1.0, "score": 1.0}])
    assert nonzero_std(group, reward_key="score").keep
    assert nonzero_std(group, reward_key="acc") == FilterDecision(False, "zero_std_1.0")
    with pytest.raises(ValueError, match="reward-key"):
        nonzero_std(group)


def test_builtin_filters_conform_and_are_registered(plugin_set):
    for name in ("nonzero_std", "nonzero_std_with_fallback"):
        entry = plugin_set.entry("filter", name)
        assert entry.builtin and entry.plugin == "plugrl.plugins.filters.nonzero_std"
        decisions = check_filter(name)
        assert [d.keep for d in decisions] == [True, False, False, True]


# ---------------------------------------------------------------------------------------------------
# fifo
# ---------------------------------------------------------------------------------------------------


def _groups(count, n=2, first=0):
    return [fake_samples(n, rewards=[float(g)] * n, group_index=g, start_index=g * n) for g in range(first, first + count)]


def _ids(groups):
    return [g[0].group_index for g in groups]


def test_fifo_order_and_take_more_than_available():
    buffer = FifoBuffer(n_samples_per_prompt=2)
    buffer.add(_groups(3))
    buffer.add(_groups(2, first=3))
    assert len(buffer) == 5
    assert _ids(buffer.take(2, rollout_id=7)) == [0, 1]
    assert _ids(buffer.take(10)) == [2, 3, 4]
    assert len(buffer) == 0 and buffer.take(3) == []
    assert buffer.take(0) == [] and buffer.take(-1) == []


def test_fifo_group_size_check_is_all_or_nothing():
    buffer = FifoBuffer(n_samples_per_prompt=2)
    with pytest.raises(ValueError, match="group 1 has 3 samples, expected n_samples_per_prompt=2"):
        buffer.add([fake_samples(2), fake_samples(3)])
    assert len(buffer) == 0
    unchecked = FifoBuffer()
    unchecked.add([fake_samples(2), fake_samples(3)])
    assert len(unchecked) == 2


def test_fifo_state_dict_round_trips_through_json():
    buffer = FifoBuffer(n_samples_per_prompt=2)
    groups = _groups(3)
    groups[1][0].metadata["start_rollout_id"] = 4
    buffer.add(groups)
    buffer.take(1)
    state = json.loads(json.dumps(buffer.state_dict()))
    restored = FifoBuffer(n_samples_per_prompt=2)
    restored.load_state_dict(state)
    assert len(restored) == 2
    out = restored.take(5)
    assert [[s.to_dict() for s in g] for g in out] == [[s.to_dict() for s in g] for g in groups[1:]]
    assert out[0][0].metadata == {"start_rollout_id": 4}
    assert out[0][0].status.value == "completed"


def test_fifo_conforms(plugin_set):
    assert plugin_set.get("buffer_policy", "fifo") is FifoBuffer
    check_buffer_policy("fifo")
    check_buffer_policy(FifoBuffer, n_samples_per_prompt=4)


# ---------------------------------------------------------------------------------------------------
# slime-signature adapters (--dynamic-sampling-filter-path, --buffer-filter-path)
# ---------------------------------------------------------------------------------------------------

SLIME_MODULE = """
from dataclasses import dataclass

@dataclass
class DynamicFilterOutput:          # slime's own dataclass, duck-typed by plugrl
    keep: bool
    reason: str = None
    keep_when_insufficient: bool = False

def spread_filter(args, samples, **kwargs):
    rewards = [s.get_reward_value(args) for s in samples]
    if max(rewards) - min(rewards) >= args.min_spread:
        return DynamicFilterOutput(keep=True)
    return DynamicFilterOutput(keep=False, reason="narrow")

def legacy_bool_filter(args, samples, **kwargs):
    return len(samples) == args.n_samples_per_prompt

import torch

def guide_nonzero_std(args, samples, **kwargs):  # the Qwen3-4B guide's filter, verbatim: a 0-d tensor
    rewards = [sample.reward for sample in samples]
    return torch.tensor(rewards, dtype=torch.float).std() > 0.0

def per_sample_tensor(args, samples, **kwargs):  # one truth value per sample: ambiguous for a group
    return torch.tensor([sample.reward for sample in samples]) > 0

def forgot_return(args, samples, **kwargs):
    pass

def pop_last(args, rollout_id, buffer, num_samples):
    CALLS.append(rollout_id)
    out = []
    while buffer and len(out) < num_samples:
        out.append(buffer.pop())
    return out

def peek_only(args, rollout_id, buffer, num_samples):
    return buffer[:num_samples]

CALLS = []
"""


@pytest.fixture
def slime_module(tmp_path, monkeypatch):
    name = f"slime_user_fns_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(SLIME_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


ARGS = types.SimpleNamespace(min_spread=0.5, n_samples_per_prompt=4, reward_key=None)


@pytest.mark.parametrize("sep", [":", "."])
def test_slime_dynamic_sampling_filter(slime_module, sep):
    fn = slime_filter_adapter(f"{slime_module}{sep}spread_filter", ARGS)
    assert fn(fake_samples(rewards=[0, 1, 0, 1])) == FilterDecision(keep=True)
    assert fn(fake_samples(rewards=[0, 0.2, 0, 0])) == FilterDecision(keep=False, reason="narrow")
    legacy = slime_filter_adapter(f"{slime_module}{sep}legacy_bool_filter", ARGS, kind="dynamic_sampling")
    assert legacy(fake_samples(4)) == FilterDecision(keep=True)
    assert legacy(fake_samples(3)) == FilterDecision(keep=False)
    check_filter(fn)


@pytest.mark.parametrize("sep", [":", "."])
def test_slime_buffer_filter(slime_module, sep):
    import importlib

    policy = slime_filter_adapter(f"{slime_module}{sep}pop_last", ARGS, n_samples_per_prompt=2)
    assert isinstance(policy, SlimeBufferPolicy)
    policy.add(_groups(4))
    assert _ids(policy.take(3, rollout_id=5)) == [3, 2, 1]
    assert len(policy) == 1
    assert importlib.import_module(slime_module).CALLS == [5]  # the real rollout id, not slime's None
    restored = slime_filter_adapter(f"{slime_module}{sep}pop_last", ARGS, kind="buffer", n_samples_per_prompt=2)
    restored.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    assert _ids(restored.take(3)) == [0]
    check_buffer_policy(lambda **kw: slime_filter_adapter(f"{slime_module}{sep}pop_last", ARGS, **kw))


def test_slime_filters_may_return_anything_with_one_truth_value(slime_module):
    import numpy as np
    import torch

    guide = slime_filter_adapter(f"{slime_module}.guide_nonzero_std", ARGS)
    assert guide(fake_samples(rewards=[0, 1, 0, 0])) == FilterDecision(keep=True)
    assert guide(fake_samples(rewards=[1, 1, 1, 1])) == FilterDecision(keep=False)
    # slime wraps any other value as keep=value: its truth decides
    for value, keep in [(torch.tensor(True), True), (torch.tensor(0.0), False), (np.bool_(True), True),
                        (np.float64(0.0), False), (1, True), (0, False)]:
        assert FilterDecision.coerce(value) == FilterDecision(keep=keep)


def test_a_filter_value_without_one_truth_value_names_the_filter(slime_module):
    from plugrl.core.plugin_call import PluginCallError

    ambiguous = slime_filter_adapter(f"{slime_module}.per_sample_tensor", ARGS)
    with pytest.raises(PluginCallError, match=r"per_sample_tensor.*shape \(4,\).*no single truth value"):
        ambiguous(fake_samples(rewards=[0, 1, 0, 1]))
    missing = slime_filter_adapter(f"{slime_module}.forgot_return", ARGS)
    with pytest.raises(PluginCallError, match=r"forgot_return.*None \(a missing return\?\)"):
        missing(fake_samples(4))


def test_slime_buffer_filter_must_pop(slime_module):
    policy = slime_filter_adapter(f"{slime_module}:peek_only", ARGS, kind="buffer")
    policy.add(_groups(2))
    with pytest.raises(RuntimeError, match="must pop what it returns"):
        policy.take(1)


def test_slime_adapter_errors(slime_module):
    with pytest.raises(ImportError, match="has no attribute"):
        slime_filter_adapter(f"{slime_module}:missing", ARGS)
    with pytest.raises(ValueError, match="unknown slime filter kind"):
        slime_filter_adapter(f"{slime_module}:spread_filter", ARGS, kind="other")


# ---------------------------------------------------------------------------------------------------
# overlong_penalty (DAPO soft overlong punishment)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length, expected",
    [
        (0, 0.0),
        (750, 0.0),  # exactly L - buffer: no penalty
        (751, -1 / 250),
        (800, -50 / 250),  # -0.2
        (1000, -1.0),  # at L_max
        (1200, -1.0),  # beyond L_max: the paper's -1
    ],
)
def test_overlong_penalty_values(length, expected):
    assert overlong_penalty_value(length, max_len=1000, buffer_len=250) == pytest.approx(expected)


def test_overlong_penalty_edits_rewards_in_place():
    args = types.SimpleNamespace(rollout_max_response_len=100, overlong_buffer_len=20, overlong_penalty_factor=0.5,
                                 reward_key=None)
    samples = fake_samples(rewards=[1.0, 1.0, 0.0, None], response_lengths=[80, 90, 100, 100])
    overlong_penalty(samples, args)
    # expected_len = 80; exceed = 0, 10, 20 -> -0, -10/20*0.5, -20/20*0.5; a missing reward stays None.
    assert [s.reward for s in samples] == pytest.approx([1.0, 0.75, -0.5, None])


def test_overlong_penalty_default_buffer_and_dict_rewards():
    args = types.SimpleNamespace(rollout_max_response_len=400, reward_key="score")  # buffer 100, factor 1
    samples = fake_samples(rewards=[{"score": 1.0, "acc": 1}, {"score": 0.0, "acc": 0}], response_lengths=[350, 300])
    overlong_penalty(samples, args)
    assert samples[0].reward == {"score": pytest.approx(0.5), "acc": 1}
    assert samples[1].reward == {"score": 0.0, "acc": 0}


def test_overlong_penalty_errors(plugin_set):
    assert plugin_set.get("reward_post_processor", "overlong_penalty") is overlong_penalty
    with pytest.raises(ValueError, match="--rollout-max-response-len"):
        overlong_penalty(fake_samples(rewards=[1.0]), types.SimpleNamespace())
    with pytest.raises(ValueError, match="--overlong-buffer-len"):
        overlong_penalty(fake_samples(rewards=[1.0]), types.SimpleNamespace(rollout_max_response_len=10,
                                                                               overlong_buffer_len=0))
    with pytest.raises(ValueError, match="--reward-key"):
        overlong_penalty(fake_samples(rewards=[{"a": 1.0}]), types.SimpleNamespace(rollout_max_response_len=10))

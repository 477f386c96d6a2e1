"""Rollout rules (slime §2.4-§2.7) on the real embedded engine and a tiny model: dynamic sampling,
exact stop, abort, partial-rollout continuation, reward error policies, train-data conversion."""

import asyncio
from types import SimpleNamespace

import pytest
import torch

from plugrl.core.data import PromptDataSource, PromptDataset
from plugrl.core.reward_call import Reward
from plugrl.core.rollout import RewardError, SampleGenerator, generate_rollout, sampling_params_from_args
from plugrl.core.train_data import samples_to_train_data
from plugrl.core.types import FilterDecision, Sample, Status
from plugrl.plugins.backends.tiny_default import build_tiny_checkpoint
from plugrl.plugins.estimators.grpo import GRPOEstimator
from plugrl.plugins.filters.fifo import FifoBuffer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny"))


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


def make_engine(checkpoint, **kw):
    from plugrl.plugins.backends.hf_engine import HFRolloutEngine

    return HFRolloutEngine(checkpoint, device="cpu", seed=0, **kw)


def make_args(**overrides):
    values = dict(rollout_temperature=1.0, rollout_top_p=1.0, rollout_top_k=-1, rollout_max_response_len=4,
                  rollout_stop=None, rollout_stop_token_ids=None, rollout_skip_special_tokens=False,
                  partial_rollout=False, mask_offpolicy_in_partial_rollout=False, group_rm=False,
                  reward_error="zero", reward_timeout=None)
    values.update(overrides)
    return SimpleNamespace(**values)


def data_source(n, prompts=16):
    dataset = PromptDataset([Sample(prompt=f"What is {i} + 0?", label=str(i)) for i in range(prompts)], path="mem")
    return PromptDataSource(dataset, n)


def run(coro):
    return asyncio.run(coro)


def constant_reward(value=1.0):
    return Reward(lambda sample: value, {})


async def _rollout(engine, tokenizer, *, args, reward, n=2, target=2, over=2, sample_filter=None,
                   buffer=None, source=None, rollout_id=0, concurrency=64):
    generator = SampleGenerator(args, engine, tokenizer, reward, concurrency=concurrency)
    buffer = buffer if buffer is not None else FifoBuffer(n)
    source = source or data_source(n)
    result = await generate_rollout(
        generator, source, buffer, rollout_id=rollout_id, rollout_batch_size=target,
        over_sampling_batch_size=over, sampling_params=sampling_params_from_args(args),
        sample_filter=sample_filter, partial_rollout=bool(args.partial_rollout),
    )
    return result, buffer, generator


def test_resampling_trigger_and_exact_stop(checkpoint, tokenizer):
    engine = make_engine(checkpoint)
    dropped = {0, 1}

    def drop_first_two(group):
        return FilterDecision(keep=group[0].group_index not in dropped, reason="first_two")

    result, _, _ = run(_rollout(engine, tokenizer, args=make_args(), reward=constant_reward(),
                                sample_filter=drop_first_two))
    # Groups 0 and 1 are dropped; the first drop makes 2 of 2 unreachable, so groups 2 and 3 are
    # submitted; after the second drop 2 remain in flight, which can still fill the target.
    assert [g[0].group_index for g in result.groups] == [2, 3]
    assert result.metrics["rollout/submitted_groups"] == 4
    assert result.metrics["rollout/dynamic_filter/drop_first_two"] == 2
    assert all(len(g) == 2 for g in result.groups)


def test_keep_when_insufficient_accepts_instead_of_resampling(checkpoint, tokenizer):
    engine = make_engine(checkpoint)

    def fallback(group):
        return FilterDecision(keep=False, reason="zero_std", keep_when_insufficient=True)

    result, _, _ = run(_rollout(engine, tokenizer, args=make_args(), reward=constant_reward(), sample_filter=fallback))
    assert len(result.groups) == 2
    assert result.metrics["rollout/submitted_groups"] == 2
    assert not any(k.startswith("rollout/dynamic_filter/drop") for k in result.metrics)


def test_real_nonzero_std_filter_keeps_only_varied_groups(checkpoint, tokenizer):
    from plugrl.plugins.filters.nonzero_std import nonzero_std

    engine = make_engine(checkpoint)
    reward = Reward(lambda sample: float(sample.index % 2 if sample.group_index % 2 else 1.0), {})
    result, _, _ = run(_rollout(engine, tokenizer, args=make_args(), reward=reward, sample_filter=nonzero_std,
                                target=3, over=2))
    assert len(result.groups) == 3
    assert all(g[0].group_index % 2 == 1 for g in result.groups)
    assert result.metrics["rollout/dynamic_filter/drop_zero_std_1.0"] >= 3


def test_abort_returns_in_flight_groups_to_the_buffer_with_partial_responses(checkpoint, tokenizer):
    # One group per decode batch: when group 0 is done, the others are still generating or queued.
    engine = make_engine(checkpoint, max_batch_size=2)
    args = make_args(partial_rollout=True, rollout_max_response_len=48)
    params_ignore_eos = {"ignore_eos": True}

    async def scenario():
        generator = SampleGenerator(args, engine, tokenizer, constant_reward(), concurrency=64)
        source = data_source(2)
        buffer = FifoBuffer(2)
        params = {**sampling_params_from_args(args), **params_ignore_eos}
        result = await generate_rollout(generator, source, buffer, rollout_id=7, rollout_batch_size=1,
                                        over_sampling_batch_size=3, sampling_params=params, partial_rollout=True)
        return result, buffer, generator, params

    result, buffer, generator, params = run(scenario())
    assert len(result.groups) == 1 and result.metrics["rollout/aborted_groups"] == 2
    assert len(buffer) == 2
    returned = [s for g in buffer.take(2) for s in g]
    assert all(s.status == Status.ABORTED for s in returned)
    assert all(s.reward is None for s in returned)  # aborted samples are not rewarded
    partial = [s for s in returned if s.response_length > 0]
    assert all(s.metadata["start_rollout_id"] == 7 for s in partial)
    assert all(len(s.loss_mask) == len(s.rollout_log_probs) == s.response_length for s in returned)
    assert all(len(s.tokens) == s.prompt_length + s.response_length for s in returned)

    # Continuation: prompt + partial response is resent with the remaining token budget.
    if partial:
        sample = partial[0]
        before = sample.response_length
        done = run(SampleGenerator(args, engine, tokenizer, constant_reward(), concurrency=4)
                   .generate_sample(sample, params))
        assert done.response_length == 48 and done.status == Status.TRUNCATED
        assert done.metadata["start_rollout_id"] == 7
        assert len(done.rollout_log_probs) == 48 and before < 48


def test_mask_offpolicy_part_of_a_partial_response(checkpoint, tokenizer):
    engine = make_engine(checkpoint)
    args = make_args(partial_rollout=True, mask_offpolicy_in_partial_rollout=True, rollout_max_response_len=6)
    prompt_ids = tokenizer.encode("What is 1 + 0?", add_special_tokens=False)
    sample = Sample(prompt="What is 1 + 0?", tokens=prompt_ids + [5, 6], response_length=2, loss_mask=[1, 1],
                    rollout_log_probs=[-1.0, -2.0], status=Status.ABORTED)
    params = {**sampling_params_from_args(args), "ignore_eos": True}
    done = run(SampleGenerator(args, engine, tokenizer, constant_reward(), concurrency=4).generate_sample(sample, params))
    assert done.response_length == 6  # 2 old + 4 new: the budget counts the old part
    assert done.loss_mask == [0, 0, 1, 1, 1, 1]
    assert done.rollout_log_probs[:2] == [-1.0, -2.0]


def test_reward_error_policies(checkpoint, tokenizer):
    engine = make_engine(checkpoint)

    def broken(sample):
        raise RuntimeError("grader crashed")

    result, _, generator = run(_rollout(engine, tokenizer, args=make_args(reward_error="zero"), reward=Reward(broken, {})))
    assert all(s.reward == 0.0 for g in result.groups for s in g)
    assert generator.reward_errors == 4
    with pytest.raises(RewardError, match="grader crashed"):
        run(_rollout(engine, tokenizer, args=make_args(reward_error="raise"), reward=Reward(broken, {})))


def test_hanging_reward_times_out_instead_of_deadlocking(checkpoint, tokenizer):
    engine = make_engine(checkpoint)

    async def hangs(sample):
        await asyncio.sleep(3600)

    result, _, generator = run(_rollout(engine, tokenizer, args=make_args(reward_timeout=0.5),
                                        reward=Reward(hangs, {})))
    assert generator.reward_errors == 4 and all(s.reward == 0.0 for g in result.groups for s in g)


def test_train_data_conversion_matches_closed_forms():
    groups = []
    for g, rewards in enumerate([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]]):
        group = []
        for i, r in enumerate(rewards):
            group.append(Sample(index=4 * g + i, tokens=[1, 2, 3] + [4] * (i + 1), response_length=i + 1,
                                reward=r, rollout_log_probs=[-0.5] * (i + 1), status=Status.COMPLETED))
        groups.append(group)
    groups[1][2].remove_sample = True
    groups[0][3].loss_mask = [0, 1, 1, 1]
    data = samples_to_train_data(groups, GRPOEstimator(SimpleNamespace(n_samples_per_prompt=4)))
    table = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    centered = table - table.mean(1, keepdim=True)
    expected = centered / (table.std(1, unbiased=True, keepdim=True) + 1e-6)
    torch.testing.assert_close(torch.tensor(data["rewards"]), expected.reshape(-1))
    assert data["raw_reward"] == table.reshape(-1).tolist()
    assert data["loss_masks"][6] == [0, 0, 0] and data["loss_masks"][3] == [0, 1, 1, 1]
    assert data["rollout_ids"] == list(range(8))
    assert data["rollout_mask_sums"][3] == 3 and data["rollout_mask_sums"][6] == 0


def test_custom_reward_post_process_replaces_the_group_normalisation():
    """slime's --custom-reward-post-process-path: fn(args, samples) -> (raw_rewards, rewards)."""
    groups = [[Sample(index=2 * g + i, tokens=[1, 2, 3], response_length=1, reward=float(g + i),
                      rollout_log_probs=[-0.5], status=Status.COMPLETED) for i in range(2)] for g in range(2)]
    seen = []

    def scale_by_ten(args, samples):
        seen.append((args.marker, [s.index for s in samples]))
        return [s.reward for s in samples], [10 * s.reward for s in samples]

    args = SimpleNamespace(marker="run-args", custom_reward_post_process_path="mine.scale_by_ten")
    data = samples_to_train_data(groups, GRPOEstimator(SimpleNamespace(n_samples_per_prompt=2)), args=args,
                                 reward_post_process=scale_by_ten)
    assert seen == [("run-args", [0, 1, 2, 3])]
    assert data["rewards"] == [0.0, 10.0, 10.0, 20.0] and data["raw_reward"] == [0.0, 1.0, 1.0, 2.0]
    with pytest.raises(ValueError, match=r"--custom-reward-post-process-path mine.scale_by_ten: returned 1 raw "
                                         r"rewards and 1 rewards for 4 samples"):
        samples_to_train_data(groups, None, args=args, reward_post_process=lambda a, s: ([1.0], [1.0]))


CUSTOM_GENERATE = '''
CALLS = []

async def two_turns(args, sample, sampling_params, engine, evaluation=False):
    """A multi-turn agent: generate, append a tool's answer (not trained on), generate again."""
    if not sample.tokens:
        sample.tokens = [5, 6, 7]
    params = dict(sampling_params, max_new_tokens=2)
    out = await engine.generate(list(sample.tokens), params)
    sample.append_response_tokens(out["tokens"], out["log_probs"])
    sample.append_response_tokens([9, 9], trainable=False)
    out = await engine.generate(list(sample.tokens), params)
    sample.append_response_tokens(out["tokens"], out["log_probs"], finish_reason="length")
    CALLS.append((sample.index, evaluation, sampling_params["temperature"]))
    return sample

async def slime_style(args, sample, sampling_params):
    sample.append_response_tokens([11], [-0.1], finish_reason="stop")
    return sample

async def several(args, sample, sampling_params):
    return [sample, sample]
'''


def test_custom_generate_function(checkpoint, tokenizer, tmp_path, monkeypatch):
    """slime's --custom-generate-function-path on the embedded engine (passed as ``engine`` to a
    function that names it); the per-sample generate_function_path wins; the result is rewarded."""
    (tmp_path / "my_generate.py").write_text(CUSTOM_GENERATE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_generate

    engine = make_engine(checkpoint)
    args = make_args(custom_generate_function_path="my_generate.two_turns")
    generator = SampleGenerator(args, engine, tokenizer, constant_reward(0.5), concurrency=4)
    params = sampling_params_from_args(args)
    first, second = Sample(index=0, prompt="p"), Sample(index=1, prompt="q", generate_function_path="my_generate:slime_style")
    async def both():
        return await asyncio.gather(generator.generate_sample(first, params),
                                    generator.generate_sample(second, params, evaluation=True))

    done = run(both())
    assert my_generate.CALLS == [(0, False, 1.0)]
    a = done[0]
    generated = a.response_length - 2
    assert 2 <= generated <= 4 and a.tokens[:3] == [5, 6, 7] and len(a.tokens) == 3 + a.response_length
    assert a.loss_mask.count(0) == 2 and a.status == Status.TRUNCATED and a.reward == 0.5
    assert done[1].tokens[-1] == 11 and done[1].status == Status.COMPLETED and done[1].reward == 0.5
    assert generator.generated == 2 and generator.rewarded == 2
    generator = SampleGenerator(make_args(custom_generate_function_path="my_generate.several"), engine, tokenizer,
                                constant_reward(), concurrency=4)
    with pytest.raises(TypeError, match="--custom-generate-function-path my_generate.several returned 2 samples"):
        run(generator.generate_sample(Sample(index=2, prompt="r"), params))


def test_rollout_sample_hooks_run_in_order_before_the_reward(checkpoint, tokenizer, tmp_path, monkeypatch):
    """slime's --rollout-sample-hook-path (repeatable): hook(args, sample, *, rollout_id, evaluation),
    sync or async, before the reward; a returned Sample replaces the one generated."""
    (tmp_path / "my_hooks.py").write_text(
        "from plugrl.core.types import Sample\n"
        "SEEN = []\n"
        "def tag(args, sample, *, rollout_id=None, evaluation=False):\n"
        "    SEEN.append(('tag', sample.index, rollout_id, evaluation, sample.reward))\n"
        "    sample.metadata['tagged'] = True\n"
        "async def replace(args, sample, *, rollout_id=None, evaluation=False):\n"
        "    SEEN.append(('replace', sample.index, sample.metadata.get('tagged')))\n"
        "    new = Sample(index=sample.index, prompt=sample.prompt, tokens=list(sample.tokens),\n"
        "                 response_length=sample.response_length, loss_mask=sample.loss_mask,\n"
        "                 rollout_log_probs=sample.rollout_log_probs, status=sample.status)\n"
        "    new.metadata['replaced'] = True\n"
        "    return new\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_hooks

    engine = make_engine(checkpoint)
    args = make_args(rollout_sample_hook_path=["my_hooks.tag", "my_hooks:replace"])
    generator = SampleGenerator(args, engine, tokenizer, constant_reward(0.25), concurrency=4)
    group = [Sample(index=i, prompt="What is 1 + 1?") for i in range(2)]
    out = run(generator.generate_group(group, sampling_params_from_args(args), rollout_id=7))
    assert sorted(my_hooks.SEEN) == [("replace", 0, True), ("replace", 1, True),
                                     ("tag", 0, 7, False, None), ("tag", 1, 7, False, None)]
    assert all(s.metadata.get("replaced") and s.reward == 0.25 for s in out) and out is group


def test_a_filter_that_drops_nearly_everything_is_reported_once_per_factor_of_ten(checkpoint, tokenizer, caplog):
    engine = make_engine(checkpoint)
    calls = []

    def drop_the_first_fourteen(group):
        calls.append(group)
        return FilterDecision(keep=len(calls) > 14, reason="no_spread")

    with caplog.at_level("WARNING", logger="plugrl.core.rollout"):
        result, _, _ = run(_rollout(engine, tokenizer, args=make_args(), reward=constant_reward(), target=1, over=1,
                                    sample_filter=drop_the_first_fourteen))
    assert len(result.groups) == 1 and result.metrics["rollout/submitted_groups"] == 15
    warnings = [r.getMessage() for r in caplog.records if "groups generated" in r.getMessage()]
    # one group at a time: the 10th dropped group crosses 10 x the one group needed; 100 is never reached
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("rollout 0: 10 groups generated for 1 needed, 0 kept so far (dropped by the "
                                  "dynamic-sampling filter: no_spread 10)")
    assert "keep_when_insufficient=True" in warnings[0]


def test_rollout_seed_zero_is_its_own_seed():
    """--rollout-seed 0 gives other sampling streams than the default 42 (it once fell back to 42)."""
    from plugrl.core.rollout import _rollout_seed, sample_seed

    assert _rollout_seed(SimpleNamespace(rollout_seed=0)) == 0
    assert _rollout_seed(SimpleNamespace()) == 42
    assert sample_seed(0, 3, 0, False) != sample_seed(42, 3, 0, False)

"""The embedded torch trainer: packed micro-batches, LR schedules, the objective's split invariance."""

from types import SimpleNamespace

import pytest
import torch
from plugrl.plugins.backends.tiny_default import build_tiny_checkpoint
from plugrl.plugins.backends.torch_trainer import (
    TorchTrainBackend,
    lr_lambda_factory,
    packed_inputs,
    response_slices,
)
from plugrl.plugins.estimators.grpo import GRPOEstimator


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny"))


def make_args(checkpoint, **overrides):
    values = dict(  # noqa: C408 - keyword form reads like the flags
        hf_checkpoint=checkpoint, device="cpu", lr=1e-3, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.98, adam_eps=1e-8, clip_grad=1e9, seed=0, rollout_temperature=1.0,
        micro_batch_size=1, use_dynamic_batch_size=False, max_tokens_per_gpu=None,
        global_batch_size=None, eps_clip=0.2, eps_clip_high=0.28, loss_type="policy_loss",
        kl_coef=0.0, use_kl_loss=False, entropy_coef=0.0, n_samples_per_prompt=2,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def random_sequences(seed=0, count=5):
    gen = torch.Generator().manual_seed(seed)
    seqs, resp = [], []
    for i in range(count):
        prompt_len = 3 + i
        response_len = 2 + (i * 3) % 5
        seqs.append(torch.randint(5, 300, (prompt_len + response_len,), generator=gen).tolist())
        resp.append(response_len)
    return seqs, resp


def test_packed_log_probs_equal_one_sample_at_a_time(checkpoint):
    backend = TorchTrainBackend(make_args(checkpoint), estimator=GRPOEstimator(None))
    seqs, resp = random_sequences()
    with torch.no_grad():
        packed, _ = backend._forward_response(backend.model, seqs, resp, with_entropy=False)
        alone = torch.cat([backend._forward_response(backend.model, [s], [r], with_entropy=False)[0]
                           for s, r in zip(seqs, resp)])
        # Independent reference: HF's own attention (not plugrl's packed one), each sequence alone.
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        assert backend.model.config._attn_implementation == "plugrl_packed" and not backend.dense_mask
        assert plain.config._attn_implementation != "plugrl_packed"
        reference = []
        for s, r in zip(seqs, resp):
            logits = plain(input_ids=torch.tensor([s])).logits[0]
            lp = torch.log_softmax(logits.float(), -1)
            reference += [lp[p - 1, s[p]].item() for p in range(len(s) - r, len(s))]
    assert packed.shape == alone.shape == (sum(resp),)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed, torch.tensor(reference), atol=1e-5, rtol=0)


def test_packed_inputs_mark_the_sample_boundaries():
    inputs = packed_inputs([[1, 2, 3], [4, 5]], "cpu")
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert inputs["cu_seq_lens_q"].tolist() == [0, 3, 5] and inputs["max_length_q"] == 3
    assert "attention_mask" not in inputs
    mask = packed_inputs([[1, 2, 3], [4, 5]], "cpu", dense_mask=True)["attention_mask"][0, 0] == 0  # attended
    assert mask[3, :3].sum() == 0 and mask[4, 3] and not mask[3, 4] and mask[2, 0]
    assert response_slices([[1, 2, 3], [4, 5]], [1, 1]) == [(1, 2), (3, 4)]


def test_an_architecture_without_swappable_attention_trains_on_dense_masks(checkpoint, monkeypatch):
    """HF refuses the packed attention for some architectures (ValueError at load): the backend keeps the
    model's own attention and packs with block-diagonal masks; the log-probs are the same."""
    from plugrl.plugins.backends.hf import packed_attention as hf_packed_attention

    seqs, resp = random_sequences(seed=3)
    packed = TorchTrainBackend(make_args(checkpoint), estimator=GRPOEstimator(None))
    monkeypatch.setattr(hf_packed_attention, "register", lambda: "no_such_attention")
    dense = TorchTrainBackend(make_args(checkpoint), estimator=GRPOEstimator(None))
    assert dense.dense_mask and not packed.dense_mask
    with torch.no_grad():
        got = dense._forward_response(dense.model, seqs, resp, with_entropy=True)
        expected = packed._forward_response(packed.model, seqs, resp, with_entropy=True)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_the_packed_attention_refuses_a_padding_mask():
    from plugrl.plugins.backends.hf.packed_attention import packed_attention_forward

    q = torch.zeros(2, 4, 3, 8)
    with pytest.raises(ValueError, match="not an attention_mask"):
        packed_attention_forward(None, q, q, q, torch.ones(2, 1, 3, 3, dtype=torch.bool))


def test_the_packed_attention_passes_gradients_back_as_views(checkpoint):
    """The backward of a packed train forward makes no ``select_backward`` (which writes each layer's
    Q/K/V gradient into a zero-filled tensor, a strided copy that RoPE's and the V projection's backward
    then copy back; on CUDA 6 copy kernels per layer): the attention function and the response
    selection take the packed row's batch dimension away with views. Counted as the ops the CPU
    profiler records; the GPU test counts the copy kernels (test_packed_attention_gpu.py)."""
    from torch.profiler import ProfilerActivity, profile

    backend = TorchTrainBackend(make_args(checkpoint, fused_log_probs="always"), estimator=GRPOEstimator(None))
    seqs, resp = random_sequences(seed=4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        log_probs, _ = backend._forward_response(backend.model, seqs, resp, with_entropy=False)
        log_probs.sum().backward()
    names = [e.name for e in prof.events()]
    assert "aten::scaled_dot_product_attention" in names  # the packed attention ran (CPU: SDPA per sample)
    assert "aten::select_backward" not in names


@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
def test_lr_schedule_closed_forms(style):
    import math

    args = SimpleNamespace(lr=1.0, min_lr=0.1, lr_warmup_iters=2, lr_decay_style=style, lr_decay_iters=None,
                           lr_warmup_fraction=None)
    f = lr_lambda_factory(args, total_steps=12)
    assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(1.0)  # linear warmup over 2 steps
    progress = (7 - 2) / (12 - 2)
    expected = {"constant": 1.0, "linear": 0.1 + 0.9 * (1 - progress),
                "cosine": 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))}[style]
    assert f(7) == pytest.approx(expected)
    assert f(12) == pytest.approx(1.0 if style == "constant" else 0.1)


def _train_data(seqs, resp, rewards):
    return {
        "tokens": seqs, "response_lengths": resp, "rewards": rewards, "raw_reward": rewards,
        "loss_masks": [[1] * r for r in resp], "rollout_log_probs": [[0.0] * r for r in resp],
        "rollout_ids": list(range(len(seqs))), "rollout_mask_sums": list(resp), "truncated": [0] * len(seqs),
        "sample_indices": list(range(len(seqs))),
    }


def _grads_after_one_step(checkpoint, data=None, **overrides):
    """(grads by name, metrics) of one step on ``data`` (default: 4 random samples) at lr 0."""
    args = make_args(checkpoint, lr=0.0, **overrides)  # lr 0: the step leaves weights unchanged
    backend = TorchTrainBackend(args, estimator=GRPOEstimator(args))
    if data is None:
        seqs, resp = random_sequences(seed=1, count=4)
        data = _train_data(seqs, resp, [1.0, -1.0, 0.5, -0.5])
    metrics = backend.train(0, data)
    return {n: p.grad.clone() for n, p in backend.model.named_parameters() if p.grad is not None}, metrics


def test_objective_does_not_depend_on_micro_batch_split(checkpoint):
    one_by_one, m1 = _grads_after_one_step(checkpoint, micro_batch_size=1)
    all_at_once, m4 = _grads_after_one_step(checkpoint, micro_batch_size=4)
    dynamic, md = _grads_after_one_step(checkpoint, use_dynamic_batch_size=True, max_tokens_per_gpu=20)
    # gradient checkpointing recomputes each layer with the packed attention's cu_seqlens kwargs
    recomputed, _ = _grads_after_one_step(checkpoint, micro_batch_size=4, gradient_checkpointing=True)
    for name, grad in one_by_one.items():
        torch.testing.assert_close(all_at_once[name], grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(dynamic[name], grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(recomputed[name], grad, atol=1e-6, rtol=1e-4)
    assert m1["train/pg_loss"] == pytest.approx(m4["train/pg_loss"], abs=1e-7)
    assert m1["train/pg_loss"] == pytest.approx(md["train/pg_loss"], abs=1e-7)


@pytest.mark.parametrize("use_kl_loss", [False, True])
def test_train_times_the_log_prob_forwards_and_the_updates_apart(checkpoint, use_kl_loss):
    """perf/train_log_probs_time (old policy, and the reference model with a KL loss) and perf/train_update_time
    (forward, backward, optimizer: what benchmarks/train_throughput.py times) are both spent, and
    together lie within the train call."""
    import time

    args = make_args(checkpoint, lr=0.0, use_kl_loss=use_kl_loss, kl_loss_coef=0.1 if use_kl_loss else 0.0)
    backend = TorchTrainBackend(args, estimator=GRPOEstimator(args))
    assert (backend.ref_model is not None) == use_kl_loss
    seqs, resp = random_sequences(seed=1, count=4)
    started = time.perf_counter()
    metrics = backend.train(0, _train_data(seqs, resp, [1.0, -1.0, 0.5, -0.5]))
    wall = time.perf_counter() - started
    assert metrics["perf/train_log_probs_time"] > 0 and metrics["perf/train_update_time"] > 0
    assert metrics["perf/train_log_probs_time"] + metrics["perf/train_update_time"] <= wall


def test_sft_warmup_lowers_the_loss(checkpoint):
    backend = TorchTrainBackend(make_args(checkpoint), estimator=GRPOEstimator(None))
    seqs, resp = random_sequences(seed=2, count=4)
    history = backend.sft_warmup([(seqs, resp)] * 30, lr=3e-3)
    assert history[-1] < 0.5 * history[0]


def test_rank_share_splits_a_step_by_tokens():
    from plugrl.plugins.backends.torch_trainer import rank_share

    positions = [10, 11, 12, 13, 14, 15]
    lengths = {10: 9, 11: 1, 12: 5, 13: 5, 14: 8, 15: 2}
    length_list = [lengths.get(i, 0) for i in range(16)]
    shares = [rank_share(positions, length_list, rank, 2) for rank in range(2)]
    assert sorted(shares[0] + shares[1]) == positions  # every sample once
    assert [len(s) for s in shares] == [3, 3]  # equal counts when they divide evenly
    assert all(s == sorted(s) for s in shares)  # original order inside a share
    tokens = [sum(lengths[p] for p in s) for s in shares]
    assert abs(tokens[0] - tokens[1]) <= 2, tokens  # 30 tokens: 15 / 15 is reachable, KK gets within 2
    assert rank_share(positions, length_list, 0, 1) == positions
    # Fewer samples than ranks (samples of no step): some ranks get none.
    assert sorted(rank_share([3], length_list, r, 2) for r in range(2)) == [[], [3]]


def test_a_step_smaller_than_the_world_names_the_flags(checkpoint):
    backend = TorchTrainBackend(make_args(checkpoint), estimator=GRPOEstimator(None))
    backend.rank, backend.world_size = 0, 4  # as rank 0 of four; _share needs no process group
    with pytest.raises(ValueError, match="--actor-num-gpus-per-node"):
        backend._share([0, 1, 2], [5, 5, 5])


def test_offloaded_trainer_exports_saves_and_resumes_identically(checkpoint, tmp_path):
    """The colocated offload (its device-independent part, run on CPU here): while the storages are
    freed, weight export and save_hf read the host copy; after onload, training continues exactly as
    a trainer that never offloaded (model, optimizer state and buffers restored bit for bit)."""
    from transformers import AutoModelForCausalLM

    seqs, resp = random_sequences(seed=3, count=4)
    data = _train_data(seqs, resp, [1.0, -1.0, 0.5, -0.5])
    args = make_args(checkpoint, use_kl_loss=True, kl_coef=0.1, ref_load=checkpoint)
    reference, offloaded = (TorchTrainBackend(args, estimator=GRPOEstimator(args)) for _ in range(2))
    assert offloaded.ref_model is not None
    for module in (offloaded.model, offloaded.ref_model):  # on CPU the loaded weights are file-mapped
        for tensor in (*module.parameters(), *module.buffers()):  # (not resizable); CUDA storages always are
            tensor.data = tensor.data.clone()
    for backend in (reference, offloaded):
        backend.train(0, data)
    exported = reference.export_weights(None)[0]
    offloaded._release_storages()
    assert all(p.untyped_storage().nbytes() == 0 for p in offloaded.model.parameters())
    assert all(p.untyped_storage().nbytes() == 0 for p in offloaded.ref_model.parameters())
    assert all(v.untyped_storage().nbytes() == 0 for s in offloaded.optimizer.state.values() for v in s.values())
    while_offloaded = offloaded.export_weights(1 << 16)  # buckets, as a push uses them
    assert sum(len(b) for b in while_offloaded) == len(exported) and len(while_offloaded) > 1
    assert all(torch.equal(t, exported[n]) for b in while_offloaded for n, t in b.items())
    offloaded.save_hf(str(tmp_path / "hf"))
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    assert all(torch.equal(saved[n], t) for n, t in exported.items() if n in saved)
    offloaded._restore_storages()
    after = {name: backend.train(1, data) for name, backend in (("reference", reference), ("offloaded", offloaded))}
    timers = ("perf/train_log_probs_time", "perf/train_update_time")  # wall seconds: the only values allowed to differ
    assert {k: v for k, v in after["offloaded"].items() if k not in timers} == \
        {k: v for k, v in after["reference"].items() if k not in timers}
    for (name, p), q in zip(reference.model.named_parameters(), offloaded.model.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma", "gemma2"])
def test_packed_attention_serves_other_architectures(tmp_path, model_type):
    """The torch backend trains any HF causal LM: the packed attention (or, where HF refuses it, dense
    masks) gives each sample the log-probs of HF's own model on that sample alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=320, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  max_position_embeddings=64)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / model_type)
    path = str(tmp_path / model_type)
    backend = TorchTrainBackend(make_args(path), estimator=GRPOEstimator(None))
    # gemma2 has sliding-window layers and logit soft-capping: it keeps its own attention
    assert backend.dense_mask == (model_type == "gemma2")
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    seqs, resp = random_sequences(seed=5)
    with torch.no_grad():
        packed, _ = backend._forward_response(backend.model, seqs, resp, with_entropy=False)
        reference = []
        for s, r in zip(seqs, resp):
            lp = torch.log_softmax(plain(input_ids=torch.tensor([s])).logits[0].float(), -1)
            reference += [lp[p - 1, s[p]].item() for p in range(len(s) - r, len(s))]
    torch.testing.assert_close(packed, torch.tensor(reference), atol=1e-5, rtol=0)


def test_no_save_optim_leaves_the_moments_out_and_a_resume_starts_them_fresh(checkpoint, tmp_path):
    seqs, resp = random_sequences(seed=4, count=4)
    data = _train_data(seqs, resp, [1.0, -1.0, 0.5, -0.5])
    args = make_args(checkpoint, no_save_optim=True)
    trained = TorchTrainBackend(args, estimator=GRPOEstimator(args))
    trained.train(0, data)
    assert trained.optimizer.state  # Adam moments exist after a step ...
    trained.save(str(tmp_path))
    saved = torch.load(tmp_path / "train_state.pt", weights_only=False)
    assert "optimizer" not in saved and saved["optimizer_steps"] == 1  # ... but are not written
    resumed = TorchTrainBackend(args, estimator=GRPOEstimator(args))
    resumed.load(str(tmp_path))
    assert not resumed.optimizer.state and resumed.optimizer_steps == 1
    for p, q in zip(trained.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_custom_advantage_function(checkpoint, tmp_path, monkeypatch):
    """slime's --custom-advantage-function-path: fn(args, rollout_data) sets rollout_data["advantages"].
    Broadcasting the (already group-normalised) reward reproduces the built-in GRPO step exactly;
    zero advantages give a zero policy gradient; a wrong shape is an error naming the flag."""
    (tmp_path / "my_advantages.py").write_text(
        "import torch\n"
        "def grpo_like(args, rollout_data):\n"
        "    rollout_data['advantages'] = [torch.full((n,), float(r)) for n, r in\n"
        "                                  zip(rollout_data['response_lengths'], rollout_data['rewards'])]\n"
        "def zeros(args, rollout_data):\n"
        "    rollout_data['advantages'] = [torch.zeros(n) for n in rollout_data['response_lengths']]\n"
        "def wrong(args, rollout_data):\n"
        "    rollout_data['advantages'] = [torch.zeros(n + 1) for n in rollout_data['response_lengths']]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seqs, resp = random_sequences(seed=7, count=4)
    data = _train_data(seqs, resp, [1.0, -1.0, 0.5, -0.5])

    builtin_grads, builtin = _grads_after_one_step(checkpoint, data)
    custom_grads, custom = _grads_after_one_step(checkpoint, data, custom_advantage_function_path="my_advantages.grpo_like")
    assert custom["train/pg_loss"] == pytest.approx(builtin["train/pg_loss"], abs=1e-7)
    for name, grad in builtin_grads.items():
        torch.testing.assert_close(custom_grads[name], grad, atol=1e-7, rtol=0)
    zero_grads, zero = _grads_after_one_step(checkpoint, data, custom_advantage_function_path="my_advantages:zeros")
    assert zero["train/pg_loss"] == 0.0 and all(float(g.abs().max()) == 0.0 for g in zero_grads.values())
    with pytest.raises(ValueError, match=r"--custom-advantage-function-path my_advantages.wrong: advantages of "
                                         r"sample 0 have shape"):
        _grads_after_one_step(checkpoint, data, custom_advantage_function_path="my_advantages.wrong")


def test_custom_pg_loss_reducer(checkpoint, tmp_path, monkeypatch):
    """slime's --custom-pg-loss-reducer-function-path: fn(total_lengths, response_lengths, loss_masks,
    calculate_per_token_loss) -> reducer of the policy-gradient term. A reducer computing twice the
    per-sample token mean doubles pg_loss and the gradient (no entropy or KL term here)."""
    (tmp_path / "my_reducers.py").write_text(
        "import torch\n"
        "CALLS = []\n"
        "def twice_sample_mean(total_lengths, response_lengths, loss_masks, calculate_per_token_loss):\n"
        "    CALLS.append((list(total_lengths), list(response_lengths), calculate_per_token_loss))\n"
        "    def reduce(x):\n"
        "        parts = torch.split(x, list(response_lengths))\n"
        "        return 2 * sum((p * m).sum() / m.sum().clamp(min=1) for p, m in zip(parts, loss_masks))\n"
        "    return reduce\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_reducers

    seqs, resp = random_sequences(seed=8, count=4)
    data = _train_data(seqs, resp, [1.0, 0.5, 0.5, 0.25])  # advantages with a non-zero mean: pg_loss != 0

    default_grads, default = _grads_after_one_step(checkpoint, data, micro_batch_size=4)
    doubled_grads, doubled = _grads_after_one_step(checkpoint, data, micro_batch_size=4,
                                                   custom_pg_loss_reducer_function_path="my_reducers.twice_sample_mean")
    assert my_reducers.CALLS == [([len(s) for s in seqs], resp, False)]
    assert abs(default["train/pg_loss"]) > 0.1
    assert doubled["train/pg_loss"] == pytest.approx(2 * default["train/pg_loss"], rel=1e-5)
    for name, grad in default_grads.items():
        torch.testing.assert_close(doubled_grads[name], 2 * grad, atol=1e-7, rtol=1e-5)

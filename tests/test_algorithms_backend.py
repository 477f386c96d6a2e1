"""The 2026 algorithms through the embedded torch trainer's real ``train`` (tiny Qwen3, packed
micro-batches), each against an equivalent run built another way: Dr.GRPO against slime's recipe
(a constant-divisor ``--custom-pg-loss-reducer-function-path``), sequence-level rejection against
zeroing the rejected samples' rewards, CISPO's first step against REINFORCE."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from plugrl.plugins.backends.tiny_default import build_tiny_checkpoint
from plugrl.plugins.backends.torch_trainer import TorchTrainBackend
from plugrl.plugins.estimators.cispo import CISPOEstimator
from plugrl.plugins.estimators.dr_grpo import DrGRPOEstimator
from plugrl.plugins.estimators.grpo import GRPOEstimator


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny"))


def make_args(checkpoint, **overrides):
    values = dict(  # noqa: C408 - keyword form reads like the flags
        hf_checkpoint=checkpoint, device="cpu", lr=0.0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.98,
        adam_eps=1e-8, clip_grad=1e9, seed=0, rollout_temperature=1.0, micro_batch_size=2,
        use_dynamic_batch_size=False, max_tokens_per_gpu=None, global_batch_size=None, eps_clip=0.2,
        eps_clip_high=0.28, loss_type="policy_loss", kl_coef=0.0, use_kl_loss=False, entropy_coef=0.0,
        n_samples_per_prompt=2, rollout_max_response_len=8,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def make_data(rewards, rollout_log_probs=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    seqs, resp = [], []
    for i in range(len(rewards)):
        response_len = 1 + (i * 3) % 6  # includes length-1 responses
        seqs.append(torch.randint(5, 300, (3 + i + response_len,), generator=gen).tolist())
        resp.append(response_len)
    return {
        "tokens": seqs, "response_lengths": resp, "rewards": list(rewards), "raw_reward": list(rewards),
        "loss_masks": [[1] * r for r in resp],
        "rollout_log_probs": rollout_log_probs or [[0.0] * r for r in resp],
        "rollout_ids": list(range(len(seqs))), "rollout_mask_sums": list(resp), "truncated": [0] * len(seqs),
        "sample_indices": list(range(len(seqs))),
    }


def train_once(args, estimator, data):
    """(grads by name, metrics) of one optimizer step at lr 0 (the weights stay put)."""
    backend = TorchTrainBackend(args, estimator=estimator)
    metrics = backend.train(0, data)
    return {n: p.grad.clone() for n, p in backend.model.named_parameters() if p.grad is not None}, metrics, backend


def assert_same_grads(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-7, rtol=1e-5)


REWARDS = [1.0, -1.0, 0.5, -0.5, 0.25, -0.25]


def test_dr_grpo_equals_slimes_constant_divisor_reducer(checkpoint, tmp_path, monkeypatch):
    (tmp_path / "drgrpo_reducer.py").write_text(
        "def constant_divisor(total_lengths, response_lengths, loss_masks, calculate_per_token_loss):\n"
        "    import torch\n"
        "    weights = torch.cat([m.reshape(-1).double() for m in loss_masks]) / 8.0\n"
        "    return lambda x: (x * weights.to(x)).sum()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = make_data(REWARDS)
    args = make_args(checkpoint)
    ours, m_ours, _ = train_once(args, DrGRPOEstimator(args), data)
    slime_args = make_args(checkpoint, disable_grpo_std_normalization=True,
                           custom_pg_loss_reducer_function_path="drgrpo_reducer.constant_divisor")
    slimes, m_slime, _ = train_once(slime_args, GRPOEstimator(slime_args), data)
    assert_same_grads(ours, slimes)
    assert m_ours["train/pg_loss"] == pytest.approx(m_slime["train/pg_loss"], abs=1e-7)
    # ... and it is not the default aggregation (the test would pass vacuously otherwise)
    default, _, _ = train_once(make_args(checkpoint), GRPOEstimator(None), data)
    assert any(not torch.allclose(default[n], ours[n], atol=1e-6) for n in ours)


def test_sequence_rejection_equals_zeroing_the_rejected_samples(checkpoint):
    """Shift the rollout log-probs of samples 1 and 4 by 1 nat per token: their sequence ratio leaves
    [0.5, 2] (e^len), the others' stays 1. With no entropy/KL term a rejected sample contributes
    exactly what a zero-advantage sample does, and the masked-token count is their length."""
    probe = make_data(REWARDS)
    args = make_args(checkpoint, use_rs=True, rs_level="sequence", rs_lower_bound=0.5, rs_upper_bound=2.0)
    backend = TorchTrainBackend(args, estimator=GRPOEstimator(args))
    with torch.no_grad():
        lp, _ = backend._forward_response(backend.model, probe["tokens"], probe["response_lengths"], with_entropy=False)
    rollout = [part.tolist() for part in lp.split(probe["response_lengths"])]
    rejected = [1, 4]
    for i in rejected:
        rollout[i] = [x - 1.0 for x in rollout[i]]
    masked, metrics, _ = train_once(args, GRPOEstimator(args), make_data(REWARDS, rollout))
    zeroed_rewards = [0.0 if i in rejected else r for i, r in enumerate(REWARDS)]
    plain_args = make_args(checkpoint, use_tis=True, tis_clip=1e9)  # recomputes old log-probs, weight 1 on kept
    rollout_same = [part.tolist() for part in lp.split(probe["response_lengths"])]
    expected, _, _ = train_once(plain_args, GRPOEstimator(plain_args), make_data(zeroed_rewards, rollout_same))
    assert_same_grads(masked, expected)
    lengths = probe["response_lengths"]
    assert metrics["train/rs_masked_tokens"] == pytest.approx(sum(lengths[i] for i in rejected))
    assert metrics["train/rs_masked_samples"] == pytest.approx(len(rejected))
    assert metrics["train/rs_masked_fraction"] == pytest.approx(len(rejected) / len(REWARDS), abs=1e-6)


def test_cispo_first_step_is_reinforce_in_the_trainer(checkpoint):
    """One step per rollout: old = current, the CISPO weight is 1, and the gradient is PPO's at ρ = 1
    (−A ∇logπ); the estimator's policy_loss is the one the trainer ran (pg_loss value −A·logπ)."""
    data = make_data(REWARDS)
    args = make_args(checkpoint, eps_clip=1.0, eps_clip_high=4.0)
    cispo, m_cispo, backend = train_once(args, CISPOEstimator(args), data)
    grpo, m_grpo, _ = train_once(make_args(checkpoint), GRPOEstimator(None), data)
    assert_same_grads(cispo, grpo)
    with torch.no_grad():
        lp, _ = backend._forward_response(backend.model, data["tokens"], data["response_lengths"], with_entropy=False)
    expected = sum(-r * float(part.mean()) for r, part in zip(REWARDS, lp.split(data["response_lengths"]))) / len(REWARDS)
    assert m_cispo["train/pg_loss"] == pytest.approx(expected, rel=1e-5)
    assert m_grpo["train/pg_loss"] == pytest.approx(-sum(REWARDS) / len(REWARDS), abs=1e-6)

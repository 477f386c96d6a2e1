"""Dr.GRPO (``--advantage-estimator dr_grpo``; ``grpo --disable-grpo-std-normalization --loss-agg-mode
seq-mean-token-sum-norm``) and the four ``--loss-agg-mode`` reducers, through the train actors' loss
path, against an independent reimplementation of Liu et al.'s objective from softmax probabilities."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from plugrl.core.losses import log_probs_from_logits
from plugrl.core.rl_step import prepare_rollout
from plugrl.plugins.estimators.dr_grpo import DrGRPOEstimator
from plugrl.plugins.estimators.grpo import GRPOEstimator

VOCAB, GROUP, EPS = 6, 4, 0.2


def _data(shaped, lengths, masks):
    n = len(lengths)
    return {
        "tokens": [[1] * (2 + k) for k in lengths], "response_lengths": list(lengths),
        "rewards": [float(r) for r in shaped], "raw_reward": [float(r) for r in shaped],
        "loss_masks": [m.tolist() for m in masks], "rollout_log_probs": [[0.0] * k for k in lengths],
        "rollout_ids": list(range(n)), "rollout_mask_sums": [float(m.sum()) for m in masks],
    }


def objective(args, estimator, rewards, lengths, masks, logits, old_logits, ids, micro_batches=None):
    """J = Σ over micro-batches of loss x step scale (one optimizer step over all samples)."""
    shaped = estimator.shape_rewards(torch.tensor(rewards).reshape(-1, GROUP)).reshape(-1)
    old = list(log_probs_from_logits(old_logits, ids).detach().split(list(lengths)))
    prepared = prepare_rollout(args, _data(shaped, lengths, masks), estimator, "cpu", num_steps=2, has_ref=False,
                               compute_log_probs=lambda which: dict(enumerate(old)),
                               gather=lambda local, n: [local[i] for i in range(n)])
    positions = list(range(len(lengths)))
    scale = prepared.step_scale(positions)
    lp = list(log_probs_from_logits(logits, ids).split(list(lengths)))
    total = 0.0
    for mb in micro_batches or [positions]:
        loss, _ = prepared.loss(mb, torch.cat([lp[i] for i in mb]), None)
        total = total + loss * scale
    return total, prepared


def paper_objective(rewards, lengths, masks, logits, old_logits, ids, mode, std=False, constant=None):
    """−(PPO-clip surrogate) with Â = R − mean_group(R) (÷ std when ``std``), aggregated per ``mode``:
    Dr.GRPO's is (1/G) Σ_i Σ_t ℓ_it / C (no 1/|o_i|); the others are the textbook means."""
    r = torch.tensor(rewards, dtype=torch.float64).reshape(-1, GROUP)
    adv = r - r.mean(-1, keepdim=True)
    if std:
        adv = adv / (adv.std(-1, keepdim=True) + 1e-6)
    adv = adv.reshape(-1)
    p = torch.softmax(logits.double(), -1).gather(-1, ids[:, None]).squeeze(-1)
    p_old = torch.softmax(old_logits.double(), -1).gather(-1, ids[:, None]).squeeze(-1)
    ratio = p / p_old
    sums, counts, start = [], [], 0
    for i, n in enumerate(lengths):
        rho, m = ratio[start:start + n], masks[i].double()
        ell = -torch.minimum(rho * adv[i], rho.clamp(1 - EPS, 1 + EPS) * adv[i])
        sums.append((ell * m).sum())
        counts.append(m.sum())
        start += n
    sums, counts = torch.stack(sums), torch.stack(counts)
    if mode == "seq-mean-token-mean":
        return (sums / counts.clamp(min=1)).mean()
    if mode == "token-mean":
        return sums.sum() / counts.clamp(min=1).sum()  # slime: a fully masked sample counts one token
    if mode == "seq-mean-token-sum":
        return sums.mean()
    return sums.mean() / constant


def _case(seed, lengths, zero_mask=None):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    logits = torch.randn(total, VOCAB, generator=g, dtype=torch.float64)
    old_logits = logits + 0.3 * torch.randn(total, VOCAB, generator=g, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (total,), generator=g)
    masks = [(torch.rand(n, generator=g) > 0.25).long() for n in lengths]
    for m in masks:
        m[-1] = 1
    if zero_mask is not None:
        masks[zero_mask] = torch.zeros(lengths[zero_mask], dtype=torch.long)
    rewards = (torch.rand(len(lengths), generator=g) * 2).tolist()
    return logits, old_logits, ids, masks, rewards


CASES = [(0, [5, 3, 8, 1, 4, 6, 2, 7], None), (1, [1] * 8, None), (2, [4, 6, 3, 5, 2, 2, 9, 1], 5)]


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("seed,lengths,zero_mask", CASES)
def test_loss_agg_modes_match_their_formulas(mode, seed, lengths, zero_mask):
    logits, old_logits, ids, masks, rewards = _case(seed, lengths, zero_mask)
    args = SimpleNamespace(eps_clip=EPS, loss_agg_mode=mode, loss_scale_factor=12.0,
                           disable_grpo_std_normalization=True, n_samples_per_prompt=GROUP)
    leaf = logits.clone().requires_grad_()
    J, _ = objective(args, GRPOEstimator(args), rewards, lengths, masks, leaf, old_logits, ids)
    J.backward()
    ref = logits.clone().requires_grad_()
    expected = paper_objective(rewards, lengths, masks, ref, old_logits, ids, mode, constant=12.0)
    expected.backward()
    torch.testing.assert_close(J, expected.to(J.dtype), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("seed,lengths,zero_mask", CASES)
def test_dr_grpo_is_grpo_without_std_and_with_the_constant_normaliser(seed, lengths, zero_mask):
    logits, old_logits, ids, masks, rewards = _case(seed, lengths, zero_mask)
    # dr_grpo's constant defaults to the generation budget
    args = SimpleNamespace(eps_clip=EPS, rollout_max_response_len=16, n_samples_per_prompt=GROUP)
    leaf = logits.clone().requires_grad_()
    J, prepared = objective(args, DrGRPOEstimator(args), rewards, lengths, masks, leaf, old_logits, ids,
                            micro_batches=[[0, 1, 2], [3], [4, 5, 6, 7]])
    J.backward()
    assert prepared.loss_agg_mode == "seq-mean-token-sum-norm"
    ref = logits.clone().requires_grad_()
    expected = paper_objective(rewards, lengths, masks, ref, old_logits, ids, "seq-mean-token-sum-norm", constant=16.0)
    expected.backward()
    torch.testing.assert_close(J, expected.to(J.dtype), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-6, atol=1e-9)
    # ... and the same as grpo with the two options
    explicit = SimpleNamespace(eps_clip=EPS, disable_grpo_std_normalization=True, rollout_max_response_len=16,
                               loss_agg_mode="seq-mean-token-sum-norm", n_samples_per_prompt=GROUP)
    J2, _ = objective(explicit, GRPOEstimator(explicit), rewards, lengths, masks, logits, old_logits, ids)
    torch.testing.assert_close(J.detach(), J2.detach(), rtol=1e-12, atol=0)


def test_every_token_weighs_the_same_whatever_the_response_length():
    """The length bias Dr.GRPO removes: on-policy, a token's gradient on its log-prob is −Â/(G·C)
    in any response, where GRPO's default gives −Â/(G·|o_i|)."""
    lengths, masks = [1, 8, 3, 2], [torch.ones(n, dtype=torch.long) for n in (1, 8, 3, 2)]
    rewards = [1.0, 1.0, 0.0, 0.0]
    for estimator_cls, per_token in ((DrGRPOEstimator, True), (GRPOEstimator, False)):
        args = SimpleNamespace(eps_clip=EPS, rollout_max_response_len=10, n_samples_per_prompt=GROUP)
        estimator = estimator_cls(args)
        shaped = estimator.shape_rewards(torch.tensor([rewards])).reshape(-1)
        prepared = prepare_rollout(args, _data(shaped, lengths, masks), estimator, "cpu", num_steps=1,
                                   has_ref=False, compute_log_probs=None, gather=None)
        lp = torch.zeros(sum(lengths), dtype=torch.float64, requires_grad=True)
        scale = prepared.step_scale(range(4))
        (prepared.loss(list(range(4)), lp, None)[0] * scale).backward()
        grads = lp.grad.split(lengths)
        for i, n in enumerate(lengths):
            divisor = 10 if per_token else n
            torch.testing.assert_close(grads[i], torch.full((n,), -float(shaped[i]) / (4 * divisor), dtype=torch.float64))


def test_shape_rewards_centres_without_std():
    table = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    shaped = DrGRPOEstimator(SimpleNamespace(n_samples_per_prompt=4)).shape_rewards(table)
    torch.testing.assert_close(shaped, table - table.mean(-1, keepdim=True))
    assert torch.all(shaped[2] == 0)  # identical rewards: no signal, no NaN
    single = DrGRPOEstimator(SimpleNamespace(n_samples_per_prompt=1)).shape_rewards(torch.tensor([[0.7], [0.2]]))
    assert torch.all(single == 0)
    # --disable-rewards-normalization is honoured as for grpo
    raw = DrGRPOEstimator(SimpleNamespace(disable_rewards_normalization=True)).shape_rewards(table)
    assert raw is table


def test_driver_checks(tiny_config_problems):
    _problems = tiny_config_problems
    assert _problems(["--advantage-estimator", "dr_grpo"]) == ""
    assert _problems(["--advantage-estimator", "dr_grpo", "--loss-scale-factor", "64"]) == ""
    assert "contradicts" in _problems(["--advantage-estimator", "dr_grpo", "--calculate-per-token-loss"])
    assert "contradicts" in _problems(["--loss-agg-mode", "seq-mean-token-sum", "--calculate-per-token-loss"])
    assert _problems(["--loss-agg-mode", "token-mean", "--calculate-per-token-loss"]) == ""
    assert "not one of" in _problems(["--loss-agg-mode", "token-sum"])
    assert "only applies" in _problems(["--loss-scale-factor", "8"])
    assert "must be > 0" in _problems(["--loss-agg-mode", "seq-mean-token-sum-norm", "--loss-scale-factor", "0"])


def test_an_explicit_mode_overrides_the_estimators_and_sets_the_step_normaliser():
    lengths = [3, 1, 4, 2]
    masks = [torch.ones(n, dtype=torch.long) for n in lengths]
    args = SimpleNamespace(eps_clip=EPS, loss_agg_mode="token-mean", n_samples_per_prompt=GROUP)
    estimator = DrGRPOEstimator(args)
    prepared = prepare_rollout(args, _data([0.5, -0.5, 0.5, -0.5], lengths, masks), estimator, "cpu", num_steps=1,
                               has_ref=False, compute_log_probs=None, gather=None)
    assert prepared.loss_agg_mode == "token-mean"
    assert prepared.step_scale(range(4)) == pytest.approx(1 / 10)  # the step's tokens, not its 4 rollouts
    per_token = SimpleNamespace(eps_clip=EPS, calculate_per_token_loss=True, n_samples_per_prompt=GROUP)
    grpo = prepare_rollout(per_token, _data([0.5, -0.5, 0.5, -0.5], lengths, masks), GRPOEstimator(per_token), "cpu",
                           num_steps=1, has_ref=False, compute_log_probs=None, gather=None)
    assert grpo.loss_agg_mode == "token-mean"


def test_per_token_normaliser_counts_a_fully_masked_sample_as_one_token():
    # slime's --calculate-per-token-loss divides by Σ_i max(1, Σ_t m_it): masks summing to 0, 10, 3 → 1+10+3
    lengths = [4, 10, 5]
    masks = [torch.zeros(4, dtype=torch.long), torch.ones(10, dtype=torch.long),
             torch.tensor([1, 0, 1, 1, 0])]
    args = SimpleNamespace(eps_clip=EPS, calculate_per_token_loss=True, n_samples_per_prompt=3)
    prepared = prepare_rollout(args, _data([1.0, 0.0, 0.5], lengths, masks), GRPOEstimator(args), "cpu",
                               num_steps=1, has_ref=False, compute_log_probs=None, gather=None)
    assert prepared.step_scale([0, 1, 2]) == pytest.approx(1 / 14)
    assert prepared.step_scale([0]) == pytest.approx(1.0)  # a step of one fully masked sample: no division by 0
    assert prepared.step_scale([1, 2]) == pytest.approx(1 / 13)

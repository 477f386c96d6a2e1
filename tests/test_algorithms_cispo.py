"""CISPO (``--advantage-estimator cispo``) through the train actors' loss path (``rl_step`` ->
``compute_rl_loss`` -> the estimator's ``policy_loss``), against an independent reimplementation of
MiniMax-M1's eq. (4)-(5) from softmax probabilities; plus its driver checks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from plugrl.core.config import ConfigError, check_config, parse_config
from plugrl.core.losses import log_probs_from_logits
from plugrl.core.plugins import load_plugins
from plugrl.core.rl_step import prepare_rollout
from plugrl.plugins.estimators.cispo import CISPOEstimator
from plugrl.plugins.estimators.grpo import GRPOEstimator

VOCAB = 7


def _data(shaped, lengths, masks, rollout_lp):
    n = len(lengths)
    return {
        "tokens": [[1] * (3 + n_) for n_ in lengths], "response_lengths": list(lengths),
        "rewards": [float(r) for r in shaped], "raw_reward": [float(r) for r in shaped],
        "loss_masks": [m.tolist() for m in masks], "rollout_log_probs": [r.tolist() for r in rollout_lp],
        "rollout_ids": list(range(n)), "rollout_mask_sums": [float(m.sum()) for m in masks],
    }


def objective(args, estimator, raw_rewards, lengths, masks, logits, old_logits, ids, group):
    """The step objective J (loss x step scale) and its metrics, as a trainer computes them."""
    shaped = estimator.shape_rewards(torch.tensor(raw_rewards).reshape(-1, group)).reshape(-1)
    old = log_probs_from_logits(old_logits, ids).detach()
    old_split = list(torch.split(old, list(lengths)))
    prepared = prepare_rollout(
        args, _data(shaped, lengths, masks, old_split), estimator, "cpu", num_steps=2, has_ref=False,
        compute_log_probs=lambda which: dict(enumerate(old_split)), gather=lambda local, n: [local[i] for i in range(n)])
    positions = list(range(len(lengths)))
    scale = prepared.step_scale(positions)
    loss, metrics = prepared.loss(positions, log_probs_from_logits(logits, ids), None)
    return loss * scale, metrics


def paper_cispo(raw_rewards, lengths, masks, logits, old_logits, ids, group, eps_low, eps_high, token_mean=False):
    """MiniMax-M1 eq. (4)-(5) from probabilities: r = π/π_old, r̂ = clip(r, 1−ε_low, 1+ε_high),
    J = −mean over responses of the masked token mean of sg(r̂)·Â·log π (``token_mean``: the paper's
    1/Σ|o_i| over all tokens, a fully masked response counting one as in
    slime), Â the GRPO advantage (group mean/std)."""
    r = torch.tensor(raw_rewards, dtype=torch.float64).reshape(-1, group)
    adv = (r - r.mean(-1, keepdim=True))
    if group > 1:
        adv = adv / (adv.std(-1, keepdim=True) + 1e-6)
    adv = adv.reshape(-1)
    p = torch.softmax(logits.double(), -1).gather(-1, ids[:, None]).squeeze(-1)
    p_old = torch.softmax(old_logits.double(), -1).gather(-1, ids[:, None]).squeeze(-1)
    clipped = (p / p_old).clamp(1 - eps_low, 1 + eps_high)
    terms = -clipped.detach() * torch.log(p)
    total, tokens, per_sample, start, clip_hits = 0.0, 0.0, [], 0, 0.0
    for i, n in enumerate(lengths):
        m = masks[i].double()
        s = (terms[start:start + n] * adv[i] * m).sum()
        total, tokens = total + s, tokens + m.sum().clamp(min=1)  # slime's per-token count: max(1, Σ m) a sample
        per_sample.append(s / m.sum().clamp(min=1))
        hit = ((p / p_old)[start:start + n] != clipped[start:start + n]).double()
        clip_hits += float((hit * m).sum() / m.sum().clamp(min=1))
        start += n
    value = total / tokens.clamp(min=1) if token_mean else torch.stack(per_sample).mean()
    return value, clip_hits / len(lengths)


def _case(seed, lengths, group, zero_mask=None):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    logits = torch.randn(total, VOCAB, generator=g, dtype=torch.float64)
    # old policy far enough away that many ratios leave [0.8, 1.28] (both clip directions)
    old_logits = logits + 0.3 * torch.randn(total, VOCAB, generator=g, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (total,), generator=g)
    masks = [(torch.rand(n, generator=g) > 0.2).long() for n in lengths]
    for m in masks:
        m[0] = 1
    if zero_mask is not None:
        masks[zero_mask] = torch.zeros(lengths[zero_mask], dtype=torch.long)
    rewards = torch.randint(0, 2, (len(lengths),), generator=g).float().tolist()
    return logits, old_logits, ids, masks, rewards


def _args(**kw):
    return SimpleNamespace(eps_clip=0.2, eps_clip_high=0.28, n_samples_per_prompt=4, **kw)


@pytest.mark.parametrize("token_mean", [False, True])
@pytest.mark.parametrize("seed,lengths,zero_mask", [(0, [5, 3, 8, 1, 4, 6, 2, 7], None),
                                                    (1, [1] * 8, None), (2, [4, 6, 3, 5, 2, 2, 9, 1], 2)])
def test_cispo_matches_the_paper_value_and_gradient(seed, lengths, zero_mask, token_mean):
    logits, old_logits, ids, masks, rewards = _case(seed, lengths, 4, zero_mask)
    args = _args(loss_agg_mode="token-mean" if token_mean else None)
    leaf = logits.clone().requires_grad_()
    J, metrics = objective(args, CISPOEstimator(args), rewards, lengths, masks, leaf, old_logits, ids, 4)
    J.backward()
    ref_leaf = logits.clone().requires_grad_()
    expected, clipfrac = paper_cispo(rewards, lengths, masks, ref_leaf, old_logits, ids, 4, 0.2, 0.28, token_mean)
    expected.backward()
    # advantages travel as fp32 (as in the trainers), hence the fp32-level tolerance
    torch.testing.assert_close(J, expected.to(J.dtype), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-6, atol=1e-9)
    if not token_mean:
        assert metrics["pg_clipfrac"] / len(lengths) == pytest.approx(clipfrac, abs=1e-6)
        assert 0.1 < clipfrac < 0.9  # the case exercises the clip, both ways
    if zero_mask is not None:  # a fully masked sample gets no gradient and no NaN
        start = sum(lengths[:zero_mask])
        assert torch.all(leaf.grad[start:start + lengths[zero_mask]] == 0)


def test_clipped_tokens_keep_their_gradient_unlike_ppo():
    """A token whose ratio is above 1 + ε_high with A > 0: PPO's clip zeroes its gradient, CISPO
    keeps −(1+ε_high)·A/|o| on its log-prob."""
    lengths, masks = [1, 1], [torch.ones(1, dtype=torch.long)] * 2
    ids = torch.tensor([0, 0])
    old_logits = torch.zeros(2, 2, dtype=torch.float64)  # π_old = 0.5
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0]], dtype=torch.float64)  # π ≈ 0.88, ratio ≈ 1.76
    for estimator, expect_zero in ((GRPOEstimator(_args()), True), (CISPOEstimator(_args()), False)):
        lp = log_probs_from_logits(logits, ids).detach().requires_grad_()
        shaped = estimator.shape_rewards(torch.tensor([[1.0, 0.0]])).reshape(-1)
        old = log_probs_from_logits(old_logits, ids)
        prepared = prepare_rollout(
            _args(), _data(shaped, lengths, masks, list(old.split(1))), estimator, "cpu", num_steps=2,
            has_ref=False, compute_log_probs=lambda which: dict(enumerate(old.split(1))),
            gather=lambda local, n: [local[i] for i in range(n)])
        loss, _ = prepared.loss([0, 1], lp, None)
        loss.backward()
        advantage = float(shaped[0])
        if expect_zero:
            assert lp.grad[0] == 0
        else:
            assert float(lp.grad[0]) == pytest.approx(-(1 + 0.28) * advantage)


def test_identical_rewards_give_no_loss_and_no_gradient():
    lengths = [3, 1, 4, 2]
    logits, old_logits, ids, masks, _ = _case(5, lengths, 4)
    leaf = logits.clone().requires_grad_()
    J, _ = objective(_args(), CISPOEstimator(_args()), [1.0] * 4, lengths, masks, leaf, old_logits, ids, 4)
    J.backward()
    assert J.item() == 0.0 and torch.all(leaf.grad == 0)


def test_on_policy_step_is_reinforce():
    """One optimizer step and no TIS: old = current, weight 1, ℓ = −A·logπ (REINFORCE with GRPO's
    advantage); the gradient is that of the plain token-mean log-likelihood weighted by A."""
    lengths, group = [2, 3, 1, 2], 4
    logits, _, ids, masks, rewards = _case(7, lengths, group)
    args = _args()
    estimator = CISPOEstimator(args)
    shaped = estimator.shape_rewards(torch.tensor(rewards).reshape(-1, group)).reshape(-1)
    zeros = [torch.zeros(n) for n in lengths]
    prepared = prepare_rollout(args, _data(shaped, lengths, masks, zeros), estimator, "cpu", num_steps=1,
                               has_ref=False, compute_log_probs=None, gather=None)
    assert prepared.old_log_probs is None  # the one-step shortcut
    lp = log_probs_from_logits(logits, ids)
    loss, metrics = prepared.loss(list(range(4)), lp, None)
    expected = sum(-float(shaped[i]) * (part * m).sum() / m.sum()
                   for i, (part, m) in enumerate(zip(lp.split(lengths), masks)))
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert metrics["pg_clipfrac"] == 0.0


def test_driver_checks():
    plugin_set = load_plugins()
    base = ["--recipe", "tiny-default", "--advantage-estimator", "cispo"]
    args = parse_config(base + ["--eps-clip", "1.0", "--eps-clip-high", "4"], plugin_set)
    check_config(args, plugin_set)
    args = parse_config(base + ["--eps-clip-c", "3"], plugin_set)
    with pytest.raises(ConfigError, match="eps-clip-c"):
        check_config(args, plugin_set)

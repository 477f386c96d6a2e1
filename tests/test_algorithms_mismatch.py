"""Rollout/train mismatch corrections beyond token TIS, through the train actors' loss path: TIS at
token/sequence/geometric level (``--tis-level``), rejection sampling (``--use-rs``: MIS, IcePop) with
its masked-token metrics, against an independent reimplementation from the definitions (ratios of
softmax probabilities, products over the sample's tokens)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from plugrl.core.losses import log_probs_from_logits
from plugrl.core.rl_step import add_scaled, prepare_rollout
from plugrl.plugins.estimators.grpo import GRPOEstimator

VOCAB, GROUP, EPS, ENT = 6, 4, 0.2, 0.01


def _probs(logits, ids):
    return torch.softmax(logits.double(), -1).gather(-1, ids[:, None]).squeeze(-1)


def trainer_objective(args, rewards, lengths, masks, logits, old_logits, rollout_logits, ids, entropy,
                      micro_batches):
    """J and the rollout's metrics as a trainer produces them (scaled sums over micro-batches)."""
    estimator = GRPOEstimator(args)
    shaped = estimator.shape_rewards(torch.tensor(rewards).reshape(-1, GROUP)).reshape(-1)
    split = list(lengths)
    old = list(log_probs_from_logits(old_logits, ids).detach().split(split))
    rollout = log_probs_from_logits(rollout_logits, ids).split(split)
    n = len(lengths)
    data = {"tokens": [[1] * (2 + k) for k in lengths], "response_lengths": split,
            "rewards": shaped.tolist(), "raw_reward": list(rewards), "loss_masks": [m.tolist() for m in masks],
            "rollout_log_probs": [r.tolist() for r in rollout], "rollout_ids": list(range(n)),
            "rollout_mask_sums": [float(m.sum()) for m in masks]}
    prepared = prepare_rollout(args, data, estimator, "cpu", num_steps=1, has_ref=False,
                               compute_log_probs=lambda which: dict(enumerate(old)),
                               gather=lambda local, k: [local[i] for i in range(k)])
    lp = list(log_probs_from_logits(logits, ids).split(split))
    ent = list(entropy.split(split))
    scale = prepared.step_scale(list(range(n)))
    total, metrics = 0.0, {}
    for mb in micro_batches:
        loss, m = prepared.loss(mb, torch.cat([lp[i] for i in mb]), torch.cat([ent[i] for i in mb]))
        total = total + loss * scale
        add_scaled(metrics, m, scale)
    return total, metrics


def reference(rewards, lengths, masks, logits, old_logits, rollout_logits, ids, entropy, tis=None, rs=None):
    """(1/G) Σ_i Σ_t m·keep·(w·ℓ_PPO − ENT·H) / Σ_t m with k_t = π_train/π_rollout, the sample's ratio
    Π_t k_t (sequence) or its |m|-th root (geometric); w = clamp(ratio, lo, hi); keep = ratio in
    [lo, hi] and (veto c) no token with k_t < c. Also the masked fraction and count."""
    r = torch.tensor(rewards, dtype=torch.float64).reshape(-1, GROUP)
    adv = ((r - r.mean(-1, keepdim=True)) / ((r - r.mean(-1, keepdim=True)).std(-1, keepdim=True) + 1e-6)).reshape(-1)
    p, p_old, p_roll = _probs(logits, ids), _probs(old_logits, ids), _probs(rollout_logits, ids)
    total, fractions, masked, start = 0.0, [], 0.0, 0
    for i, n in enumerate(lengths):
        sl = slice(start, start + n)
        m = masks[i].double()
        k = (p_old[sl] / p_roll[sl]).detach()

        def at(level):
            seq = torch.prod(torch.where(m > 0, k, torch.ones_like(k)))
            if level == "token":
                return k
            if level == "sequence":
                return seq.expand(n)
            return (seq ** (1.0 / max(1.0, float(m.sum())))).expand(n)

        rho = p[sl] / p_old[sl].detach()
        ell = -torch.minimum(rho * adv[i], rho.clamp(1 - EPS, 1 + EPS) * adv[i])
        if tis is not None:
            level, lo, hi = tis
            ell = ell * at(level).clamp(lo, hi)
        keep = torch.ones(n, dtype=torch.float64)
        if rs is not None:
            level, lo, hi, veto = rs
            ratio = at(level)
            keep = ((ratio >= lo) & (ratio <= hi)).double()
            if veto is not None and bool(((k < veto) & (m > 0)).any()):
                keep = torch.zeros(n, dtype=torch.float64)
        d = m.sum().clamp(min=1)
        total = total + ((ell - ENT * entropy[sl]) * m * keep).sum() / d
        fractions.append(float((m * (1 - keep)).sum() / d))
        masked += float((m * (1 - keep)).sum())
        start += n
    return total / len(lengths), sum(fractions) / len(lengths), masked


def _case(seed, lengths, zero_mask=None):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    logits = torch.randn(total, VOCAB, generator=g, dtype=torch.float64)
    old_logits = logits + 0.2 * torch.randn(total, VOCAB, generator=g, dtype=torch.float64)
    rollout_logits = old_logits + 0.6 * torch.randn(total, VOCAB, generator=g, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (total,), generator=g)
    masks = [(torch.rand(n, generator=g) > 0.2).long() for n in lengths]
    for m in masks:
        m[0] = 1
    if zero_mask is not None:
        masks[zero_mask] = torch.zeros(lengths[zero_mask], dtype=torch.long)
    rewards = torch.randint(0, 3, (len(lengths),), generator=g).float().tolist()
    entropy = torch.rand(total, generator=g, dtype=torch.float64)
    return logits, old_logits, rollout_logits, ids, masks, rewards, entropy


# (flags, tis reference, rs reference)
CONFIGS = {
    "tis-sequence": (dict(use_tis=True, tis_level="sequence", tis_clip=2.0, tis_clip_low=0.1),
                     ("sequence", 0.1, 2.0), None),
    "tis-geometric": (dict(use_tis=True, tis_level="geometric", tis_clip=1.2, tis_clip_low=0.9),
                      ("geometric", 0.9, 1.2), None),
    "icepop": (dict(use_tis=True, tis_clip=1.5, tis_clip_low=0.0, use_rs=True, rs_lower_bound=0.7,
                    rs_upper_bound=1.5), ("token", 0.0, 1.5), ("token", 0.7, 1.5, None)),
    "rs-token-default-bounds": (dict(use_rs=True, tis_clip=1.6), None, ("token", 1 / 1.6, 1.6, None)),
    "mis-sequence": (dict(use_tis=True, tis_level="sequence", tis_clip=3.0, use_rs=True, rs_level="sequence",
                          rs_lower_bound=0.4, rs_upper_bound=3.0), ("sequence", 0.0, 3.0), ("sequence", 0.4, 3.0, None)),
    "rs-geometric-veto": (dict(use_rs=True, rs_level="geometric", rs_lower_bound=0.8, rs_upper_bound=1.25,
                               rs_veto_threshold=0.4), None, ("geometric", 0.8, 1.25, 0.4)),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("seed,lengths,zero_mask", [(0, [5, 3, 8, 1, 4, 6, 2, 7], None), (1, [1] * 8, None),
                                                    (2, [4, 6, 3, 5, 2, 2, 9, 1], 3)])
def test_mismatch_corrections_match_their_definitions(config, seed, lengths, zero_mask):
    flags, tis, rs = CONFIGS[config]
    logits, old_logits, rollout_logits, ids, masks, rewards, entropy = _case(seed, lengths, zero_mask)
    args = SimpleNamespace(eps_clip=EPS, entropy_coef=ENT, n_samples_per_prompt=GROUP, **flags)
    leaf = logits.clone().requires_grad_()
    J, metrics = trainer_objective(args, rewards, lengths, masks, leaf, old_logits, rollout_logits, ids, entropy,
                                   micro_batches=[[0, 1, 2], [3, 4], [5, 6, 7]])
    J.backward()
    ref = logits.clone().requires_grad_()
    expected, fraction, count = reference(rewards, lengths, masks, ref, old_logits, rollout_logits, ids, entropy,
                                          tis, rs)
    expected.backward()
    torch.testing.assert_close(J, expected.to(J.dtype), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-6, atol=1e-9)
    if rs is None:
        assert "rs_masked_tokens" not in metrics
    else:
        assert metrics["rs_masked_fraction"] == pytest.approx(fraction, abs=1e-6)
        assert metrics["rs_masked_tokens"] == pytest.approx(count, abs=1e-6)
        assert metrics["rs_masked_fraction_low"] + metrics["rs_masked_fraction_high"] <= fraction + 1e-6


def test_the_cases_mask_something_but_not_everything():
    """Guards the test above from passing vacuously: its token and sequence cases reject some tokens."""
    logits, old_logits, rollout_logits, ids, masks, rewards, entropy = _case(0, [5, 3, 8, 1, 4, 6, 2, 7])
    for config in ("icepop", "mis-sequence", "rs-geometric-veto"):
        _, _, rs = CONFIGS[config]
        _, fraction, count = reference(rewards, [5, 3, 8, 1, 4, 6, 2, 7], masks, logits, old_logits, rollout_logits,
                                       ids, entropy, None, rs)
        assert 0.05 < fraction < 0.95 and count >= 1, (config, fraction)


def test_masked_tokens_are_counted_over_steps_and_micro_batches():
    """Two optimizer steps, uneven micro-batches: rs_masked_tokens is the rollout's total count and
    rs_masked_samples the number of samples with a masked token."""
    lengths = [5, 3, 8, 1, 4, 6, 2, 7]
    logits, old_logits, rollout_logits, ids, masks, rewards, entropy = _case(0, lengths)
    args = SimpleNamespace(eps_clip=EPS, n_samples_per_prompt=GROUP, use_rs=True, rs_lower_bound=0.7,
                           rs_upper_bound=1.5)
    estimator = GRPOEstimator(args)
    old = list(log_probs_from_logits(old_logits, ids).split(lengths))
    rollout = list(log_probs_from_logits(rollout_logits, ids).split(lengths))
    data = {"tokens": [[1] * (2 + k) for k in lengths], "response_lengths": lengths, "rewards": rewards,
            "raw_reward": rewards, "loss_masks": [m.tolist() for m in masks],
            "rollout_log_probs": [r.tolist() for r in rollout], "rollout_ids": list(range(8)),
            "rollout_mask_sums": [float(m.sum()) for m in masks]}
    prepared = prepare_rollout(args, data, estimator, "cpu", num_steps=2, has_ref=False,
                               compute_log_probs=lambda which: dict(enumerate(old)),
                               gather=lambda local, k: [local[i] for i in range(k)])
    lp = log_probs_from_logits(logits, ids).split(lengths)
    totals = {}
    for step in ([[0, 1], [2], [3]], [[4, 5, 6], [7]]):
        scale = prepared.step_scale([p for mb in step for p in mb])
        step_metrics = {}
        for mb in step:
            add_scaled(step_metrics, prepared.loss(mb, torch.cat([lp[i] for i in mb]), None)[1], scale)
        add_scaled(totals, step_metrics, 1 / 2)
    k = [(o - r).exp() for o, r in zip(old, rollout)]
    out = [((kk < 0.7) | (kk > 1.5)).double() * m for kk, m in zip(k, masks)]
    assert totals["rs_masked_tokens"] == pytest.approx(float(sum(o.sum() for o in out)), abs=1e-6)
    assert totals["rs_masked_samples"] == pytest.approx(float(sum(bool(o.sum() > 0) for o in out)), abs=1e-6)


def test_no_mismatch_masks_nothing_and_changes_nothing():
    lengths = [3, 1, 4, 2]
    logits, old_logits, _, ids, masks, rewards, entropy = _case(4, lengths)
    # plain token TIS (weight 1 here) so that both recompute the old log-probs
    base = SimpleNamespace(eps_clip=EPS, entropy_coef=ENT, n_samples_per_prompt=GROUP, use_tis=True)
    rs = SimpleNamespace(**{**vars(base), "tis_level": "sequence"}, use_rs=True, rs_level="sequence",
                         rs_veto_threshold=1e-4)
    J0, _ = trainer_objective(base, rewards, lengths, masks, logits, old_logits, old_logits, ids, entropy, [[0, 1, 2, 3]])
    J1, metrics = trainer_objective(rs, rewards, lengths, masks, logits, old_logits, old_logits, ids, entropy,
                                    [[0, 1, 2, 3]])
    torch.testing.assert_close(J0, J1)
    assert metrics["rs_masked_tokens"] == 0 and metrics["tis_clipfrac"] == 0


def test_a_huge_sequence_ratio_neither_overflows_nor_nans():
    """A 400-token sample with log-ratio 1 per token: Π k = e^400 (inf in fp32). TIS bounds it to the
    clip; rejection compares in log space."""
    n = 400
    lengths, masks = [n, 1, 1, 1], [torch.ones(n, dtype=torch.long)] + [torch.ones(1, dtype=torch.long)] * 3
    ids = torch.zeros(n + 3, dtype=torch.long)
    old_logits = torch.zeros(n + 3, 2, dtype=torch.float64)
    old_logits[:n, 0] = 3.0
    rollout_logits = torch.zeros(n + 3, 2, dtype=torch.float64)
    args = SimpleNamespace(eps_clip=EPS, n_samples_per_prompt=GROUP, use_tis=True, tis_level="sequence",
                           use_rs=True, rs_level="sequence", rs_upper_bound=math.exp(50.0))
    leaf = old_logits.clone().requires_grad_()
    J, metrics = trainer_objective(args, [1.0, 0.0, 0.0, 0.0], lengths, masks, leaf, old_logits, rollout_logits, ids,
                                   torch.zeros(n + 3, dtype=torch.float64), [[0, 1, 2, 3]])
    J.backward()
    assert torch.isfinite(J) and torch.isfinite(leaf.grad).all()
    assert metrics["rs_masked_samples"] == 1 and metrics["rs_masked_tokens"] == n


def test_driver_checks(tiny_config_problems):
    _problems = tiny_config_problems
    assert _problems(["--use-tis", "--tis-level", "sequence", "--use-rs", "--rs-level", "geometric",
                      "--rs-lower-bound", "0.5", "--rs-upper-bound", "2", "--rs-veto-threshold", "1e-4"]) == ""
    assert "not one of" in _problems(["--use-tis", "--tis-level", "seq"])
    assert "not one of" in _problems(["--use-rs", "--rs-level", "tokens"])
    assert "--rs-upper-bound only applies with --use-rs" in _problems(["--rs-upper-bound", "2"])
    assert "--rs-level only applies with --use-rs" in _problems(["--rs-level", "sequence"])
    assert "--rs-lower-bound, --rs-level only apply with --use-rs" in _problems(["--rs-lower-bound", "0.5",
                                                                                 "--rs-level", "geometric"])
    assert "only applies with --use-tis" in _problems(["--tis-level", "sequence"])
    assert "lower < upper" in _problems(["--use-rs", "--rs-lower-bound", "2", "--rs-upper-bound", "1.5"])
    assert "keep one" in _problems(["--use-rs", "--use-rollout-logprobs"])
    assert "(0, 1)" in _problems(["--use-rs", "--rs-veto-threshold", "2"])

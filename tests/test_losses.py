"""Closed-form and small-reference checks of plugrl.core.losses (CPU)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from plugrl.core.losses import (
    approx_kl,
    compute_rl_loss,
    entropy_from_logits,
    log_probs_from_logits,
    per_token_reducer,
    policy_loss,
    sample_mean_reducer,
    sequence_level_ppo_kl,
    tis_weights,
)


def _ratio_inputs(ratio, adv):
    ratio = torch.tensor(ratio, dtype=torch.float64)
    old = torch.zeros_like(ratio)
    return ratio.log(), old, torch.tensor(adv, dtype=torch.float64)


# ---- policy loss -------------------------------------------------------------------------------------


def test_dual_clip_reference_values():
    logp, old, adv = _ratio_inputs([2.0, 2.0, 0.5], [2.0, -2.0, 2.0])
    loss, clipfrac, ppo_kl = policy_loss(logp, old, adv, eps_clip=0.2, eps_clip_c=1.5)
    torch.testing.assert_close(loss, torch.tensor([-2.4, 3.0, -1.0], dtype=torch.float64))
    # token 0: clipped term -2.4 > -4 -> clipped; token 1: 2.4 < 4 -> not; token 2: -1.6 < -1 -> not
    torch.testing.assert_close(clipfrac, torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(ppo_kl, old - logp)


def test_without_dual_clip_negative_advantage_is_unbounded():
    logp, old, adv = _ratio_inputs([2.0, 2.0, 0.5], [2.0, -2.0, 2.0])
    loss, _, _ = policy_loss(logp, old, adv, eps_clip=0.2)
    torch.testing.assert_close(loss, torch.tensor([-2.4, 4.0, -1.0], dtype=torch.float64))


def test_dual_clip_constant_must_exceed_one():
    logp, old, adv = _ratio_inputs([1.0], [1.0])
    with pytest.raises(ValueError, match="--eps-clip-c"):
        policy_loss(logp, old, adv, eps_clip=0.2, eps_clip_c=1.0)


def test_asymmetric_clip_values_and_clipfrac():
    # eps_low 0.2, eps_high 0.28: bounds [0.8, 1.28]
    ratios = [1.5, 1.25, 0.5, 0.5, 1.5, 0.9]
    advs = [1.0, 1.0, 1.0, -1.0, -1.0, 1.0]
    logp, old, adv = _ratio_inputs(ratios, advs)
    loss, clipfrac, _ = policy_loss(logp, old, adv, eps_clip=0.2, eps_clip_high=0.28)
    expected = []
    expected_clip = []
    for r, a in zip(ratios, advs):
        l1 = -r * a
        l2 = -min(max(r, 0.8), 1.28) * a
        expected.append(max(l1, l2))
        expected_clip.append(float(l2 > l1))
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(clipfrac, torch.tensor(expected_clip))
    # closed form: A>0 clips only above 1.28, A<0 only below 0.8
    assert expected == pytest.approx([-1.28, -1.25, -0.5, 0.8, 1.5, -0.9])
    assert expected_clip == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]


def test_ratio_one_gives_minus_advantage_and_zero_kl():
    adv = torch.tensor([0.3, -1.2, 2.0])
    logp = torch.tensor([-1.0, -2.0, -0.5])
    loss, clipfrac, ppo_kl = policy_loss(logp, logp.clone(), adv, eps_clip=0.2, eps_clip_high=0.28)
    torch.testing.assert_close(loss, -adv)
    assert clipfrac.sum() == 0 and ppo_kl.abs().sum() == 0


# ---- KL estimators -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "low_var_kl"])
def test_kl_estimators_closed_form(kind):
    logp = torch.tensor([-1.0, -0.5, -2.0, -3.0])
    base = torch.tensor([-1.5, -0.5, -1.0, -2.0])
    expected = []
    for a, b in zip(logp.tolist(), base.tolist()):
        d = a - b
        expected.append({"k1": d, "k2": d * d / 2, "k3": math.exp(-d) - 1 + d, "low_var_kl": math.exp(-d) - 1 + d}[kind])
    torch.testing.assert_close(approx_kl(logp, base, kind), torch.tensor(expected))


def test_only_low_var_kl_is_clamped():
    logp = torch.tensor([-20.0, 0.0])
    base = torch.tensor([0.0, -20.0])  # Δ = -20 -> exp(20) - 21 ~ 4.85e8 ; Δ = 20 -> 19 + e^-20
    k3 = approx_kl(logp, base, "k3")
    low = approx_kl(logp, base, "low_var_kl")
    assert k3[0].item() == pytest.approx(math.exp(20.0) - 21.0, rel=1e-5)
    assert k3[1].item() == pytest.approx(19.0 + math.exp(-20.0), rel=1e-6)
    torch.testing.assert_close(low, torch.tensor([10.0, 10.0]))
    # k1 negative values are not clamped either
    assert approx_kl(logp, base, "k1")[0].item() == -20.0


def test_kl_importance_ratio_multiplies_before_clamp():
    logp, base = torch.tensor([-1.0]), torch.tensor([-2.0])
    ratio = torch.tensor([3.0])
    d = 1.0
    assert approx_kl(logp, base, "k3", importance_ratio=ratio).item() == pytest.approx(3 * (math.exp(-d) - 1 + d), rel=1e-6)


def test_unknown_kl_type_names_the_flag():
    with pytest.raises(ValueError, match="--kl-loss-type"):
        approx_kl(torch.zeros(1), torch.zeros(1), "k4")


# ---- log-probs and entropy from logits --------------------------------------------------------------


def _manual_log_softmax(logits, temperature):
    z = logits.double() / temperature
    return z - z.exp().sum(-1, keepdim=True).log()


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_log_probs_and_entropy_match_manual_softmax(temperature, chunk_size):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g) * 3
    target = torch.randint(0, 11, (2, 5), generator=g)
    logp = log_probs_from_logits(logits, target, temperature, chunk_size=chunk_size)
    ref = _manual_log_softmax(logits, temperature)
    assert logp.dtype == torch.float32 and logp.shape == (2, 5)
    torch.testing.assert_close(logp.double(), ref.gather(-1, target[..., None]).squeeze(-1), atol=1e-5, rtol=1e-5)
    ent = entropy_from_logits(logits, temperature, chunk_size=chunk_size)
    p = ref.exp()
    torch.testing.assert_close(ent.double(), -(p * ref).sum(-1), atol=1e-5, rtol=1e-5)


def test_bf16_logits_are_computed_in_fp32_and_get_bf16_grads():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(4, 7, generator=g) * 2).to(torch.bfloat16).requires_grad_()
    target = torch.tensor([0, 3, 6, 2])
    logp = log_probs_from_logits(logits, target)
    assert logp.dtype == torch.float32
    ref = _manual_log_softmax(logits.detach().float(), 1.0).gather(-1, target[:, None]).squeeze(-1)
    torch.testing.assert_close(logp.double(), ref, atol=1e-5, rtol=1e-5)
    logp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_log_prob_and_entropy_gradients(temperature):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 6, (5,), generator=g)
    assert torch.autograd.gradcheck(lambda x: log_probs_from_logits(x, target, temperature, chunk_size=2), (logits,))
    assert torch.autograd.gradcheck(lambda x: entropy_from_logits(x, temperature, chunk_size=2), (logits,))
    # and against autograd through the plain formula
    w = torch.randn(5, generator=g, dtype=torch.float64)
    (log_probs_from_logits(logits, target, temperature) * w).sum().backward()
    grad_custom = logits.grad.clone()
    logits.grad = None
    (torch.log_softmax(logits / temperature, -1).gather(-1, target[:, None]).squeeze(-1) * w).sum().backward()
    torch.testing.assert_close(grad_custom, logits.grad)


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature"):
        log_probs_from_logits(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long), 0.0)


# ---- TIS ---------------------------------------------------------------------------------------------


def test_tis_weights_clamp_and_metrics():
    train = torch.tensor([0.0, math.log(3.0), math.log(0.5), math.log(0.1)])
    rollout = torch.zeros(4)
    w, m = tis_weights(train, rollout, clip=2.0, clip_low=0.2)
    torch.testing.assert_close(w, torch.tensor([1.0, 2.0, 0.5, 0.2]))
    torch.testing.assert_close(m["tis"], torch.tensor([1.0, 3.0, 0.5, 0.1]))
    torch.testing.assert_close(m["tis_clipfrac"], torch.tensor([0.0, 1.0, 0.0, 1.0]))
    torch.testing.assert_close(m["tis_abs"], torch.tensor([0.0, 2.0, 0.5, 0.9]))
    w_default, _ = tis_weights(train, rollout)
    torch.testing.assert_close(w_default, torch.tensor([1.0, 2.0, 0.5, 0.1]))


# ---- reducers ----------------------------------------------------------------------------------------


def test_sample_mean_reducer_closed_form():
    masks = [torch.tensor([1, 1, 0]), torch.tensor([0, 1, 1, 1, 1])]
    x = torch.tensor([1.0, 3.0, 100.0, 100.0, 2.0, 4.0, 6.0, 8.0])
    reduce = sample_mean_reducer(masks, None)
    assert reduce(x).item() == pytest.approx((1 + 3) / 2 + (2 + 4 + 6 + 8) / 4)
    # explicit rollout-level denominators
    reduce = sample_mean_reducer(masks, [4.0, 10.0])
    assert reduce(x).item() == pytest.approx((1 + 3) / 4 + (2 + 4 + 6 + 8) / 10)
    # an all-masked sample divides by max(1, 0) and contributes 0
    reduce = sample_mean_reducer([torch.tensor([0, 0]), torch.tensor([1])], [0.0, 1.0])
    assert reduce(torch.tensor([5.0, 5.0, 7.0])).item() == pytest.approx(7.0)


def test_per_token_reducer_closed_form():
    masks = [torch.tensor([1, 1, 0]), torch.tensor([0, 1])]
    x = torch.tensor([1.0, 3.0, 100.0, 100.0, 2.0])
    assert per_token_reducer(masks)(x).item() == pytest.approx(6.0)


def _cfg(**kw):
    base = dict(
        loss_type="policy_loss", eps_clip=0.2, eps_clip_high=0.28, eps_clip_c=None, use_kl_loss=False,
        kl_loss_coef=0.0, kl_loss_type="low_var_kl", entropy_coef=0.0, use_tis=False, tis_clip=2.0,
        tis_clip_low=0.0, calculate_per_token_loss=False,
    )
    base.update(kw)
    return SimpleNamespace(**base)


def _rollouts(seed=0):
    """Three rollouts of different lengths with masks, advantages, old/rollout/ref log-probs."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for length, adv in [(3, 1.5), (5, -0.7), (4, 0.4)]:
        mask = (torch.rand(length, generator=g) > 0.25).long()
        mask[0] = 1
        out.append(dict(
            mask=mask,
            logp=torch.randn(length, generator=g, dtype=torch.float64) * 0.3 - 1.0,
            old=torch.randn(length, generator=g, dtype=torch.float64) * 0.3 - 1.0,
            adv=torch.full((length,), adv, dtype=torch.float64),
            ent=torch.rand(length, generator=g, dtype=torch.float64),
        ))
    return out


def _micro_batch_loss(pieces, cfg, G):
    """pieces: list of (rollout, start, end); all in one micro-batch. Returns loss / G and grads."""
    logp = torch.cat([r["logp"][s:e] for r, s, e in pieces]).requires_grad_()
    loss, metrics = compute_rl_loss(
        logp,
        old_log_probs=torch.cat([r["old"][s:e] for r, s, e in pieces]),
        advantages=torch.cat([r["adv"][s:e] for r, s, e in pieces]),
        entropy=torch.cat([r["ent"][s:e] for r, s, e in pieces]),
        loss_masks=[r["mask"][s:e] for r, s, e in pieces],
        response_lengths=[e - s for _, s, e in pieces],
        mask_sums=[float(r["mask"].sum()) for r, _, _ in pieces],
        config=cfg,
    )
    (loss / G).backward()
    return (loss / G).item(), logp.grad, metrics


def test_sample_mean_objective_is_independent_of_micro_batch_split():
    rollouts = _rollouts()
    cfg = _cfg(entropy_coef=0.01)
    G = len(rollouts)

    # direct formula: (1/G) Σ_rollouts mean_t ℓ  (masked token mean), entropy included
    direct = 0.0
    for r in rollouts:
        l, _, _ = policy_loss(r["logp"], r["old"], r["adv"], eps_clip=0.2, eps_clip_high=0.28)
        m = r["mask"].double()
        direct += ((l * m).sum() / m.sum() - 0.01 * (r["ent"] * m).sum() / m.sum()).item()
    direct /= G

    r0, r1, r2 = rollouts
    splits = {
        "one": [[(r0, 0, 3), (r1, 0, 5), (r2, 0, 4)]],
        "two": [[(r0, 0, 3), (r1, 0, 5)], [(r2, 0, 4)]],
        # rollout 1 split across two micro-batches; its pieces use the rollout's mask sum
        "split": [[(r0, 0, 3), (r1, 0, 2)], [(r1, 2, 5), (r2, 0, 4)]],
    }
    grads = {}
    for name, micro_batches in splits.items():
        total, grad_of = 0.0, torch.zeros(sum(len(r["mask"]) for r in rollouts), dtype=torch.float64)
        starts = [0, 3, 8]  # offset of each rollout in the concatenation r0|r1|r2
        for mb in micro_batches:
            value, grad, _ = _micro_batch_loss(mb, cfg, G)
            total += value
            offset = 0
            for r, s, e in mb:
                base = starts[[id(x) for x in rollouts].index(id(r))]
                grad_of[base + s: base + e] = grad[offset: offset + e - s]
                offset += e - s
        assert total == pytest.approx(direct, rel=1e-10), name
        grads[name] = grad_of
    torch.testing.assert_close(grads["one"], grads["two"])
    torch.testing.assert_close(grads["one"], grads["split"])


def test_per_token_mode_sums_masked_tokens():
    rollouts = _rollouts(1)
    cfg = _cfg(calculate_per_token_loss=True)
    pieces = [(r, 0, len(r["mask"])) for r in rollouts]
    value, _, metrics = _micro_batch_loss(pieces, cfg, 1)
    expected = 0.0
    for r in rollouts:
        l, _, _ = policy_loss(r["logp"], r["old"], r["adv"], eps_clip=0.2, eps_clip_high=0.28)
        expected += (l * r["mask"].double()).sum().item()
    assert value == pytest.approx(expected, rel=1e-10)
    assert metrics["pg_loss"] == pytest.approx(expected, rel=1e-6)


def test_gradient_flows_only_through_log_probs():
    rollouts = _rollouts(2)
    n = sum(len(r["mask"]) for r in rollouts)
    logp = torch.cat([r["logp"] for r in rollouts]).requires_grad_()
    others = {k: torch.randn(n, dtype=torch.float64).requires_grad_() for k in ("old", "adv", "ref", "rollout")}
    cfg = _cfg(use_kl_loss=True, kl_loss_coef=0.1, use_tis=True)
    loss, metrics = compute_rl_loss(
        logp,
        old_log_probs=others["old"] * 0.1 - 1.0,
        advantages=others["adv"],
        ref_log_probs=others["ref"] * 0.1 - 1.0,
        rollout_log_probs=others["rollout"] * 0.1 - 1.0,
        loss_masks=[r["mask"] for r in rollouts],
        response_lengths=[len(r["mask"]) for r in rollouts],
        mask_sums=[float(r["mask"].sum()) for r in rollouts],
        config=cfg,
    )
    loss.backward()
    assert logp.grad is not None and logp.grad.abs().sum() > 0
    for name, t in others.items():
        assert t.grad is None, name
    for key in ("loss", "pg_loss", "entropy_loss", "pg_clipfrac", "ppo_kl", "kl_loss",
                "train_rollout_logprob_abs_diff", "tis", "tis_clipfrac"):
        assert isinstance(metrics[key], float), key
    assert metrics["loss"] == pytest.approx(loss.item())
    assert metrics["loss"] == pytest.approx(metrics["pg_loss"] + 0.1 * metrics["kl_loss"])


def test_kl_loss_and_metrics_closed_form():
    logp = torch.tensor([-1.0, -2.0, -0.5, -1.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.5, -2.0, -1.0, -3.0], dtype=torch.float64)
    rollout = torch.tensor([-1.1, -2.0, -0.2, -1.0], dtype=torch.float64)
    masks = [torch.tensor([1, 1]), torch.tensor([1, 0])]
    cfg = _cfg(use_kl_loss=True, kl_loss_coef=0.5, kl_loss_type="k1")
    loss, metrics = compute_rl_loss(
        logp, advantages=torch.tensor([1.0, 1.0, -1.0, -1.0]), ref_log_probs=ref, rollout_log_probs=rollout,
        loss_masks=masks, response_lengths=[2, 2], mask_sums=[2, 1], config=cfg,
    )
    # old = None -> ratio 1: pg = -A, per-sample means: -1 and +1
    assert metrics["pg_loss"] == pytest.approx(0.0)
    assert metrics["ppo_kl"] == pytest.approx(0.0) and metrics["pg_clipfrac"] == 0.0
    # k1 = logp - ref: sample 0 mean (0.5 + 0)/2, sample 1 (0.5)/1
    assert metrics["kl_loss"] == pytest.approx(0.25 + 0.5)
    assert metrics["train_rollout_logprob_abs_diff"] == pytest.approx((0.1 + 0.0) / 2 + 0.3)
    assert loss.item() == pytest.approx(0.5 * 0.75)
    assert metrics["entropy_loss"] == 0.0


@pytest.mark.parametrize("entropy_coef", [0.0, 0.25])
def test_entropy_gets_a_gradient_only_when_it_is_in_the_loss(entropy_coef):
    """With --entropy-coef 0 the entropy is a metric: the same value is logged, but the backward never
    reaches it (the log-prob kernels then skip their entropy terms); otherwise its gradient is
    -coef times the reduction's weights (each sample's token mean, summed over samples; the step
    divides by the sample count later)."""
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    entropy = torch.tensor([0.5, 1.5, 2.0], dtype=torch.float64, requires_grad=True)
    loss, metrics = compute_rl_loss(
        logp, advantages=torch.tensor([1.0, 1.0, -1.0]), entropy=entropy, loss_masks=[torch.tensor([1, 1]),
                                                                                     torch.tensor([1])],
        response_lengths=[2, 1], mask_sums=[2, 1], config=_cfg(entropy_coef=entropy_coef))
    # per-sample means (0.5 + 1.5) / 2 and 2.0, summed
    assert metrics["entropy_loss"] == pytest.approx(3.0)
    loss.backward()
    if entropy_coef == 0.0:
        assert entropy.grad is None
    else:  # d(sum of per-sample means)/d entropy = [1/2, 1/2, 1]
        torch.testing.assert_close(entropy.grad, -entropy_coef * torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64))


def test_tis_multiplies_the_policy_loss():
    logp = torch.tensor([-1.0, -1.0], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    rollout = torch.tensor([-1.0 - math.log(3.0), -1.0 + math.log(2.0)], dtype=torch.float64)
    cfg = _cfg(use_tis=True, tis_clip=2.0)
    _, metrics = compute_rl_loss(
        logp, old_log_probs=old, advantages=torch.tensor([1.0, 1.0]), rollout_log_probs=rollout,
        loss_masks=[torch.tensor([1, 1])], response_lengths=[2], mask_sums=[2], config=cfg,
    )
    # weights: clamp(3) = 2 and 0.5; ℓ = -1 each -> mean(-2, -0.5)
    assert metrics["pg_loss"] == pytest.approx(-1.25)
    assert metrics["tis"] == pytest.approx((3.0 + 0.5) / 2)
    assert metrics["tis_clipfrac"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="--use-tis"):
        compute_rl_loss(logp, old_log_probs=old, advantages=torch.ones(2), loss_masks=[torch.ones(2)],
                        response_lengths=[2], mask_sums=[2], config=cfg)


def test_sft_loss_is_negative_mean_log_prob():
    logp = torch.tensor([-1.0, -3.0, -2.0, -4.0, -8.0], requires_grad=True)
    masks = [torch.tensor([1, 1]), torch.tensor([1, 1, 0])]
    loss, metrics = compute_rl_loss(
        logp, loss_masks=masks, response_lengths=[2, 3], mask_sums=[2, 2], config=_cfg(loss_type="sft_loss"),
    )
    assert loss.item() == pytest.approx(2.0 + 3.0)
    assert metrics["loss"] == pytest.approx(5.0)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-0.5, -0.5, -0.5, -0.5, 0.0]))


def test_unknown_loss_type_and_length_mismatch():
    with pytest.raises(ValueError, match="--loss-type"):
        compute_rl_loss(torch.zeros(2), advantages=torch.zeros(2), loss_masks=[torch.ones(2)],
                        response_lengths=[2], config=_cfg(loss_type="value"))
    with pytest.raises(ValueError, match="response_lengths"):
        compute_rl_loss(torch.zeros(3), advantages=torch.zeros(3), loss_masks=[torch.ones(2)],
                        response_lengths=[2], config=_cfg())


# ---- GSPO -------------------------------------------------------------------------------------------


def test_sequence_level_ppo_kl_is_masked_sample_mean():
    old = torch.tensor([-1.0, -1.0, -1.0, -2.0, -2.0])
    logp = torch.tensor([-1.2, -0.6, -5.0, -2.5, -1.0])
    masks = [torch.tensor([1, 1, 0]), torch.tensor([1, 1])]
    s = sequence_level_ppo_kl(old, logp, masks, [3, 2])
    s0 = (0.2 + -0.4) / 2
    s1 = (0.5 + -1.0) / 2
    torch.testing.assert_close(s, torch.tensor([s0, s0, s0, s1, s1]))


def test_gspo_sequence_ratio_in_compute_rl_loss():
    old = torch.tensor([-1.0, -1.0, -2.0, -2.0], dtype=torch.float64)
    logp = torch.tensor([-0.5, -0.9, -2.0, -1.0], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    masks = [torch.tensor([1, 1]), torch.tensor([1, 1])]
    _, metrics = compute_rl_loss(logp, old_log_probs=old, advantages=adv, loss_masks=masks,
                                 response_lengths=[2, 2], mask_sums=[2, 2], config=_cfg(),
                                 sequence_level_ratio=True)
    # sample 0: s = (-0.5 - 0.1)/2 = -0.3 -> ρ = e^0.3 = 1.3499 > 1.28 -> clipped, ℓ = -1.28 on both tokens
    # sample 1: s = (0 - 1)/2 = -0.5 -> ρ = e^0.5 = 1.6487, A<0 -> ℓ = max(1.6487, 1.28) = 1.6487
    assert metrics["pg_loss"] == pytest.approx(-1.28 + math.exp(0.5), rel=1e-6)
    assert metrics["pg_clipfrac"] == pytest.approx(1.0)
    assert metrics["ppo_kl"] == pytest.approx(-0.3 - 0.5)
    # token-level ratio gives a different loss (so the flag matters)
    _, token_metrics = compute_rl_loss(logp, old_log_probs=old, advantages=adv, loss_masks=masks,
                                       response_lengths=[2, 2], mask_sums=[2, 2], config=_cfg())
    assert token_metrics["pg_loss"] != pytest.approx(metrics["pg_loss"])


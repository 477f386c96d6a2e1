"""Advantage estimators against hand computations and serial reference loops (CPU)."""

from __future__ import annotations

import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from plugrl.core.plugins import make_plugin_manager
from plugrl.core.protocols import AdvantageEstimator, AdvantageInputs
from plugrl.plugins.estimators.grpo import GRPOEstimator, group_normalize
from plugrl.plugins.estimators.gspo import GSPOEstimator
from plugrl.plugins.estimators.ppo import PPOEstimator
from plugrl.plugins.estimators.reinforce import ReinforcePlusPlusBaselineEstimator, ReinforcePlusPlusEstimator
from plugrl.plugins.estimators.returns import discounted_cumsum, gae, whiten_advantages
from plugrl.plugins.estimators.rloo import RLOOEstimator

ALL_NAMES = {
    "grpo": GRPOEstimator,
    "gspo": GSPOEstimator,
    "reinforce_plus_plus": ReinforcePlusPlusEstimator,
    "reinforce_plus_plus_baseline": ReinforcePlusPlusBaselineEstimator,
    "rloo": RLOOEstimator,
    "ppo": PPOEstimator,
}

TABLE = [[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]]


def _inputs(rewards, lengths, masks=None, kl=None, values=None):
    masks = masks or [torch.ones(n, dtype=torch.long) for n in lengths]
    return AdvantageInputs(rewards=rewards, loss_masks=masks, response_lengths=lengths, kl=kl, values=values)


# ---- GRPO family -------------------------------------------------------------------------------------


def test_grpo_group_normalisation_by_hand():
    est = GRPOEstimator(SimpleNamespace(n_samples_per_prompt=4))
    out = est.shape_rewards(torch.tensor(TABLE))
    # group 0: mean 0.5, centred ±0.5, unbiased std sqrt(4·0.25/3) = sqrt(1/3)
    s0 = math.sqrt(1.0 / 3.0) + 1e-6
    # group 1: mean 0.75, centred [.25,.25,.25,-.75], unbiased var (3·.0625+.5625)/3 = .25 -> std .5
    s1 = 0.5 + 1e-6
    expected = torch.tensor([[0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0],
                             [0.25 / s1, 0.25 / s1, 0.25 / s1, -0.75 / s1]])
    torch.testing.assert_close(out, expected)
    assert out.dtype == torch.float32


def test_grpo_constant_group_gives_zero_not_nan():
    out = GRPOEstimator(SimpleNamespace()).shape_rewards(torch.tensor([[1.0, 1.0, 1.0]]))
    torch.testing.assert_close(out, torch.zeros(1, 3))


def test_dr_grpo_only_centres():
    est = GRPOEstimator(SimpleNamespace(disable_grpo_std_normalization=True, n_samples_per_prompt=4))
    out = est.shape_rewards(torch.tensor(TABLE))
    torch.testing.assert_close(out, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75]]))


def test_grpo_n1_disables_std():
    est = GRPOEstimator(SimpleNamespace(n_samples_per_prompt=1))
    # one sample per prompt: centring on itself gives zero, and no NaN from a 1-element std
    torch.testing.assert_close(est.shape_rewards(torch.tensor([[1.0], [0.0]])), torch.zeros(2, 1))
    # whole batch handed over as one group (slime's fallback) with n=1: centred, not divided by std
    torch.testing.assert_close(est.shape_rewards(torch.tensor([[1.0, 0.0, 0.0, 1.0]])),
                               torch.tensor([[0.5, -0.5, -0.5, 0.5]]))


def test_grpo_disable_rewards_normalization_is_identity():
    est = GRPOEstimator(SimpleNamespace(disable_rewards_normalization=True))
    rewards = torch.tensor(TABLE)
    torch.testing.assert_close(est.shape_rewards(rewards), rewards)


def test_group_normalize_keeps_1d_shape():
    out = group_normalize(torch.tensor([2.0, 0.0]), std_normalize=True)
    s = math.sqrt(2.0) + 1e-6  # unbiased std of [1, -1]
    torch.testing.assert_close(out, torch.tensor([1.0 / s, -1.0 / s]))


@pytest.mark.parametrize("cls", [GRPOEstimator, GSPOEstimator, RLOOEstimator])
def test_constant_advantage_per_token(cls):
    adv, ret = cls(SimpleNamespace()).compute(_inputs([0.5, -1.25], [3, 2]))
    torch.testing.assert_close(adv[0], torch.full((3,), 0.5))
    torch.testing.assert_close(adv[1], torch.full((2,), -1.25))
    torch.testing.assert_close(ret[0], adv[0])


def test_gspo_shapes_like_grpo_and_asks_for_sequence_ratio():
    args = SimpleNamespace(n_samples_per_prompt=4)
    torch.testing.assert_close(GSPOEstimator(args).shape_rewards(torch.tensor(TABLE)),
                               GRPOEstimator(args).shape_rewards(torch.tensor(TABLE)))
    assert getattr(GSPOEstimator(args), "sequence_level_ratio", False) is True
    for name, cls in ALL_NAMES.items():
        if name != "gspo":
            assert getattr(cls(args), "sequence_level_ratio", False) is False, name


# ---- RLOO --------------------------------------------------------------------------------------------


def test_rloo_leave_one_out_closed_form():
    out = RLOOEstimator(SimpleNamespace(n_samples_per_prompt=4)).shape_rewards(torch.tensor(TABLE))
    expected = [[r - (sum(row) - r) / 3 for r in row] for row in TABLE]
    torch.testing.assert_close(out, torch.tensor(expected))
    # = n/(n-1)·(r - mean)
    torch.testing.assert_close(out[0], torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))


def test_rloo_needs_two_samples():
    with pytest.raises(ValueError, match="--n-samples-per-prompt"):
        RLOOEstimator.check_config(SimpleNamespace(n_samples_per_prompt=1))
    RLOOEstimator.check_config(SimpleNamespace(n_samples_per_prompt=2))
    with pytest.raises(ValueError, match="--n-samples-per-prompt"):
        RLOOEstimator(SimpleNamespace()).shape_rewards(torch.tensor([[1.0], [0.0]]))


# ---- serial references ---------------------------------------------------------------------------------


def _serial_token_rewards(reward, kl, mask, kl_coef):
    rho = [-kl_coef * k * m for k, m in zip(kl, mask)]
    last = max(i for i, m in enumerate(mask) if m) if any(mask) else len(mask) - 1
    rho[last] += reward
    return rho


def _serial_returns(rho, gamma):
    out, running = [0.0] * len(rho), 0.0
    for t in reversed(range(len(rho))):
        running = rho[t] + gamma * running
        out[t] = running
    return out


def _serial_gae(rho, values, gamma, lambd):
    adv, last = [0.0] * len(rho), 0.0
    for t in reversed(range(len(rho))):
        next_v = values[t + 1] if t + 1 < len(rho) else 0.0
        delta = rho[t] + gamma * next_v - values[t]
        last = delta + gamma * lambd * last
        adv[t] = last
    return adv, [a + v for a, v in zip(adv, values)]


def _random_batch(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    masks, kls = [], []
    for n in lengths:
        mask = (torch.rand(n, generator=g) > 0.2).long()
        if n > 3:
            mask[-2:] = 0  # trailing environment tokens: the reward goes to the last trainable token
        mask[0] = 1
        masks.append(mask)
        kls.append(torch.randn(n, generator=g, dtype=torch.float64) * 0.1)
    rewards = torch.randn(len(lengths), generator=g).tolist()
    return rewards, masks, kls


@pytest.mark.parametrize("discount", [1.0, 0.99, 0.5, 0.0])
def test_discounted_cumsum_matches_serial_loop_across_chunks(discount):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 300, generator=g, dtype=torch.float64)
    out = discounted_cumsum(x, discount, chunk_size=64)
    for row in range(3):
        ref = _serial_returns(x[row].tolist(), discount)
        torch.testing.assert_close(out[row], torch.tensor(ref, dtype=torch.float64))


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_reinforce_plus_plus_returns_match_serial_loop(gamma):
    lengths = [1, 4, 7, 200]
    rewards, masks, kls = _random_batch(lengths, seed=4)
    est = ReinforcePlusPlusEstimator(SimpleNamespace(kl_coef=0.05, gamma=gamma, normalize_advantages=True))
    assert est.needs_ref_log_probs
    adv, ret = est.compute(_inputs(rewards, lengths, masks, kls))
    for i, n in enumerate(lengths):
        rho = _serial_token_rewards(rewards[i], kls[i].tolist(), masks[i].tolist(), 0.05)
        expected = torch.tensor(_serial_returns(rho, gamma), dtype=torch.float32)
        torch.testing.assert_close(ret[i], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(adv[i], ret[i])
        assert adv[i].shape == (n,)


def test_reinforce_plus_plus_without_kl_is_discounted_terminal_reward():
    est = ReinforcePlusPlusEstimator(SimpleNamespace(gamma=0.5, normalize_advantages=True))
    assert not est.needs_ref_log_probs
    adv, _ = est.compute(_inputs([2.0], [3]))
    torch.testing.assert_close(adv[0], torch.tensor([0.5, 1.0, 2.0]))
    with pytest.raises(ValueError, match="--kl-coef"):
        ReinforcePlusPlusEstimator(SimpleNamespace(kl_coef=0.1)).compute(_inputs([1.0], [2]))


def test_reinforce_plus_plus_baseline():
    args = SimpleNamespace(kl_coef=0.5, normalize_advantages=True, n_samples_per_prompt=4)
    est = ReinforcePlusPlusBaselineEstimator(args)
    shaped = est.shape_rewards(torch.tensor(TABLE))  # centred, no std
    torch.testing.assert_close(shaped, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75]]))
    kl = [torch.tensor([0.2, -0.4, 1.0])]
    mask = [torch.tensor([1, 1, 0])]
    adv, ret = est.compute(_inputs([0.5], [3], mask, kl))
    torch.testing.assert_close(adv[0], torch.tensor([0.5 - 0.1, 0.5 + 0.2, 0.5]))
    torch.testing.assert_close(ret[0], adv[0])
    assert ReinforcePlusPlusBaselineEstimator(
        SimpleNamespace(disable_rewards_normalization=True)).shape_rewards(torch.tensor(TABLE)).tolist() == TABLE


@pytest.mark.parametrize("gamma,lambd", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0), (1.0, 0.9), (0.0, 1.0)])
def test_gae_matches_serial_loop(gamma, lambd):
    lengths = [1, 2, 5, 130, 257]
    rewards, masks, kls = _random_batch(lengths, seed=5)
    g = torch.Generator().manual_seed(6)
    values = [torch.randn(n, generator=g, dtype=torch.float64) for n in lengths]
    est = PPOEstimator(SimpleNamespace(gamma=gamma, lambd=lambd, kl_coef=0.1))
    assert est.needs_critic and est.needs_ref_log_probs
    adv, ret = est.compute(_inputs(rewards, lengths, masks, kls, values))
    for i in range(len(lengths)):
        rho = _serial_token_rewards(rewards[i], kls[i].tolist(), masks[i].tolist(), 0.1)
        exp_adv, exp_ret = _serial_gae(rho, values[i].tolist(), gamma, lambd)
        torch.testing.assert_close(adv[i], torch.tensor(exp_adv, dtype=torch.float32), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(ret[i], torch.tensor(exp_ret, dtype=torch.float32), atol=1e-4, rtol=1e-5)


def test_gae_closed_form_two_tokens():
    # ρ = [0, 1], V = [0.5, 0.25], γ = 0.9, λ = 0.8
    adv, ret = gae([torch.tensor([0.0, 1.0])], [torch.tensor([0.5, 0.25])], 0.9, 0.8)
    d1 = 1.0 - 0.25
    d0 = 0.0 + 0.9 * 0.25 - 0.5
    torch.testing.assert_close(adv[0], torch.tensor([d0 + 0.72 * d1, d1]))
    torch.testing.assert_close(ret[0], torch.tensor([d0 + 0.72 * d1 + 0.5, d1 + 0.25]))


def test_ppo_needs_values():
    with pytest.raises(ValueError, match="values"):
        PPOEstimator(SimpleNamespace()).compute(_inputs([1.0], [2]))


# ---- whitening -----------------------------------------------------------------------------------------


def test_whitening_closed_form_and_stats():
    adv = [torch.tensor([1.0, 2.0, 100.0]), torch.tensor([3.0, 4.0])]
    masks = [torch.tensor([1, 1, 0]), torch.tensor([1, 1])]
    out = whiten_advantages(adv, masks)
    # masked values 1..4: mean 2.5, unbiased var 5/3
    scale = (5.0 / 3.0 + 1e-8) ** -0.5
    torch.testing.assert_close(out[0], torch.tensor([-1.5, -0.5, 97.5]) * scale)
    torch.testing.assert_close(out[1], torch.tensor([0.5, 1.5]) * scale)
    flat = torch.cat(out)[torch.cat(masks).bool()]
    assert flat.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert flat.var(unbiased=True).item() == pytest.approx(1.0, rel=1e-6)


def test_whitening_with_all_reduce_matches_global():
    g = torch.Generator().manual_seed(7)
    adv = [torch.randn(n, generator=g) for n in (3, 5, 4, 6)]
    masks = [torch.ones(n) for n in (3, 5, 4, 6)]
    full = whiten_advantages(adv, masks)
    rank_stats = [torch.stack([sum((a * m).sum() for a, m in zip(adv[k:k + 2], masks[k:k + 2])),
                               sum((a.square() * m).sum() for a, m in zip(adv[k:k + 2], masks[k:k + 2])),
                               sum(m.sum() for m in masks[k:k + 2])]) for k in (0, 2)]
    total = rank_stats[0] + rank_stats[1]
    rank0 = whiten_advantages(adv[:2], masks[:2], all_reduce_sum=lambda s: total)
    for a, b in zip(rank0, full[:2]):
        torch.testing.assert_close(a, b)
    flat = torch.cat(adv)
    torch.testing.assert_close(whiten_advantages(flat, torch.ones_like(flat)), torch.cat(full))


# ---- config checks and registration ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["reinforce_plus_plus", "reinforce_plus_plus_baseline"])
def test_reinforce_requires_normalize_advantages(name):
    cls = ALL_NAMES[name]
    with pytest.raises(ValueError, match="--normalize-advantages"):
        cls.check_config(SimpleNamespace(normalize_advantages=False))
    cls.check_config(SimpleNamespace(normalize_advantages=True))


def test_kl_coef_and_kl_loss_coef_exclusive_and_ranges():
    with pytest.raises(ValueError, match="--kl-coef"):
        PPOEstimator.check_config(SimpleNamespace(kl_coef=0.1, kl_loss_coef=0.1))
    with pytest.raises(ValueError, match="--kl-loss-coef"):
        ReinforcePlusPlusEstimator.check_config(SimpleNamespace(normalize_advantages=True, kl_coef=0.1, kl_loss_coef=0.2))
    with pytest.raises(ValueError, match="--gamma"):
        PPOEstimator.check_config(SimpleNamespace(gamma=1.5))
    with pytest.raises(ValueError, match="--lambd"):
        PPOEstimator.check_config(SimpleNamespace(lambd=-0.1))
    PPOEstimator.check_config(SimpleNamespace(gamma=0.99, lambd=0.95, kl_coef=0.1, kl_loss_coef=0.0))


def test_every_estimator_is_registered_by_name():
    plugins = make_plugin_manager(entry_points=False)
    for name, cls in ALL_NAMES.items():
        obj = plugins.get("advantage_estimator", name)
        assert obj is cls, name
        assert issubclass(obj, AdvantageEstimator) and obj.name == name
        assert plugins.entry("advantage_estimator", name).plugin.startswith("plugrl.plugins.estimators.")
        assert plugins.entry("advantage_estimator", name).metadata["description"]
    assert ALL_NAMES["ppo"].needs_critic and not ALL_NAMES["grpo"].needs_critic


def test_estimator_modules_import_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from plugrl.core.plugins import make_plugin_manager\n"
        "ps = make_plugin_manager(entry_points=False)\n"
        "bad = [f for f in ps.failures if 'estimators' in f.plugin]\n"
        "assert not bad, bad\n"
        "print(','.join(ps.registries['advantage_estimator'].names()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert set(out.stdout.strip().split(",")) >= set(ALL_NAMES)


def test_whitening_statistics_cover_only_the_trained_samples():
    # 3 rollouts with a global batch of 2: the third fills no optimizer step and is not trained on
    # (slime drops it before whitening), so the trained tokens alone must come out mean 0, variance 1.
    from plugrl.core.packing import split_into_steps
    from plugrl.core.rl_step import prepare_rollout

    lengths, rewards = [3, 2, 4], [1.0, -2.0, 50.0]
    masks = [[1, 1, 0], [1, 1], [1, 1, 1, 1]]
    data = {"tokens": [[1] * (2 + k) for k in lengths], "response_lengths": lengths, "rewards": rewards,
            "raw_reward": rewards, "loss_masks": masks, "rollout_log_probs": [[0.0] * k for k in lengths],
            "rollout_ids": [0, 1, 2], "rollout_mask_sums": [float(sum(m)) for m in masks]}
    steps = split_into_steps(data["rollout_ids"], 2)
    trained = [p for step in steps.steps for p in step]
    assert trained == [0, 1] and steps.dropped_positions == [2]
    args = SimpleNamespace(normalize_advantages=True, n_samples_per_prompt=1, eps_clip=0.2)
    prepared = prepare_rollout(args, data, GRPOEstimator(args), "cpu", num_steps=1, has_ref=False,
                               compute_log_probs=None, gather=None, trained=trained)
    kept = torch.cat([prepared.advantages[i][torch.tensor(masks[i]).bool()] for i in trained])
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert kept.var(unbiased=True).item() == pytest.approx(1.0, rel=1e-6)
    # the trained advantages (1, 1, -2, -2) whitened: mean -0.5, unbiased std sqrt(3)
    torch.testing.assert_close(prepared.advantages[0][:2], torch.full((2,), 1.5 / math.sqrt(3.0)))

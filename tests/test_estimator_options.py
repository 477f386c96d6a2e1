"""Advantage estimators own their options: declared dataclasses filled from --adv-opt pairs and same-named
flags, checked on the driver (--dry-run too), and handed to the estimator instead of the run config."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from plugrl.core import hookimpl
from plugrl.core.config import check_config, parse_config
from plugrl.core.plugin_options import RUN_SETTING, build_estimator, build_options
from plugrl.core.plugins import make_plugin_manager
from plugrl.core.protocols import AdvantageEstimator, AdvantageInputs

from .test_plugin_options import DRY, problems, ps  # noqa: F401  (ps: the module's plugin-set fixture)

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ["grpo", "gspo", "dr_grpo", "cispo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo"]


def args_for(ps, *argv):
    return parse_config([*DRY, *argv], ps)


@pytest.mark.parametrize("name", BUNDLED)
def test_every_field_of_a_bundled_estimator_is_a_run_config_flag(ps, name):
    """A field is filled from the flag of its name: a field no flag has would only ever hold its default."""
    options_type = ps.get("advantage_estimator", name).options_type
    assert dataclasses.is_dataclass(options_type)
    args = args_for(ps)
    missing = [f.name for f in dataclasses.fields(options_type) if not hasattr(args, f.name)]
    assert not missing, f"{name}: fields without a flag of that name: {missing}"


def test_no_bundled_estimator_reads_the_run_config_by_name():
    """Estimators read ``self.options.<field>``; ``self.option(...)`` or ``getattr(args, ...)`` would turn a
    typo into a silent default again. ``check_kl_options`` is the one run-config rule (core's config check
    applies it to every estimator; ``check_config`` keeps it for callers holding a run config)."""
    found = []
    for path in sorted((ROOT / "plugins" / "estimators").glob("*.py")):
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, ast.FunctionDef) or function.name == "check_kl_options":
                continue
            for node in ast.walk(function):
                if not isinstance(node, ast.Call):
                    continue
                if isinstance(node.func, ast.Attribute) and node.func.attr == "option":
                    found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
                if getattr(node.func, "id", "") == "getattr" and getattr(node.args[0], "id", "") == "args":
                    found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert found == []


@pytest.mark.parametrize("name,pair,allowed", [
    ("grpo", "disable_reward_normalization=true", "disable_rewards_normalization"),
    ("gspo", "disable_grpo_std_norm=true", "disable_grpo_std_normalization"),
    ("dr_grpo", "disable_grpo_std_normalization=true", "disable_rewards_normalization"),
    ("cispo", "eps_clip_hi=4", "disable_grpo_std_normalization"),
    ("rloo", "leave_one_out=true", "(none)"),
    ("reinforce_plus_plus", "gama=0.9", "gamma"),
    ("reinforce_plus_plus_baseline", "gamma=0.9", "disable_rewards_normalization"),
    ("ppo", "lamda=0.9", "lambd"),
])
def test_an_unknown_adv_opt_key_fails_the_dry_run_naming_plugin_key_and_allowed(ps, name, pair, allowed):
    message = problems(ps, "--advantage-estimator", name, "--normalize-advantages", "--adv-opt", pair)
    key = pair.split("=")[0]
    assert f"--adv-opt {key}=" in message and f"advantage estimator '{name}'" in message
    assert f"has no option '{key}'; allowed: " in message and allowed in message


def test_allowed_values_leave_out_run_settings_and_suggest_a_close_key(ps):
    message = problems(ps, "--advantage-estimator", "ppo", "--adv-opt", "lamda=0.9")
    line = next(p for p in message.splitlines() if "lamda" in p)
    assert "allowed: gamma, lambd;" in line and "did you mean 'lambd'?" in line
    assert "kl_coef" not in line  # a run setting, set by its flag


def test_a_run_setting_given_as_a_pair_is_refused_with_its_flag(ps):
    message = problems(ps, "--advantage-estimator", "reinforce_plus_plus", "--normalize-advantages",
                       "--adv-opt", "kl_coef=0.1")
    assert "--adv-opt kl_coef=0.1: option 'kl_coef' of advantage estimator 'reinforce_plus_plus'" in message
    assert "set --kl-coef instead" in message
    message = problems(ps, "--advantage-estimator", "rloo", "--adv-opt", "n_samples_per_prompt=4")
    assert "set --n-samples-per-prompt instead" in message


def test_wrong_types_and_failed_checks_name_the_estimator(ps):
    message = problems(ps, "--advantage-estimator", "reinforce_plus_plus", "--normalize-advantages",
                       "--adv-opt", "gamma=high")
    assert "--adv-opt gamma='high': option 'gamma' of advantage estimator 'reinforce_plus_plus'" in message
    assert "expected a number" in message
    message = problems(ps, "--advantage-estimator", "reinforce_plus_plus", "--normalize-advantages",
                       "--adv-opt", "gamma=1.5")
    assert "advantage estimator 'reinforce_plus_plus' (plugin plugrl.plugins.estimators.reinforce): " \
           "--gamma must be in [0, 1], got 1.5" in message
    message = problems(ps, "--advantage-estimator", "reinforce_plus_plus")
    assert "--advantage-estimator reinforce_plus_plus requires --normalize-advantages" in message
    assert message.count("requires --normalize-advantages") == 1  # not again from the older check_config hook
    message = problems(ps, "--advantage-estimator", "rloo", "--n-samples-per-prompt", "1")
    assert "rloo needs --n-samples-per-prompt >= 2, got 1" in message


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "gspo", "cispo", "reinforce_plus_plus_baseline"])
def test_group_centring_estimators_refuse_groups_of_one(ps, name):
    """Reward minus the group mean is 0 for a group of one: the run would train on zero advantages."""
    extra = ["--normalize-advantages"] if name.startswith("reinforce") else []
    message = problems(ps, "--advantage-estimator", name, "--n-samples-per-prompt", "1", *extra)
    assert f"--advantage-estimator {name} with --n-samples-per-prompt 1: each reward minus its group's mean is 0" \
        in message and "use --n-samples-per-prompt 2 or more" in message
    # without the centring the raw rewards train, one sample per prompt is fine
    check_config(args_for(ps, "--advantage-estimator", name, "--n-samples-per-prompt", "1",
                          "--disable-rewards-normalization", *extra), ps)


def test_a_pair_overrides_the_flag_and_reaches_the_estimator(ps):
    args = args_for(ps, "--advantage-estimator", "reinforce_plus_plus", "--normalize-advantages",
                    "--gamma", "0.5", "--adv-opt", "gamma=0.9")
    check_config(args, ps)
    estimator = build_estimator(ps.entry("advantage_estimator", "reinforce_plus_plus"), args)
    assert estimator.options.gamma == 0.9 and estimator.options.normalize_advantages is True
    inputs = AdvantageInputs(rewards=[1.0], loss_masks=[torch.ones(3)], response_lengths=[3])
    advantages, _ = estimator.compute(inputs)
    torch.testing.assert_close(advantages[0], torch.tensor([0.81, 0.9, 1.0]))


def test_flags_fill_the_options_and_the_estimator_never_holds_the_run_config(ps):
    args = args_for(ps, "--advantage-estimator", "ppo", "--gamma", "0.9", "--lambd", "0.8", "--kl-coef", "0.05")
    estimator = build_estimator(ps.entry("advantage_estimator", "ppo"), args)
    assert type(estimator.options).__name__ == "PPOOptions"
    assert dataclasses.asdict(estimator.options) == {"kl_coef": 0.05, "gamma": 0.9, "lambd": 0.8}
    assert estimator.args is estimator.options  # what AdvantageEstimator.option() reads: the options, not args
    assert estimator.needs_ref_log_probs is True
    # the older call sites (cls(args)) build the same options from the same run config
    assert ps.get("advantage_estimator", "ppo")(args).options == estimator.options


def test_grpo_options_change_the_shaping(ps):
    table = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    plain = build_estimator(ps.entry("advantage_estimator", "grpo"), args_for(ps, "--n-samples-per-prompt", "4"))
    centred = build_estimator(ps.entry("advantage_estimator", "grpo"),
                              args_for(ps, "--n-samples-per-prompt", "4", "--adv-opt",
                                       "disable_grpo_std_normalization=true"))
    torch.testing.assert_close(centred.shape_rewards(table), torch.tensor([[0.5, -0.5, -0.5, 0.5]]))
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # unbiased, after centering
    torch.testing.assert_close(plain.shape_rewards(table), torch.tensor([[0.5, -0.5, -0.5, 0.5]]) / (std + 1e-6))


def test_yaml_adv_opt(ps, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("advantage_estimator: ppo\nadv_opt:\n  lambd: 0.7\n")
    args = parse_config([*DRY, "--config", str(path)], ps)
    assert args.adv_opt == {"lambd": 0.7}
    assert build_options(ps.entry("advantage_estimator", "ppo"), args).lambd == 0.7
    path.write_text("advantage_estimator: ppo\nadv_opt:\n  lamda: 0.7\n")
    assert "has no option 'lamda'" in problems(ps, "--config", str(path))


@dataclasses.dataclass
class ScaleOptions:
    scale: float = dataclasses.field(default=1.0, metadata={"help": "multiplies the reward"})
    gamma: float = dataclasses.field(default=1.0, metadata={"help": "the run's --gamma, unused"})
    n_samples_per_prompt: int | None = dataclasses.field(default=None, metadata={RUN_SETTING: True})


class Scaled(AdvantageEstimator):
    """A third-party estimator subclassing the public base, options declared at registration."""

    name = "scaled"

    def compute(self, inputs):
        scale = self.args.scale  # the options object core built
        advantages = [torch.full((n,), scale * r) for r, n in zip(inputs.rewards, inputs.response_lengths)]
        return advantages, [a.clone() for a in advantages]


class Legacy(AdvantageEstimator):
    """A third-party estimator that declares no options: it gets the run config, as before."""

    name = "legacy"

    def compute(self, inputs):
        raise NotImplementedError


class ThirdParty:
    @hookimpl
    def plugrl_register_advantage_estimators(self, register):
        register("scaled", Scaled, options=ScaleOptions,
                 check_options=lambda o: [] if o.scale > 0 else [f"option 'scale' must be > 0, got {o.scale}"])
        register("legacy", Legacy)


@pytest.fixture(scope="module")
def third(ps):
    return make_plugin_manager(entry_points=False, extra_plugins={"third": ThirdParty()})


def test_third_party_estimator_with_declared_options_gets_its_object(third):
    args = args_for(third, "--advantage-estimator", "scaled", "--adv-opt", "scale=2", "--gamma", "0.5")
    check_config(args, third)
    estimator = build_estimator(third.entry("advantage_estimator", "scaled"), args)
    assert args.n_samples_per_prompt > 1  # the recipe's group size, filled into the run-setting field
    assert estimator.args == ScaleOptions(scale=2, gamma=0.5, n_samples_per_prompt=args.n_samples_per_prompt)
    advantages, _ = estimator.compute(AdvantageInputs(rewards=[0.5], loss_masks=[torch.ones(2)], response_lengths=[2]))
    torch.testing.assert_close(advantages[0], torch.tensor([1.0, 1.0]))
    assert "advantage estimator 'scaled' (plugin third): option 'scale' must be > 0, got -1" in problems(
        third, "--advantage-estimator", "scaled", "--adv-opt", "scale=-1")


def test_third_party_estimator_without_options_keeps_the_run_config(third):
    args = args_for(third, "--advantage-estimator", "legacy")
    check_config(args, third)
    assert build_estimator(third.entry("advantage_estimator", "legacy"), args).args is args
    message = problems(third, "--advantage-estimator", "legacy", "--adv-opt", "scale=2")
    assert "--adv-opt scale=2: advantage estimator 'legacy' (plugin third) has no option 'scale'; allowed: (none)" \
        in message


def test_overlong_penalty_options_are_checked_on_the_driver(ps):
    message = problems(ps, "--reward-post-process", "overlong_penalty", "--rollout-max-response-len", "16",
                       "--overlong-buffer-len", "20")
    assert "reward post processor 'overlong_penalty'" in message
    assert "--overlong-buffer-len must be in 1..16 (--rollout-max-response-len), got 20" in message
    check_config(args_for(ps, "--reward-post-process", "overlong_penalty", "--rollout-max-response-len", "16",
                          "--overlong-buffer-len", "4"), ps)


def test_cli_dry_run_refuses_a_misspelled_adv_opt_and_ppo_without_a_critic():
    def dry(*argv):
        return subprocess.run([sys.executable, "-m", "plugrl.core.cli", "train", "--dry-run", *argv],
                              capture_output=True, text=True, timeout=120)

    run = dry("--advantage-estimator", "ppo", "--adv-opt", "lamda=0.9")
    assert run.returncode == 2, run.stdout + run.stderr
    assert "advantage estimator 'ppo'" in run.stderr and "'lamda'" in run.stderr
    assert "needs critic values" in run.stderr
    assert "Traceback" not in run.stderr


def test_an_options_estimator_without_an_options_type_is_a_clear_error():
    from plugrl.core.plugin_options import OptionsEstimator

    class Forgot(OptionsEstimator):
        name = "forgot"

    with pytest.raises(TypeError, match="Forgot subclasses OptionsEstimator but sets no options_type"):
        Forgot(None)


def test_core_builds_estimators_through_build_estimator():
    """The rollout manager and the train actors build the estimator with ``build_estimator`` (its options
    object), never as ``plugin_set.get("advantage_estimator", name)(args)`` with the run config."""
    direct = []
    for path in sorted((ROOT / "core").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            inner = node.func if isinstance(node, ast.Call) else None
            if (isinstance(inner, ast.Call) and isinstance(inner.func, ast.Attribute) and inner.func.attr == "get"
                    and inner.args and isinstance(inner.args[0], ast.Constant)
                    and inner.args[0].value == "advantage_estimator"):
                direct.append(f"{path.name}:{node.lineno}")
    assert not direct, direct
    uses = [p.name for p in (ROOT / "core").glob("*.py") if "build_estimator(plugin_set.entry(" in p.read_text()]
    assert sorted(uses) == ["rollout_manager.py", "train_worker.py"]


def test_reward_post_processors_receive_their_options_object(ps):
    """Core hands ``overlong_penalty`` its ``OverlongOptions`` (filled from its flags) and a post-processor
    that declares none the run config; the penalty applied through ``samples_to_train_data`` is DAPO's
    closed form: L_max=16, L_cache=4, a 14-token response exceeds 12 by 2 -> -2/4 * factor 0.5 = -0.25."""
    from plugrl.core.plugin_options import build_plugin_input
    from plugrl.core.registry import Entry
    from plugrl.core.train_data import samples_to_train_data
    from plugrl.core.types import Sample
    from plugrl.plugins.filters.overlong import OverlongOptions

    args = args_for(ps, "--reward-post-process", "overlong_penalty", "--rollout-max-response-len", "16",
                    "--overlong-buffer-len", "4", "--overlong-penalty-factor", "0.5")
    check_config(args, ps)
    entry = ps.entry("reward_post_processor", "overlong_penalty")
    options = build_plugin_input(entry, args)
    assert options == OverlongOptions(rollout_max_response_len=16, overlong_buffer_len=4, overlong_penalty_factor=0.5,
                                      reward_key=args.reward_key)
    seen = []
    legacy = Entry("reward_post_processor", "legacy", lambda samples, run: seen.append(run), plugin="third",
                   builtin=False)
    assert build_plugin_input(legacy, args) is args

    group = [Sample(tokens=[1] * 20, response_length=n, reward=1.0, loss_mask=[1] * n) for n in (14, 8)]
    estimator = build_estimator(ps.entry("advantage_estimator", "grpo"), args)
    data = samples_to_train_data([group], estimator, post_processors=[(entry.load(), options),
                                                                      (legacy.obj, args)], args=args)
    assert data["raw_reward"] == pytest.approx([0.75, 1.0]) and seen == [args]

"""Buffer policies and placements declare options like the other plugin kinds: `--buffer-opt` and
`--placement-opt` pairs are filled into the declared dataclass and checked on the driver (dry-run's
path), then reach the plugin (buffer: keyword arguments; placement: `request.options`)."""

from __future__ import annotations

import dataclasses

import pytest

from plugrl.core import hookimpl
from plugrl.core.config import config_problems, parse_config
from plugrl.core.dry_run import placement_plan
from plugrl.core.plugins import make_plugin_manager
from plugrl.core.rollout_manager import _build_buffer
from plugrl.plugins.buffers.fifo import FifoBuffer
from plugrl.plugins.placements.placement import colocate


@dataclasses.dataclass
class CappedOptions:
    max_groups: int = dataclasses.field(default=8, metadata={"help": "groups kept at most"})


def check_capped(options: CappedOptions) -> list[str]:
    return [] if options.max_groups >= 1 else [f"option 'max_groups' must be >= 1, got {options.max_groups}"]


class CappedBuffer(FifoBuffer):
    name = "capped"

    def __init__(self, n_samples_per_prompt=None, *, max_groups: int = 8):
        super().__init__(n_samples_per_prompt)
        self.max_groups = max_groups

    def add(self, groups):
        super().add(groups)
        del self._groups[: max(0, len(self._groups) - self.max_groups)]  # keep the newest


@dataclasses.dataclass
class SpreadOptions:
    engines_first: bool = dataclasses.field(default=False, metadata={"help": "engines on the first GPUs"})


def spread(request):
    """colocate's plan, recording what it was given (the test reads it back)."""
    spread.seen = request.options
    return colocate(request)


class ThirdParty:
    @hookimpl
    def plugrl_register_buffer_policies(self, register):
        register("capped", CappedBuffer, options=CappedOptions, check_options=check_capped)

    @hookimpl
    def plugrl_register_placements(self, register):
        register("spread", spread, options=SpreadOptions)


BASE = ["--rm-type", "deepscaler", "--rollout-batch-size", "4", "--n-samples-per-prompt", "2", "--hf-checkpoint", "model",
        "--num-rollout", "1"]


def parse(argv, ps):
    return parse_config(BASE + argv, ps)


@pytest.fixture(scope="module")
def ps():
    return make_plugin_manager(entry_points=False, extra_plugins={"third": ThirdParty()})


def test_a_buffer_policy_gets_its_declared_options_as_keywords(ps):
    args = parse(["--partial-rollout", "--buffer-filter", "capped", "--buffer-opt", "max_groups=2"], ps)
    assert config_problems(args, ps) == []
    buffer = _build_buffer(args, ps)
    assert isinstance(buffer, CappedBuffer) and buffer.max_groups == 2 and buffer.n_samples_per_prompt == args.n_samples_per_prompt
    n = args.n_samples_per_prompt
    buffer.add([[object()] * n for _ in range(3)])
    assert len(buffer) == 2  # the option took effect: only two groups kept


@pytest.mark.parametrize("pairs,expected", [
    (["max_group=2"], "--buffer-opt max_group=2: buffer policy 'capped' (plugin third) has no option 'max_group'; "
                      "allowed: max_groups; did you mean 'max_groups'?"),
    (["max_groups=two"], "option 'max_groups' of buffer policy 'capped'"),
    (["max_groups=0"], "option 'max_groups' must be >= 1, got 0"),
])
def test_bad_buffer_options_are_config_problems_naming_the_key(ps, pairs, expected):
    argv = ["--partial-rollout", "--buffer-filter", "capped"] + [w for p in pairs for w in ("--buffer-opt", p)]
    problems = config_problems(parse(argv, ps), ps)
    assert any(expected in p for p in problems), problems


def test_fifo_declares_no_option_so_any_pair_is_refused(ps):
    problems = config_problems(parse(["--buffer-opt", "size=3"], ps), ps)
    assert any("--buffer-opt size=3: buffer policy 'fifo'" in p and "allowed: (none)" in p for p in problems), problems


def test_a_placement_gets_its_options_in_the_request(ps):
    args = parse(["--placement", "spread", "--placement-opt", "engines_first=true",
                         "--actor-num-gpus-per-node", "2"], ps)
    assert config_problems(args, ps) == []
    plan = placement_plan(args, ps)
    assert spread.seen == SpreadOptions(engines_first=True)
    assert plan.colocated and plan.actor_bundles == (0, 1)
    bad = parse(["--placement", "spread", "--placement-opt", "engine_first=true"], ps)
    problems = config_problems(bad, ps)
    assert any("--placement-opt engine_first=True: placement 'spread'" in p and "did you mean 'engines_first'" in p
               for p in problems), problems
    # a bundled placement declares none: its request carries the (empty) dict of pairs
    assert placement_plan(parse([], ps), ps).colocated
    assert any("placement 'colocate'" in p for p in config_problems(parse(["--placement-opt", "x=1"], ps), ps))


def test_colocate_flag_follows_the_plan_not_the_placements_name(ps):
    """--colocate with a third-party placement that colocates is fine; with one that does not, refused."""
    assert config_problems(parse(["--colocate", "--placement", "spread"], ps), ps) == []
    problems = config_problems(parse(["--colocate", "--placement", "decoupled", "--rollout-num-gpus", "2"], ps), ps)
    assert any("--colocate conflicts with --placement decoupled" in p for p in problems), problems
    # its rollout GPUs default to the train GPUs, as for the bundled colocate
    assert parse(["--placement", "spread", "--actor-num-gpus-per-node", "2"], ps).rollout_num_gpus == 2


def test_a_buffer_policy_without_partial_rollout_is_refused(ps):
    """The buffer only receives groups aborted by --partial-rollout: choosing a policy or its options
    without it would do nothing, so it is refused; the default named in a saved config.yaml is not."""
    found = config_problems(parse(["--buffer-filter", "capped", "--buffer-opt", "max_groups=2"], ps), ps)
    assert ("--buffer-filter capped --buffer-opt max_groups=2 without --partial-rollout: the buffer only holds the "
            "groups a rollout aborts with --partial-rollout, so the policy would never receive one; add "
            "--partial-rollout or drop them") in found
    assert config_problems(parse(["--buffer-filter", "fifo"], ps), ps) == []
    assert config_problems(parse(["--partial-rollout", "--buffer-filter", "capped"], ps), ps) == []

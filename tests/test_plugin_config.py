"""A backend's view of the run config (core/plugin_config.py): core's settings and its own flags,
read-only; another plugin's flag or a misspelled name is an error that `getattr(x, name, default)`
does not hide. Checked on real parsed configs, through the config check (`--dry-run`'s path), in a
train worker, and statically over every bundled backend's reads."""

from __future__ import annotations

import ast
import copy
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest

from plugrl.core import hookimpl
from plugrl.core.config import build_parser, config_problems, parse_config
from plugrl.core.plugin_config import DERIVED_SETTINGS, PluginConfig, flag_owners, with_settings
from plugrl.core.plugin_options import OptionsError
from plugrl.core.plugins import make_plugin_manager

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def parsed():
    return parse_config(["--train-backend", "megatron", "--lr", "3e-4"])


def test_a_backend_reads_core_settings_and_its_own_flags(parsed):
    megatron = PluginConfig.for_plugin(parsed, "train_backend", "megatron")
    torch_view = PluginConfig.for_plugin(parsed, "train_backend", "torch")
    assert megatron.lr == torch_view.lr == 3e-4  # a core flag: every backend sees it
    assert megatron.tensor_model_parallel_size == parsed.tensor_model_parallel_size  # its own flag
    assert megatron.megatron_passthrough == {}  # its own passthrough dict
    # the rollout backend's flags are foreign to a train backend
    with pytest.raises(OptionsError, match=r"--sglang-mem-fraction-static\), a flag of the sglang rollout backend"):
        megatron.sglang_mem_fraction_static


def test_a_foreign_flag_or_a_typo_is_an_error_that_getattr_with_a_default_does_not_hide(parsed):
    view = PluginConfig.for_plugin(parsed, "train_backend", "torch")
    with pytest.raises(OptionsError) as foreign:
        getattr(view, "tensor_model_parallel_size", 1)
    assert "train backend 'torch' read 'tensor_model_parallel_size' (--tensor-model-parallel-size)" in str(foreign.value)
    assert "megatron train backend" in str(foreign.value)
    with pytest.raises(OptionsError, match=r"train backend 'torch' read 'micro_batch_sise'.*did you mean 'micro_batch_size'"):
        getattr(view, "micro_batch_sise", 1)
    with pytest.raises(OptionsError):
        hasattr(view, "lrr")  # hasattr swallows AttributeError only
    # the plain namespace would have returned the default silently: the reason for the view
    assert getattr(parsed, "micro_batch_sise", 1) == 1


def test_a_known_setting_this_config_lacks_keeps_getattrs_default(parsed):
    values = {k: v for k, v in vars(parsed).items() if k not in ("lr", "engine_placement")}
    view = PluginConfig.for_plugin(values, "train_backend", "torch")
    assert getattr(view, "lr", 0.5) == 0.5  # a flag dest, absent from this (partial) config
    assert getattr(view, "engine_placement", None) is None  # a setting core derives for the actors
    assert "engine_placement" in DERIVED_SETTINGS
    with pytest.raises(AttributeError, match="no 'lr'"):
        view.lr


def test_extra_keys_of_a_custom_config_are_readable(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("my_bonus: 0.25\n")
    args = parse_config(["--custom-config-path", str(extra)])
    assert PluginConfig.for_plugin(args, "train_backend", "torch").my_bonus == 0.25


def test_the_view_is_read_only_and_replace_makes_a_checked_copy(parsed):
    view = PluginConfig.for_plugin(parsed, "train_backend", "megatron")
    with pytest.raises(OptionsError, match="read-only"):
        view.lr = 1.0
    with pytest.raises(OptionsError, match="read-only"):
        del view.lr
    warm = view.replace(lr=0.1, weight_decay=0.0)
    assert (warm.lr, warm.weight_decay, view.lr) == (0.1, 0.0, 3e-4)
    assert isinstance(warm, PluginConfig) and warm.tensor_model_parallel_size == view.tensor_model_parallel_size
    with pytest.raises(OptionsError, match="'weight_decayy'"):
        view.replace(weight_decayy=0.0)
    plain = with_settings(SimpleNamespace(lr=1.0, seed=3), lr=2.0)  # the form tests build backends from
    assert (plain.lr, plain.seed) == (2.0, 3)
    assert with_settings(view, lr=0.2).lr == 0.2


def test_a_view_of_a_view_keeps_the_narrower_rules(parsed):
    megatron = PluginConfig.for_plugin(parsed, "train_backend", "megatron")
    again = PluginConfig.for_plugin(megatron, "train_backend", "megatron")
    assert again.tensor_model_parallel_size == megatron.tensor_model_parallel_size and again.lr == 3e-4
    with pytest.raises(OptionsError, match="sglang"):
        again.sglang_mem_fraction_static
    # another plugin's view of a megatron view: megatron's flags are gone, not readable
    torch_view = PluginConfig.for_plugin(megatron, "train_backend", "torch")
    with pytest.raises(OptionsError, match="megatron train backend"):
        torch_view.tensor_model_parallel_size


def test_the_view_survives_pickle_and_deepcopy_with_its_rules(parsed):
    view = PluginConfig.for_plugin(parsed, "rollout_backend", "sglang")
    for clone in (pickle.loads(pickle.dumps(view)), copy.deepcopy(view), copy.copy(view)):
        assert clone.sglang_mem_fraction_static == view.sglang_mem_fraction_static
        with pytest.raises(OptionsError, match="megatron train backend"):
            clone.tensor_model_parallel_size
    assert "tensor_model_parallel_size" not in view.to_dict() and "lr" in view.to_dict()


def test_flag_owners_name_every_plugin_group_flag_and_passthrough():
    parser = build_parser()
    owners = flag_owners(parser)
    assert owners["tensor_model_parallel_size"] == ["train_backend", "megatron", "--tensor-model-parallel-size"]
    assert owners["megatron_passthrough"] == ["train_backend", "megatron", "--megatron-*"]
    assert owners["sglang_passthrough"][:2] == ["rollout_backend", "sglang"]
    assert "lr" not in owners and "rollout_batch_size" not in owners  # core's


class _Peeker:
    """A third-party train backend whose check reads the megatron backend's flag."""

    @hookimpl
    def plugrl_register_train_backends(self, register):
        register("peeker", "plugrl.plugins.backends.torch.trainer:TorchTrainBackend",
                 check=lambda config: [] if config.tensor_model_parallel_size in (None, 1) else ["tp"])


def test_a_backend_check_that_reads_another_plugins_flag_is_a_config_problem_on_the_driver():
    plugin_set = make_plugin_manager(entry_points=False, extra_plugins={"peek": _Peeker()})
    args = parse_config(["--train-backend", "peeker"], plugin_set)
    problems = config_problems(args, plugin_set)
    assert any("train backend 'peeker' read 'tensor_model_parallel_size'" in p for p in problems), problems
    # the bundled megatron check reads its own flags through the same view and reports its own problem
    args = parse_config(["--train-backend", "megatron", "--pipeline-model-parallel-size", "2"], plugin_set)
    assert any("--pipeline_model_parallel_size 2" in p or "--pipeline-model-parallel-size 2" in p
               for p in config_problems(args, plugin_set))


def test_the_train_worker_builds_the_backend_with_its_view(tmp_path):
    from plugrl.core.plugin_traits import default_checkpoint
    from plugrl.core.train_worker import TrainWorker

    args = parse_config(["--hf-checkpoint", str(default_checkpoint()), "--n-samples-per-prompt", "2"])
    config = {**vars(args), "device": "cpu", "rollout_device": "cpu", "engine_gpu_ids": None, "engine_placement": None}
    worker = TrainWorker(config, total_optimizer_steps=1)
    backend_config = worker.backend.args
    assert isinstance(backend_config, PluginConfig) and backend_config.lr == args.lr
    with pytest.raises(OptionsError, match="train backend 'torch'"):
        backend_config.tensor_model_parallel_size


# ---- static: every bundled backend reads only settings it may read --------------------------------
BACKEND_FILES = {
    ("train_backend", "torch"): ["plugins/backends/torch", "plugins/backends/trainer_common.py"],
    ("train_backend", "megatron"): ["plugins/backends/megatron"],
    ("rollout_backend", "sglang"): ["plugins/backends/sglang"],
    ("rollout_backend", "hf"): ["plugins/backends/hf", "plugins/backends/packed_attention.py"],
}
# Standalone commands with their own argparse namespace named `args` (not a run config).
OWN_CLI = {"plugins/backends/sglang/server.py", "plugins/backends/megatron/convert.py"}
RUN_CONFIG_NAMES = {"args", "self.args", "self._args", "warm_args"}


def run_config_reads(source: str) -> list[tuple[int, str]]:
    """(line, name) of each `args.X` / `getattr(args, "X", ...)` read of a run config in ``source``."""
    reads = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and ast.unparse(node.value) in RUN_CONFIG_NAMES:
            reads.append((node.lineno, node.attr))
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("getattr", "hasattr")
              and len(node.args) >= 2 and ast.unparse(node.args[0]) in RUN_CONFIG_NAMES
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            reads.append((node.lineno, node.args[1].value))
    return reads


def test_the_scan_finds_both_read_forms():
    assert run_config_reads("x = args.lr\ny = getattr(self.args, 'seed', 0)\nz = cfg.lr") == [(1, "lr"), (2, "seed")]


def test_bundled_backends_read_only_known_settings_and_their_own_flags():
    parser = build_parser()
    owners = flag_owners(parser)
    known = {a.dest for a in parser.flag_actions()} | set(owners) | DERIVED_SETTINGS
    methods = {name for name in dir(PluginConfig) if not name.startswith("__")}
    problems = []
    for (kind, name), paths in BACKEND_FILES.items():
        files = []
        for rel in paths:
            path = ROOT / rel
            files += [path] if path.is_file() else sorted(path.rglob("*.py"))
        for path in files:
            rel = str(path.relative_to(ROOT))
            if rel in OWN_CLI:
                continue
            for line, attr in run_config_reads(path.read_text()):
                owner = owners.get(attr)
                if owner and (owner[0], owner[1]) != (kind, name):
                    problems.append(f"{rel}:{line}: {name} reads {owner[2]} of the {owner[1]} {owner[0]}")
                elif attr not in known and attr not in methods:
                    problems.append(f"{rel}:{line}: {name} reads '{attr}', which is no setting (typo?)")
    assert not problems, "\n".join(problems)


def test_the_flag_tables_backends_read_by_name_hold_only_flags_they_may_read():
    """Reads through a variable (`getattr(args, dest)` over a table) escape the scan above: the
    tables themselves must name core flags or the backend's own."""
    from plugrl.plugins.backends.megatron import options as megatron_options
    from plugrl.plugins.backends.sglang import options as sglang_options

    parser = build_parser()
    owners = flag_owners(parser)
    dests = {a.dest for a in parser.flag_actions()}
    tables = {"megatron": [*megatron_options.MODEL_FLAGS, *megatron_options.UNSUPPORTED_PARALLELISM,
                           *megatron_options.HOOK_FLAGS],
              "sglang": [*sglang_options.SERVER_FIELDS, *sglang_options.ROUTER_DEFAULTS]}
    for name, table in tables.items():
        assert [d for d in table if d not in dests or owners.get(d, [None, name])[1] != name] == [], name

"""The megatron backend's inputs checked on the driver, before Ray (plugins/backends/megatron/options.py):
its hook flags' modules imported and their functions' signatures checked as core's --*-path flags are
(megatron itself not imported for that), and --megatron-<field> values typed with the flag named."""

import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

pytest.importorskip("megatron.core", reason="megatron-core not installed (plugrl[megatron])")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def hook_args(**flags):
    from plugrl.plugins.backends.megatron.options import HOOK_FLAGS

    return SimpleNamespace(**{dest: flags.get(dest) for dest in HOOK_FLAGS})


def test_a_hook_module_that_does_not_import_is_refused_on_the_driver(capsys):
    from plugrl.core.train_cli import main

    code = main(["--train-backend", "megatron", "--device", "cpu", "--custom-model-provider-path", "nomod.x",
                 "--dry-run"])
    err = capsys.readouterr().err
    assert code == 1  # the dry run's "this machine cannot start the run"
    assert ("--custom-model-provider-path nomod.x: cannot import it (ImportError: cannot import module 'nomod' of "
            "'nomod.x': No module named 'nomod'); check the module is on PYTHONPATH and the name is spelled right") in err


def test_hooks_are_checked_against_the_way_the_backend_calls_them(tmp_path, monkeypatch):
    from plugrl.plugins.backends.megatron.options import machine_problems

    (tmp_path / "megatron_driver_check_hooks.py").write_text(textwrap.dedent("""
        def init(args): pass
        def provider(pre_process, post_process, vp_stage=None): pass
        def bad_step(args, model): pass
        NOT_A_FUNCTION = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert machine_problems(hook_args(custom_megatron_init_path="megatron_driver_check_hooks.init",
                                      custom_model_provider_path="megatron_driver_check_hooks:provider")) == []
    problems = machine_problems(hook_args(custom_megatron_before_train_step_hook_path="megatron_driver_check_hooks.bad_step",
                                          custom_megatron_init_path="megatron_driver_check_hooks.NOT_A_FUNCTION"))
    assert problems[0] == "--custom-megatron-init-path megatron_driver_check_hooks.NOT_A_FUNCTION is not callable (a int: 3); point it " \
                          "at a function"
    assert problems[1].startswith("--custom-megatron-before-train-step-hook-path megatron_driver_check_hooks.bad_step: takes (args, "
                                  "model), but plugrl calls fn(args, rollout_id, step_id, model, optimizer, "
                                  "opt_param_scheduler)")


def test_the_hook_check_imports_only_the_users_module(tmp_path):
    (tmp_path / "light_hooks.py").write_text("def init(args):\n    pass\n")
    code = textwrap.dedent("""
        import sys
        from types import SimpleNamespace
        from plugrl.plugins.backends.megatron.options import HOOK_FLAGS, machine_problems
        args = SimpleNamespace(**{d: None for d in HOOK_FLAGS})
        args.custom_megatron_init_path = "light_hooks.init"
        assert machine_problems(args) == []
        assert "light_hooks" in sys.modules and "megatron.core" not in sys.modules, sorted(sys.modules)
    """)
    env_path = f"{tmp_path}:" + ":".join(p for p in sys.path if p)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("field, value, message", [
    ("hidden_dropout", "abc", "--megatron-hidden-dropout abc: hidden_dropout is a number (megatron's default 0.1); "
                              "give a number"),
    ("sequence_parallel", "flase", "--megatron-sequence-parallel flase: sequence_parallel is true or false; give one "
                                   "of 1, true, yes, on, 0, false, no, off (or the bare flag for true)"),
])
def test_a_passthrough_value_of_the_wrong_type_names_the_flag(capsys, field, value, message):
    from plugrl.core.train_cli import main

    code = main(["--train-backend", "megatron", "--device", "cpu", f"--megatron-{field.replace('_', '-')}", value,
                 "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and message in err


def test_passthrough_values_are_typed_by_the_fields_default():
    from plugrl.plugins.backends.megatron.options import typed_override

    assert typed_override("--megatron-x", "x", "Off", False) is False
    assert typed_override("--megatron-x", "x", "yes", False) is True
    assert typed_override("--megatron-x", "x", True, False) is True
    assert typed_override("--megatron-x", "x", "7", 1) == 7
    with pytest.raises(ValueError, match=r"^--megatron-x abc: x is a whole number \(megatron's default 1\); give a "
                                         r"whole number$"):
        typed_override("--megatron-x abc", "x", "abc", 1)

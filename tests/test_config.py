"""``plugrl train``'s run configuration: flags, YAML, recipes, resolution, validation, serialisation."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from plugrl.core import config as config_module
from plugrl.core import hookimpl as core_hookimpl
from plugrl.core.config import (
    DEFAULT_RECIPE,
    RECIPES,
    ConfigError,
    build_parser,
    check_config,
    config_problems,
    config_to_dict,
    environment_problems,
    parse_config,
    recipe_values,
    validate_config,
)
from plugrl.core.flags import parse_size
from plugrl.core.plugins import BUILTIN_PLUGINS, make_plugin_manager
from plugrl.plugins.backends.megatron import options as megatron_options
from plugrl.plugins.backends.sglang import options as sglang_options

OPTION_MODULES = {
    "plugrl.plugins.backends.megatron.options": megatron_options,
    "plugrl.plugins.backends.sglang.options": sglang_options,
}


@pytest.fixture(scope="module")
def ps():
    """Built-ins plus the two backend option modules (registered here until they are built-ins)."""
    extra = {name: module for name, module in OPTION_MODULES.items() if name not in BUILTIN_PLUGINS}
    return make_plugin_manager(entry_points=False, extra_plugins=extra)


@pytest.fixture
def files(tmp_path):
    """A prompt file, an eval file and an HF-looking checkpoint directory."""
    prompts = tmp_path / "prompts.jsonl"
    # both key names: core/preflight.py parses the file with the run's --input-key (default "input")
    prompts.write_text('{"input": "1+1?", "prompt": "1+1?", "label": "2"}\n')
    evals = tmp_path / "eval.jsonl"
    evals.write_text('{"input": "2+2?", "prompt": "2+2?", "label": "4"}\n')
    ckpt = tmp_path / "model"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    # a complete model folder: core/preflight.py checks for tokenizer, chat template and weights
    (ckpt / "tokenizer.json").write_text("{}")
    (ckpt / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    (ckpt / "model.safetensors").write_bytes(b"")
    return {"prompts": str(prompts), "eval": str(evals), "ckpt": str(ckpt), "dir": tmp_path}


@pytest.fixture
def base(files):
    """A complete, valid non-default run on the embedded backends."""
    return [
        "--prompt-data",
        files["prompts"],
        "--hf-checkpoint",
        files["ckpt"],
        "--rm-type",
        "deepscaler",
        "--rollout-batch-size",
        "4",
        "--n-samples-per-prompt",
        "2",
        "--num-rollout",
        "3",
    ]


def problems_of(argv, ps):
    args = parse_config(argv, ps)
    with pytest.raises(ConfigError) as info:
        validate_config(args, ps)
    return str(info.value)


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


# --------------------------------------------------------------------------------------------------
# Defaults and resolution
# --------------------------------------------------------------------------------------------------


def test_flag_defaults(ps):
    args = parse_config([], ps)
    assert args.recipe is None
    assert (args.train_backend, args.rollout_backend, args.placement) == ("torch", "hf", "colocate")
    assert args.rm_type is None and args.advantage_estimator == "grpo" and args.buffer_filter == "fifo"
    assert args.seed == 1234 and args.rollout_seed == 42 and args.lr == 1e-6 and args.adam_beta2 == 0.999
    assert args.input_key == "input" and args.metadata_key == "metadata" and args.tool_key == "tools"
    assert args.n_samples_per_prompt == 1 and args.rollout_top_k == -1 and args.rollout_concurrency == 512
    assert args.actor_num_gpus_per_node == 1 and args.rollout_num_gpus == 1 and args.num_gpus_per_node == 8
    assert args.offload_train is False and args.offload_rollout is False  # no --colocate
    assert args.eps_clip_high == args.eps_clip == 0.2
    assert args.rollout_batch_size is None and args.global_batch_size is None
    assert args.eval_input_key == args.input_key and args.eval_top_k == -1
    assert args.update_weight_buffer_size == 512 * 1024**2
    assert args.output_dir.startswith("runs/")
    assert args.rm_opt == {} and args.reward_post_process == [] and args.sglang_passthrough == {}
    assert args.sft_warmup_steps == 0 and args.sft_warmup_prompt_loss_weight == 0.0


def test_tiny_default_recipe_validates(ps, files):
    args = parse_config(["--recipe", DEFAULT_RECIPE, "--hf-checkpoint", files["ckpt"]], ps)
    assert args.recipe == DEFAULT_RECIPE and args.prompt_data and args.rm_type
    assert args.global_batch_size % args.n_samples_per_prompt == 0
    validate_config(args, ps)


def test_recipe_forms(ps, monkeypatch, tmp_path):
    (tmp_path / "my_recipes.py").write_text("VALUES = {'seed': 9}\ndef make():\n    return {'seed': 7}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(RECIPES, "as-callable", lambda: {"seed": 5})
    monkeypatch.setitem(RECIPES, "as-dict-path", "my_recipes:VALUES")
    monkeypatch.setitem(RECIPES, "as-function-path", "my_recipes:make")
    monkeypatch.setitem(RECIPES, "broken", lambda: ["seed", 1])
    assert parse_config(["--recipe", "as-callable"], ps).seed == 5
    assert parse_config(["--recipe", "as-dict-path"], ps).seed == 9
    assert parse_config(["--recipe", "as-function-path"], ps).seed == 7
    with pytest.raises(ConfigError, match="must give a dict of flag values"):
        recipe_values("broken")


def test_prompt_data_run_needs_its_settings(ps, files):
    args = parse_config(["--prompt-data", files["prompts"]], ps)
    assert args.rollout_batch_size is None and args.input_key == "input"
    message = problems_of(["--prompt-data", files["prompts"]], ps)
    assert "--rollout-batch-size is required" in message
    assert "--num-rollout or --num-epoch" in message
    assert "--rm-type is required" in message


def test_valid_base_run(ps, base):
    args = parse_config(base, ps)
    validate_config(args, ps)
    assert args.global_batch_size == 8 and args.eval_label_key is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("512MiB", 512 * 1024**2),
        ("1GB", 10**9),
        ("1GiB", 2**30),
        ("1.5gib", 3 * 2**29),
        ("1048576", 1048576),
        ("64 kb", 64000),
        (4096, 4096),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "1XB", "-1MiB", True])
def test_parse_size_rejects(text):
    with pytest.raises(Exception, match="size"):
        parse_size(text)


def test_buffer_size_flag(ps):
    assert parse_config(["--update-weight-buffer-size", "1GiB"], ps).update_weight_buffer_size == 2**30


def test_colocate_and_placement_resolution(ps):
    args = parse_config(["--colocate", "--actor-num-gpus-per-node", "4"], ps)
    assert args.placement == "colocate" and args.rollout_num_gpus == 4
    assert args.offload_train is True and args.offload_rollout is True
    args = parse_config(["--colocate", "--actor-num-gpus-per-node", "4", "--no-offload-train"], ps)
    assert args.offload_train is False and args.offload_rollout is True
    args = parse_config(["--actor-num-gpus-per-node", "2", "--rollout-num-gpus", "6"], ps)
    assert args.placement == "decoupled" and args.rollout_num_gpus == 6 and args.offload_train is False
    args = parse_config(["--offload"], ps)
    assert args.offload_train is True and args.offload_rollout is True
    args = parse_config(["--actor-num-nodes", "2", "--actor-num-gpus-per-node", "8", "--colocate"], ps)
    assert args.rollout_num_gpus == 16


def test_eval_defaults_follow_rollout_and_explicit_values_win(ps):
    args = parse_config(
        [
            "--rollout-temperature",
            "0.7",
            "--rollout-top-k",
            "20",
            "--eval-top-p",
            "0.9",
            "--reward-key",
            "score",
        ],
        ps,
    )
    assert (args.eval_temperature, args.eval_top_p, args.eval_top_k) == (0.7, 0.9, 20)
    assert args.eval_reward_key == "score"


def test_misc_resolution(ps):
    args = parse_config(
        [
            "--rm-url",
            "http://h/rm",
            "--rm-opt",
            "timeout=5",
            "--rollout-max-context-len",
            "1024",
            "--eps-clip",
            "0.1",
            "--rm-opt",
            "flags=[1, 2]",
            "--lr",
            "2e-5",
        ],
        ps,
    )
    assert args.rm_opt == {"timeout": 5, "flags": [1, 2], "url": "http://h/rm"}
    assert args.rollout_max_prompt_len == 1023
    assert args.eps_clip_high == 0.1
    assert args.sft_warmup_lr == 2e-5
    assert parse_config(["--async"], ps).async_train is True


@pytest.mark.parametrize(
    "argv, global_batch, steps",
    [
        ([], 32, 1),
        (["--num-steps-per-rollout", "4"], 8, 4),
        (["--global-batch-size", "16"], 16, 2),
        (["--global-batch-size", "8", "--num-steps-per-rollout", "4"], 8, 4),
    ],
)
def test_global_batch_size_resolution(ps, base, argv, global_batch, steps):
    argv = base[:] + ["--rollout-batch-size", "8", "--n-samples-per-prompt", "4"] + argv
    args = parse_config(argv, ps)
    assert (args.global_batch_size, args.num_steps_per_rollout) == (global_batch, steps)
    validate_config(args, ps)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--num-steps-per-rollout", "3"], "--num-steps-per-rollout 3 does not divide"),
        (["--global-batch-size", "5"], "must be divisible by --global-batch-size (5)"),
        (["--global-batch-size", "4", "--num-steps-per-rollout", "4"], "must equal"),
    ],
)
def test_global_batch_size_inconsistent(ps, base, argv, expected):
    message = problems_of(base + ["--rollout-batch-size", "8", "--n-samples-per-prompt", "4"] + argv, ps)
    assert expected in message and "--rollout-batch-size × --n-samples-per-prompt = 32" in message


# --------------------------------------------------------------------------------------------------
# YAML and recipes
# --------------------------------------------------------------------------------------------------


def test_yaml_values_and_cli_precedence(ps, base, files):
    path = write_yaml(
        files["dir"] / "run.yaml",
        {
            "rollout-batch-size": 8,  # dashed key
            "n_samples_per_prompt": 4,  # underscore key
            "lr": 1e-5,
            "update-weight-buffer-size": "1GB",
            # a reward with two options: deepscaler has only timeout, and an unknown key is now an error
            "rm_opt": {"timeout": 3, "require_boxed": False},
            "reward_post_process": ["overlong_penalty"],
            "rollout_max_response_len": 64,
            "async": True,  # the flag name of dest async_train
            "rollout_stop_token_ids": [1, 2],
        },
    )
    args = parse_config(
        base[:-6]
        + [
            "--num-rollout",
            "3",
            "--config",
            path,
            "--lr",
            "2e-5",
            "--rm-opt",
            "timeout=9",
            "--rm-type",
            "math_verify",
            "--reward-post-process",
            "overlong_penalty",
        ],
        ps,
    )
    assert args.rollout_batch_size == 8 and args.n_samples_per_prompt == 4
    assert args.lr == 2e-5  # CLI over YAML
    assert args.update_weight_buffer_size == 10**9
    assert args.rm_opt == {"timeout": 9, "require_boxed": False}  # CLI keys override YAML keys
    assert args.reward_post_process == ["overlong_penalty"]  # CLI replaces, does not extend
    assert args.async_train is True and args.rollout_stop_token_ids == [1, 2]
    assert args._sources["--lr"] == "cli" and args._sources["--rollout-batch-size"] == f"yaml:{path}"
    validate_config(args, ps)


def test_yaml_negated_switch(ps, files):
    path = write_yaml(files["dir"] / "run.yaml", {"colocate": True, "no-offload-train": True, "offload_rollout": False})
    args = parse_config(["--config", path], ps)
    assert args.colocate and args.offload_train is False and args.offload_rollout is False
    assert parse_config(["--config", path, "--offload-train"], ps).offload_train is True


def test_command_line_turns_off_switches_set_by_yaml_or_recipe(ps, files, monkeypatch):
    monkeypatch.setitem(RECIPES, "switches-on", {"sequence_parallel": True, "balance_data": True})
    path = write_yaml(files["dir"] / "run.yaml", {"colocate": True, "use-dynamic-batch-size": True})
    args = parse_config(["--recipe", "switches-on", "--config", path, "--no-colocate", "--no-use-dynamic-batch-size",
                         "--no-sequence-parallel"], ps)
    assert args.colocate is False and args.use_dynamic_batch_size is False and args.sequence_parallel is False
    assert args.balance_data is True  # untouched recipe switch
    assert args._sources["--colocate"] == "cli" and args._sources["--sequence-parallel"] == "cli"
    assert args.placement == "colocate" and args.offload_train is False  # as if --colocate were never given
    # flags with their own --no- form keep it; --no-<flag> of a value flag is still unknown
    assert parse_config(["--colocate", "--no-offload-train"], ps).offload_train is False
    with pytest.raises(ConfigError, match="unrecognized arguments: --no-lr"):
        parse_config(["--no-lr"], ps)


def test_yaml_unknown_key_suggests(ps, files):
    path = write_yaml(files["dir"] / "run.yaml", {"rollout-batch-sise": 8})
    with pytest.raises(ConfigError) as info:
        parse_config(["--config", path], ps)
    message = str(info.value)
    assert path in message and "'rollout-batch-sise'" in message and "Did you mean 'rollout-batch-size'?" in message


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"colocate": "yes"}, "is a switch"),
        ({"rollout_batch_size": "many"}, "invalid value"),
        ({"rollout_batch_size": 2.5}, "expects an integer"),
        ({"seed": [1, 2]}, "takes one value"),
        ({"config": "other.yaml"}, "cannot name another config file"),
    ],
)
def test_yaml_bad_values(ps, files, data, expected):
    path = write_yaml(files["dir"] / "run.yaml", data)
    with pytest.raises(ConfigError, match=expected) as info:
        parse_config(["--config", path], ps)
    assert path in str(info.value)


def test_yaml_not_a_mapping_or_missing(ps, files):
    path = files["dir"] / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        parse_config(["--config", str(path)], ps)
    with pytest.raises(ConfigError, match="file not found"):
        parse_config(["--config", str(files["dir"] / "nope.yaml")], ps)
    with pytest.raises(ConfigError, match=r"--config .*: is a directory; give the YAML file itself"):
        parse_config(["--config", str(files["dir"])], ps)


def test_a_config_file_that_is_not_utf8_is_one_line_naming_it(ps, files):
    path = files["dir"] / "latin1.yaml"
    path.write_bytes("lr: 0.1  # réglé\n".encode("latin-1"))
    for flag in ("--config", "--custom-config-path"):
        with pytest.raises(ConfigError) as info:
            parse_config([flag, str(path)], ps)
        assert str(info.value).startswith(f"{flag} {path}: not UTF-8 text (byte ")
        assert str(info.value).endswith("; save it as UTF-8")


def test_a_key_given_twice_in_a_config_file_is_refused_not_dropped(ps, files):
    """PyYAML keeps the last of two equal keys; two spellings of one flag (underscores, dashes) too."""
    path = files["dir"] / "twice.yaml"
    for text, message in (("rollout_batch_size: 8\nseed: 1\nrollout-batch-size: 16\n",
                           "'rollout-batch-size' is given twice: also on line 1 (as 'rollout_batch_size'); keep one"),
                          ("lr: 0.1\nlr: 0.2\n", "'lr' is given twice: also on line 1; keep one")):
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            parse_config(["--config", str(path)], ps)
        assert str(info.value).startswith(f"--config {path}: not valid YAML ({message}")
    path.write_text("rm_opt: {a: 1}\nfilter_opt: {a: 2}\n")  # the same key in two mappings is fine
    parse_config(["--config", str(path)], ps)


def test_a_second_config_is_refused_not_dropped(ps, files):
    first = write_yaml(files["dir"] / "a.yaml", {"lr": 0.1})
    second = write_yaml(files["dir"] / "b.yaml", {"seed": 3})
    for argv in (["--config", first, "--config", second], [f"--config={first}", "--config", second]):
        with pytest.raises(ConfigError, match=r"--config given 2 times \(.*a.yaml, .*b.yaml\): a run reads one config "
                                              r"file; merge them into one"):
            parse_config(argv, ps)


def test_recipe_precedence(ps, files, monkeypatch):
    monkeypatch.setitem(RECIPES, "test-recipe", {"seed": 1, "lr": 1e-3, "eps_clip": 0.3, "rollout_top_k": 5})
    path = write_yaml(files["dir"] / "run.yaml", {"lr": 1e-4, "eps_clip": 0.25})
    args = parse_config(["--recipe", "test-recipe", "--config", path, "--eps-clip", "0.15"], ps)
    assert args.recipe == "test-recipe"
    assert args.rollout_top_k == 5  # recipe over default
    assert args.seed == 1  # recipe over default
    assert args.lr == 1e-4  # YAML over recipe
    assert args.eps_clip == 0.15  # CLI over YAML
    assert args.micro_batch_size == 1  # untouched default
    assert args._sources["--seed"] == "recipe:test-recipe"
    # a recipe named in the YAML applies too; --recipe on the command line overrides it
    path = write_yaml(files["dir"] / "run2.yaml", {"recipe": "test-recipe"})
    assert parse_config(["--config", path], ps).rollout_top_k == 5
    monkeypatch.setitem(RECIPES, "other", {"rollout_top_k": 7})
    assert parse_config(["--config", path, "--recipe", "other"], ps).rollout_top_k == 7


def test_unknown_recipe(ps):
    with pytest.raises(ConfigError, match=r"unknown recipe 'tiny-defualt'.*Did you mean 'tiny-default'\?"):
        parse_config(["--recipe", "tiny-defualt"], ps)


def test_recipes_only_name_real_flags(ps):
    parser = build_parser(ps)
    for name in RECIPES:
        for key in recipe_values(name):
            assert parser.action_for_key(key) is not None, f"recipe {name}: {key} is not a flag"


def test_custom_config_path_sets_attributes(ps, files):
    path = write_yaml(files["dir"] / "custom.yaml", {"my_threshold": 0.5, "my_list": [1, 2]})
    args = parse_config(["--custom-config-path", path], ps)
    assert args.my_threshold == 0.5 and args.my_list == [1, 2]
    assert config_to_dict(args)["extra"] == {"my_threshold": 0.5, "my_list": [1, 2]}
    path = write_yaml(files["dir"] / "bad.yaml", {"lr": 0.1})
    with pytest.raises(ConfigError, match="'lr' is a flag"):
        parse_config(["--custom-config-path", path], ps)


def test_unrecognized_flag_suggests(ps):
    with pytest.raises(
        ConfigError, match=r"unrecognized arguments: --rollout-batch-sise 4.*Did you mean --rollout-batch-size\?"
    ):
        parse_config(["--rollout-batch-sise", "4"], ps)


# --------------------------------------------------------------------------------------------------
# Validation: every rule names its flag
# --------------------------------------------------------------------------------------------------


VALIDATION_CASES = [
    (["--rollout-temperature", "0"], "--rollout-temperature must be > 0"),
    (["--rollout-temperature", "nan"], "--rollout-temperature must be > 0, got nan"),
    (["--lr", "-0.001"], "--lr must be >= 0, got -0.001"),
    (["--lr", "nan"], "--lr must be >= 0, got nan"),
    (["--adam-beta1", "1"], "--adam-beta1 must be in [0, 1), got 1.0"),
    (["--adam-beta2", "-0.5"], "--adam-beta2 must be in [0, 1), got -0.5"),
    (["--adam-eps", "0"], "--adam-eps must be > 0, got 0.0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0, got -0.1"),
    (["--rollout-top-k", "0"], "--rollout-top-k must be -1 (no top-k) or >= 1, got 0"),
    (["--rollout-top-k", "-2"], "--rollout-top-k must be -1 (no top-k) or >= 1, got -2"),
    (["--rollout-stop", ""], "--rollout-stop: an empty string is no stop string (it matches everywhere); drop the"),
    (["--eps-clip", "-0.2"], "--eps-clip must be >= 0, got -0.2"),
    (["--eps-clip-high", "-0.2"], "--eps-clip-high must be >= 0, got -0.2"),
    (["--use-tis", "--tis-clip", "-1"], "--tis-clip must be >= 0, got -1.0"),
    (["--use-tis", "--tis-clip-low", "3"], "--tis-clip-low (3.0) must be <= --tis-clip (2.0)"),
    (["--use-kl-loss", "--kl-loss-coef", "-0.1"], "--kl-loss-coef must be >= 0, got -0.1"),
    (["--kl-coef", "-0.1"], "--kl-coef must be >= 0, got -0.1"),
    (["--min-lr", "1e-3"], "--min-lr (0.001) must be <= --lr (1e-06): the schedule decays from --lr to --min-lr"),
    (["--lr-warmup-fraction", "1.5"], "--lr-warmup-fraction must be in [0, 1], got 1.5"),
    (["--lr-warmup-iters", "-1"], "--lr-warmup-iters must be >= 0, got -1"),
    (["--lr-decay-iters", "-1"], "--lr-decay-iters must be >= 0, got -1"),
    (["--gamma", "1.5"], "--gamma must be in [0, 1], got 1.5"),
    (["--lambd", "-0.5"], "--lambd must be in [0, 1], got -0.5"),
    (["--clip-grad", "-1"], "--clip-grad must be >= 0, got -1.0"),
    (["--clip-grad", "0"], "--clip-grad 0: the torch train backend would clip every gradient to norm 0"),
    (["--rollout-max-prompt-len", "-5"], "--rollout-max-prompt-len must be >= 1, got -5"),
    (["--sft-warmup-steps", "1", "--sft-warmup-lr", "-1"], "--sft-warmup-lr must be >= 0, got -1.0"),
    (["--optimizer", "sgd"], "--optimizer sgd: the torch train backend trains with adam (AdamW: --adam-beta1, "
                             "--adam-beta2, --adam-eps, --weight-decay) only; use --optimizer adam or drop it"),
    (["--reward-post-process", "overlong_penalty", "--rollout-max-response-len", "8", "--overlong-penalty-factor",
      "-1"], "--overlong-penalty-factor must be >= 0 (a negative one would reward overlong responses), got -1.0"),
    (["--reward-post-process", "overlong_penalty", "--reward-post-process", "overlong_penalty",
      "--rollout-max-response-len", "8"],
     "--reward-post-process overlong_penalty is given more than once (each would apply its change again)"),
    (["--eval-interval", "1", "--eval-prompt-data", "a", "x.jsonl", "a", "y.jsonl"],
     "--eval-prompt-data names a more than once; give each eval set its own name"),
    (["--train-backend", "megatron", "--attention-dropout", "1.5"], "--attention-dropout must be in [0, 1], got 1.5"),
    (["--train-backend", "megatron", "--hidden-dropout", "-0.1"], "--hidden-dropout must be in [0, 1], got -0.1"),
    (["--train-backend", "megatron", "--seq-length", "0"], "--seq-length must be >= 1, got 0"),
    (["--rollout-top-p", "1.5"], "--rollout-top-p must be in (0, 1]"),
    (["--rollout-top-p", "0.9"], "--rollout-top-p 0.9: training rollouts must sample the full vocabulary (1.0)"),
    (["--over-sampling-batch-size", "2"], "--over-sampling-batch-size (2) must be >= --rollout-batch-size (4)"),
    (["--save-interval", "5"], "--save-interval needs --save"),
    (["--eval-interval", "5"], "--eval-interval needs --eval-prompt-data"),
    (["--use-rollout-logprobs", "--use-tis"], "--use-rollout-logprobs and --use-tis exclude each other"),
    (["--kl-coef", "0.1", "--kl-loss-coef", "0.1"], "--kl-coef and --kl-loss-coef may not both be non-zero"),
    (["--eps-clip-c", "1.0"], "--eps-clip-c must be > 1"),
    (["--use-dynamic-batch-size"], "--use-dynamic-batch-size needs --max-tokens-per-gpu"),
    (["--advantage-estimator", "reinforce_plus_plus"], "requires --normalize-advantages"),
    (["--advantage-estimator", "rloo", "--n-samples-per-prompt", "1"], "--n-samples-per-prompt >= 2"),
    (["--n-samples-per-prompt", "1"], "--advantage-estimator grpo with --n-samples-per-prompt 1: each reward minus "
     "its group's mean is 0, so every advantage would be 0 and nothing would train; use --n-samples-per-prompt 2 or "
     "more (or --disable-rewards-normalization to train on the raw rewards)"),
    (
        ["--colocate", "--async"],
        "colocated async cannot keep weights fixed during generation; drop --colocate or --async",
    ),
    (["--lr-decay-style", "exponential"], "--lr-decay-style exponential: choose one of constant, linear, cosine"),
    (["--reward-error", "ignore"], "--reward-error ignore: choose one of zero, raise"),
    (["--kl-loss-type", "k4"], "--kl-loss-type k4: choose one of"),
    (["--loss-type", "custom_loss"], "--loss-type custom_loss needs --custom-loss-function-path"),
    (["--loss-type", "custom_loss", "--custom-loss-function-path", "m.f"], "are not implemented: plugrl's policy loss"),
    (["--debug-train-only", "--debug-rollout-only"], "--debug-train-only and --debug-rollout-only"),
    (["--placement", "decoupled"], "--placement decoupled: decoupled placement needs --rollout-num-gpus"),
    (
        ["--colocate", "--placement", "decoupled", "--rollout-num-gpus", "2"],
        "--colocate conflicts with --placement decoupled",
    ),
    (
        ["--rollout-num-gpus-per-engine", "3", "--colocate", "--actor-num-gpus-per-node", "4"],
        "--rollout-num-gpus (4) must be divisible by --rollout-num-gpus-per-engine (3)",
    ),
    (
        ["--overlong-buffer-len", "8"],
        "--overlong-buffer-len has no effect without --reward-post-process overlong_penalty",
    ),
    (["--reward-post-process", "overlong_penalty"], "overlong_penalty needs --rollout-max-response-len"),
    (["--n-samples-per-prompt", "0"], "--n-samples-per-prompt must be >= 1"),
    (["--custom-rm-path", "justaname"], "--custom-rm-path justaname: write it as module.attr"),
    (
        ["--dynamic-sampling-filter", "nonzero_std", "--dynamic-sampling-filter-path", "m.f"],
        "--dynamic-sampling-filter and --dynamic-sampling-filter-path both given",
    ),
    (["--eval-prompt-data", "aime"], "--eval-prompt-data: aime does not exist"),
    (["--eval-prompt-data", "a", "b", "c"], "--eval-prompt-data takes NAME PATH pairs"),
    (["--sft-warmup-steps", "5"], "--sft-warmup-steps needs --sft-warmup-data"),
    (["--hf-checkpoint", ""], "--hf-checkpoint is required (the model to train): give a local Hugging Face "
     "checkpoint folder"),
    (
        ["--tensor-model-parallel-size", "2"],
        (
            "--tensor-model-parallel-size 2 does not divide the 1 train GPUs (--actor-num-nodes 1 × "
            "--actor-num-gpus-per-node 1); use a size that divides 1 (1) or change the train GPUs"
        ),
    ),
    (
        ["--actor-num-gpus-per-node", "4", "--num-gpus-per-node", "2"],
        "--actor-num-gpus-per-node 4 is more than a node has (--num-gpus-per-node 2); use more --actor-num-nodes",
    ),
]


@pytest.mark.parametrize("extra, expected", VALIDATION_CASES, ids=[c[0][0] for c in VALIDATION_CASES])
def test_validation_rule(ps, base, extra, expected):
    assert expected in problems_of(base + extra, ps)


IDLE_SETTINGS = [
    (["--eval-prompt-data", "EVAL"], "--eval-prompt-data EVAL has no effect without --eval-interval N"),
    (["--eval-temperature", "0.5"], "--eval-temperature 0.5 has no effect without --eval-prompt-data NAME PATH and "
                                    "--eval-interval N; drop --eval-temperature or add them"),
    (["--eval-top-k", "5"], "--eval-top-k 5 has no effect without --eval-prompt-data"),
    (["--eval-top-p", "0.5"], "--eval-top-p 0.5 has no effect without --eval-prompt-data"),
    (["--n-samples-per-eval-prompt", "4"], "--n-samples-per-eval-prompt 4 has no effect without --eval-prompt-data"),
    (["--eval-input-key", "q"], "--eval-input-key q has no effect without --eval-prompt-data"),
    (["--eval-max-response-len", "64"], "--eval-max-response-len 64 has no effect without --eval-prompt-data"),
    (["--sft-warmup-data", "EVAL"], "--sft-warmup-data EVAL has no effect without --sft-warmup-steps N; drop "
                                    "--sft-warmup-data or add it"),
    (["--sft-warmup-lr", "0.01"], "--sft-warmup-lr 0.01 has no effect without --sft-warmup-steps N"),
    (["--sft-warmup-batch-size", "2"], "--sft-warmup-batch-size 2 has no effect without --sft-warmup-steps N"),
    (["--kl-loss-coef", "0.1"], "--kl-loss-coef 0.1 has no effect without --use-kl-loss; drop --kl-loss-coef or add it"),
    (["--use-unbiased-kl"], "--use-unbiased-kl has no effect without --use-kl-loss"),
    (["--kl-loss-type", "k3"], "--kl-loss-type k3 has no effect without --use-kl-loss or --kl-coef"),
    (["--tis-clip", "3"], "--tis-clip 3.0 has no effect without --use-tis"),
    (["--tis-clip-low", "0.5"], "--tis-clip-low 0.5 has no effect without --use-tis"),
    (["--mask-offpolicy-in-partial-rollout"], "--mask-offpolicy-in-partial-rollout has no effect without "
                                              "--partial-rollout"),
    (["--max-tokens-per-gpu", "512"], "--max-tokens-per-gpu 512 has no effect without --use-dynamic-batch-size"),
    (["--wandb-project", "p"], "--wandb-project p has no effect without --use-wandb"),
    (["--wandb-key", "s3cret"], "--wandb-key has no effect without --use-wandb"),
]


@pytest.mark.parametrize("extra, expected", IDLE_SETTINGS, ids=[" ".join(c[0]) for c in IDLE_SETTINGS])
def test_settings_that_would_do_nothing_are_refused(ps, base, files, extra, expected):
    extra = [files["eval"] if word == "EVAL" else word for word in extra]
    message = problems_of(base + extra, ps).replace(files["eval"], "EVAL")
    assert expected in message and "s3cret" not in message


def test_idle_settings_count_only_when_the_user_gave_them(ps, base, files):
    """A value equal to the default (or to what it derives from), a recipe's value, and a saved config.yaml
    that lists every flag pass; a value with its switch passes."""
    for argv in (["--kl-loss-coef", "0"], ["--tis-clip", "2"], ["--eval-temperature", "1.0"],
                 ["--use-kl-loss", "--kl-loss-coef", "0.1"], ["--use-tis", "--tis-clip", "3"],
                 ["--kl-coef", "0.01", "--kl-loss-type", "k3"], ["--use-kl-loss", "--use-unbiased-kl"],
                 ["--eval-prompt-data", "toy", files["eval"], "--eval-interval", "0"],  # eval off on purpose
                 ["--use-rs", "--tis-clip", "3"], ["--use-dynamic-batch-size", "--max-tokens-per-gpu", "512"],
                 ["--sft-warmup-steps", "2", "--sft-warmup-data", files["eval"], "--sft-warmup-lr", "0.01"]):
        check_config(parse_config(base + argv, ps), ps)
    # the embedded default turns eval off by --eval-interval 0 and the warm-up by --sft-warmup-steps 0
    args = parse_config(["--recipe", "tiny-default", "--hf-checkpoint", files["ckpt"], "--eval-interval", "0",
                         "--sft-warmup-steps", "0"], ps)
    check_config(args, ps)
    saved = write_yaml(files["dir"] / "saved.yaml", config_to_dict(parse_config(base, ps)))
    check_config(parse_config(["--config", saved], ps), ps)
    # a saved config.yaml with one root flag changed: its derived values (sft_warmup_lr = lr, eval_* = rollout_*)
    # are the file's derivation, not settings the user gave
    check_config(parse_config(["--config", saved, "--lr", "2e-6", "--rollout-temperature", "0.8",
                               "--rollout-max-response-len", "32"], ps), ps)


def test_an_idle_setting_from_the_config_file_names_the_file_and_key(ps, base, files):
    path = write_yaml(files["dir"] / "run.yaml", {"kl_loss_coef": 0.2})
    assert f"--kl-loss-coef 0.2 (key kl_loss_coef in {path}) has no effect without --use-kl-loss" in \
        problems_of(base + ["--config", path], ps)


EVAL_RANGES = [
    (["--eval-top-p", "0"], "--eval-top-p must be in (0, 1], got 0.0"),
    (["--eval-top-k", "0"], "--eval-top-k must be -1 (no top-k) or >= 1, got 0"),
    (["--eval-temperature", "-0.5"], "--eval-temperature must be >= 0 (0: greedy), got -0.5"),
    (["--eval-max-response-len", "-1"], "--eval-max-response-len must be >= 1, got -1"),
]


@pytest.mark.parametrize("extra, expected", EVAL_RANGES, ids=[c[0][0] for c in EVAL_RANGES])
def test_eval_sampling_ranges(ps, base, files, extra, expected):
    evaluated = ["--eval-prompt-data", files["eval"], "--eval-interval", "2"]
    assert expected in problems_of(base + evaluated + extra, ps)
    validate_config(parse_config(base + evaluated + ["--eval-temperature", "0"], ps), ps)  # greedy eval


def test_a_bad_value_is_reported_at_its_root_not_at_the_flags_derived_from_it(ps, base):
    message = problems_of(base + ["--rollout-batch-size", "-3"], ps)
    assert message == "--rollout-batch-size must be >= 1, got -3"
    message = problems_of(base + ["--rollout-top-k", "0"], ps)
    assert "--rollout-top-k" in message and "--eval-top-k" not in message
    validate_config(parse_config(base + ["--entropy-coef", "-0.01"], ps), ps)  # slime allows it (more entropy)


def test_colocate_false_in_the_config_file_is_the_default_not_a_no_colocate(ps, base, files):
    for value in (False, None):
        path = write_yaml(files["dir"] / "run.yaml", {"colocate": value})
        check_config(parse_config(base + ["--config", path], ps), ps)
    # over a recipe that turns it on, it is a --no-colocate, and the message names the file and key
    path = write_yaml(files["dir"] / "run.yaml", {"colocate": False, "recipe": "qwen3-4b-8xh100"})
    with pytest.raises(ConfigError) as info:
        check_config(parse_config(["--config", path], ps), ps)
    assert f"--no-colocate (key colocate in {path}) without --rollout-num-gpus" in str(info.value)


def test_nonzero_std_filter_refuses_groups_of_one(ps, base):
    """A group of one has zero std: nonzero_std would drop every group and the rollout never end (its declared
    check); the fallback variant keeps groups once too few remain, so it finishes and is allowed."""
    one = ["--n-samples-per-prompt", "1", "--advantage-estimator", "reinforce_plus_plus", "--normalize-advantages"]
    message = problems_of(base + one + ["--dynamic-sampling-filter", "nonzero_std"], ps)
    assert ("--dynamic-sampling-filter nonzero_std with --n-samples-per-prompt 1: a group of one sample has zero "
            "reward std, so every group would be dropped and the rollout would never end; use --n-samples-per-prompt "
            "2 or more, or drop the filter") in message
    validate_config(parse_config(base + one + ["--dynamic-sampling-filter", "nonzero_std_with_fallback"], ps), ps)
    validate_config(parse_config(base + ["--dynamic-sampling-filter", "nonzero_std"], ps), ps)


def test_a_nucleus_is_refused_only_for_rollouts_that_are_trained(ps, base, files):
    evaluated = ["--eval-prompt-data", files["eval"], "--eval-interval", "2"]
    for argv in ([*evaluated, "--eval-top-p", "0.9"], ["--rollout-top-p", "0.9", "--debug-rollout-only"], ["--rollout-top-p", "1"]):
        validate_config(parse_config(base + argv, ps), ps)


def test_run_length_required_with_prompt_data(ps, base):
    argv = [a for i, a in enumerate(base) if a != "--num-rollout" and base[i - 1] != "--num-rollout"]
    assert "give --num-rollout or --num-epoch" in problems_of(argv, ps)
    validate_config(parse_config(argv + ["--num-epoch", "2"], ps), ps)


def test_paths_checked(ps, base, files):
    missing = str(files["dir"] / "missing.jsonl")
    assert f"--prompt-data: {missing} does not exist" in problems_of(base + ["--prompt-data", missing + "@[0:10]"], ps)
    validate_config(parse_config(base + ["--prompt-data", files["prompts"] + "@[0:10]"], ps), ps)
    empty = files["dir"] / "empty_model"
    empty.mkdir()
    assert "--hf-checkpoint" in problems_of(base + ["--hf-checkpoint", str(empty)], ps)
    assert "has no config.json" in problems_of(base + ["--hf-checkpoint", str(empty)], ps)
    assert "is not a directory" in problems_of(base + ["--hf-checkpoint", missing], ps)
    validate_config(parse_config(base + ["--eval-prompt-data", "toy", files["eval"], "--eval-interval", "2"], ps), ps)
    validate_config(parse_config(base + ["--eval-prompt-data", files["eval"], "--eval-interval", "2"], ps), ps)


def test_config_problems_and_machine_problems_are_separate(ps, base, files):
    missing = str(files["dir"] / "missing.jsonl")
    args = parse_config(base + ["--prompt-data", missing, "--rollout-temperature", "0"], ps)
    assert config_problems(args, ps) == ["--rollout-temperature must be > 0, got 0.0"]
    assert environment_problems(args, ps) == [f"--prompt-data: {missing} does not exist"]
    with pytest.raises(ConfigError) as info:
        validate_config(args, ps)
    assert len(info.value.problems) == 2
    args = parse_config(base + ["--prompt-data", missing], ps)
    check_config(args, ps)  # the values are fine; only this machine lacks the file
    with pytest.raises(ConfigError, match="does not exist"):
        validate_config(args, ps)


def test_recipe_paths_say_how_to_replace_them(ps, files, monkeypatch):
    missing = str(files["dir"] / "absent")
    monkeypatch.setitem(RECIPES, "with-paths", {"hf_checkpoint": missing, "prompt_data": missing + ".jsonl",
                                                "rollout_batch_size": 2, "rm_type": "deepscaler", "num_rollout": 1})
    problems = environment_problems(parse_config(["--recipe", "with-paths"], ps), ps)
    hint = "(set by recipe 'with-paths': put your copy there or pass"
    assert problems == [
        f"--prompt-data: {missing}.jsonl does not exist {hint} --prompt-data PATH)",
        f"--hf-checkpoint {missing} is not a directory {hint} --hf-checkpoint DIR)",
    ]
    # given on the command line, the same path gets the plain message
    args = parse_config(["--recipe", "with-paths", "--hf-checkpoint", missing], ps)
    assert f"--hf-checkpoint {missing} is not a directory (give a Hugging Face model directory)" in \
        environment_problems(args, ps)


def test_device_cuda_without_cuda(ps, base, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "--device cuda: no CUDA device is visible" in problems_of(base + ["--device", "cuda"], ps)
    assert "--device gpu: choose one of auto, cpu, cuda" in problems_of(base + ["--device", "gpu"], ps)


def test_all_problems_reported_together(ps, base):
    args = parse_config(
        base + ["--rollout-temperature", "0", "--eps-clip-c", "0.5", "--use-tis", "--use-rollout-logprobs"], ps
    )
    with pytest.raises(ConfigError) as info:
        validate_config(args, ps)
    assert len(info.value.problems) == 3 and str(info.value).startswith("3 problems in the run config")


@pytest.mark.parametrize(
    "flag, name, kind",
    [
        ("--rm-type", "deepscaller", "reward"),
        ("--advantage-estimator", "grpoo", "advantage_estimator"),
        ("--train-backend", "torhc", "train_backend"),
        ("--rollout-backend", "hff", "rollout_backend"),
        ("--placement", "colocated", "placement"),
        ("--buffer-filter", "fifoo", "buffer_policy"),
        ("--dynamic-sampling-filter", "nonzero-std", "filter"),
        ("--reward-post-process", "overlong", "reward_post_processor"),
    ],
)
def test_unknown_plugin_names(ps, base, flag, name, kind):
    message = problems_of(base + [flag, name], ps)
    assert f"{flag}: {ps.registries[kind].unknown_message(name)}" in message
    assert "Did you mean" in message


# --------------------------------------------------------------------------------------------------
# Backend-owned flags: implied backends, conflicts, requirements, sglang passthrough
# --------------------------------------------------------------------------------------------------

QWEN3_MODEL_ARGS = """
--swiglu --num-layers 36 --hidden-size 2560 --ffn-hidden-size 9728 --num-attention-heads 32
--group-query-attention --num-query-groups 8 --use-rotary-position-embeddings --disable-bias-linear
--normalization RMSNorm --norm-epsilon 1e-6 --rotary-base 1000000 --vocab-size 151936 --kv-channels 128
--qk-layernorm
"""
# slime's scripts/run-qwen3-4B.sh (reference §9) plus the guide's doc-only flags.
QWEN3_RUN_ARGS = """
--actor-num-nodes 1 --actor-num-gpus-per-node 8 --colocate
--hf-checkpoint {ckpt} --ref-load /root/Qwen3-4B_torch_dist --load /root/Qwen3-4B_slime/
--save /root/Qwen3-4B_slime/ --save-interval 20
--prompt-data {prompts} --input-key prompt --label-key label --apply-chat-template --rollout-shuffle
--rm-type deepscaler --num-rollout 3000 --rollout-batch-size 32 --n-samples-per-prompt 8
--rollout-max-response-len 8192 --rollout-temperature 1 --global-batch-size 256 --balance-data
--over-sampling-batch-size 64
--dynamic-sampling-filter-path slime.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std
--eval-interval 20 --eval-prompt-data aime {eval} --n-samples-per-eval-prompt 16
--eval-max-response-len 16384 --eval-top-p 1
--tensor-model-parallel-size 2 --sequence-parallel --pipeline-model-parallel-size 1 --context-parallel-size 1
--expert-model-parallel-size 1 --expert-tensor-parallel-size 1
--recompute-granularity full --recompute-method uniform --recompute-num-layers 1
--use-dynamic-batch-size --max-tokens-per-gpu 9216
--advantage-estimator grpo --use-kl-loss --kl-loss-coef 0.00 --kl-loss-type low_var_kl --entropy-coef 0.00
--eps-clip 0.2 --eps-clip-high 0.28
--optimizer adam --lr 1e-6 --lr-decay-style constant --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.98
--rollout-num-gpus-per-engine 2 --sglang-mem-fraction-static 0.7 --sglang-server-concurrency 160
--sglang-cuda-graph-bs 1 2 4 8 16 24 32 40 48 56 64 72 80 88 96 104 112 120 128 136 144 152 160 168 176 184 192 200 208 216 224 232 240 248 256
--attention-dropout 0.0 --hidden-dropout 0.0 --accumulate-allreduce-grads-in-fp32 --attention-softmax-in-fp32
--attention-backend flash
"""


def qwen3_argv(files):
    return (QWEN3_MODEL_ARGS + QWEN3_RUN_ARGS.format(**files)).split()


def test_slime_qwen3_4b_flags_parse_and_fail_fast_on_megatron(ps, files, monkeypatch):
    args = parse_config(qwen3_argv(files), ps)  # no "unrecognized arguments"
    assert args.train_backend == "megatron" and args.rollout_backend == "sglang"
    assert "--tensor-model-parallel-size" in args._implied["train_backend"]
    assert args.tensor_model_parallel_size == 2 and args.sequence_parallel is True and args.num_layers == 36
    assert args.normalization == "RMSNorm" and args.rotary_base == 1000000 and args.norm_epsilon == 1e-6
    assert args.sglang_mem_fraction_static == 0.7 and args.rollout_concurrency == 160
    assert args.sglang_cuda_graph_bs[:5] == [1, 2, 4, 8, 16] and args.sglang_cuda_graph_bs[-1] == 256
    assert args.placement == "colocate" and args.rollout_num_gpus == 8
    assert args.offload_train is True and args.offload_rollout is True
    assert args.eps_clip_high == 0.28 and args.num_steps_per_rollout == 1
    assert args.eval_prompt_data == ["aime", files["eval"]] and args.eval_top_p == 1.0
    assert megatron_options.given_model_flags(args)["kv_channels"] == 128
    assert sglang_options.server_overrides(args)["mem_fraction_static"] == 0.7

    # Simulate a laptop without megatron-core (dev/CI installs it for the megatron backend tests).
    monkeypatch.setitem(sys.modules, "megatron", None)
    monkeypatch.setitem(sys.modules, "megatron.core", None)
    missing = ps.entry("train_backend", "megatron").missing_requirements()
    assert missing
    args_error = pytest.raises(ConfigError)
    with args_error as info:
        validate_config(args, ps)
    message = str(info.value)
    assert "unrecognized" not in message
    assert "--train-backend megatron (implied by --tensor-model-parallel-size, --sequence-parallel" in message
    verb = "is" if len(missing) == 1 else "are"
    assert f"requires the megatron backend (pip install plugrl[megatron]): {', '.join(missing)} {verb} not importable" \
        in message
    # the guide's slime filter path is plugrl's built-in nonzero_std (core/slime_compat.py)
    assert args.dynamic_sampling_filter == "nonzero_std" and args.dynamic_sampling_filter_path is None
    other = [p for p in info.value.problems if "megatron" not in p and "sglang" not in p]
    if not Path("/root/Qwen3-4B_torch_dist").exists():  # the script's --ref-load is the user's conversion
        assert other.pop(0).startswith("--ref-load /root/Qwen3-4B_torch_dist does not exist")
    assert other == []  # everything else of the recipe is valid


def test_sglang_requirement_message(ps, base, monkeypatch):
    # Simulate a laptop without sglang-router (dev/CI installs it for the router tests).
    monkeypatch.setitem(sys.modules, "sglang_router", None)
    message = problems_of(base + ["--sglang-mem-fraction-static", "0.5"], ps)
    assert (
        "--rollout-backend sglang (implied by --sglang-mem-fraction-static) requires the sglang backend "
        "(pip install plugrl[sglang])" in message
    )


def test_sglang_passthrough_collection(ps):
    args = parse_config(
        [
            "--sglang-foo-bar",
            "3",
            "--seed",
            "7",
            "--sglang-enable-metrics",
            "--sglang-qux=1",
            "--sglang-list",
            "1",
            "2",
            "--sglang-neg",
            "-1",
            "--sglang-mem-fraction-static",
            "0.6",
            "--router-prometheus-port",
            "9000",
            "--megatron-moe-router-topk",
            "2",
        ],
        ps,
    )
    assert args.sglang_passthrough == {
        "foo_bar": "3",
        "enable_metrics": True,
        "qux": "1",
        "list": ["1", "2"],
        "neg": "-1",
    }
    assert args.sglang_mem_fraction_static == 0.6 and args.seed == 7
    assert args.router_passthrough == {"prometheus_port": "9000"}
    assert args.megatron_passthrough == {"moe_router_topk": "2"}
    assert args.rollout_backend == "sglang" and args.train_backend == "megatron"
    assert "--sglang-foo-bar" in args._implied["rollout_backend"]
    overrides = sglang_options.server_overrides(args)
    assert overrides["foo_bar"] == "3" and overrides["mem_fraction_static"] == 0.6


def test_sglang_passthrough_from_yaml(ps, files):
    path = write_yaml(
        files["dir"] / "run.yaml", {"sglang-chunked-prefill-size": 4096, "sglang_passthrough": {"enable_metrics": True}}
    )
    args = parse_config(["--config", path, "--sglang-chunked-prefill-size", "8192"], ps)
    assert args.sglang_passthrough == {"chunked_prefill_size": "8192", "enable_metrics": True}
    assert args.rollout_backend == "sglang"


def test_sglang_reserved_flags_refused(ps):
    with pytest.raises(ConfigError, match=r"--sglang-tp-size is set by plugrl \(it is --rollout-num-gpus-per-engine\)"):
        parse_config(["--sglang-tp-size", "2"], ps)
    # SGLang's aliases of reserved flags would reach the server after plugrl's own and win
    for argv, reason in ((["--sglang-tensor-parallel-size", "2"], "it is --sglang-tp-size"),
                         (["--sglang-model", "/x"], "it is --sglang-model-path"),
                         (["--sglang-nccl-init-addr", "h:1"], "it is --sglang-dist-init-addr"),
                         (["--sglang-host", "0.0.0.0"], "plugrl serves each engine on the rollout manager's host"),
                         # weight pushes address TP ranks only: SGLang refuses DP engines, PP stages would collide
                         (["--sglang-dp-size", "2"], "SGLang refuses weight pushes to an engine with dp_size > 1"),
                         (["--sglang-data-parallel-size", "2"], "it is --sglang-dp-size"),
                         (["--sglang-pipeline-parallel-size", "2"], "it is --sglang-pp-size: the weight-update group")):
        with pytest.raises(ConfigError, match=rf"{argv[0]} is set by plugrl \({reason}"):
            parse_config(argv, ps)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["--train-backend", "torch", "--tensor-model-parallel-size", "2"],
            "--tensor-model-parallel-size belongs to the megatron backend; drop it or use --train-backend megatron",
        ),
        (
            ["--train-backend", "torch", "--sequence-parallel", "--num-layers", "4"],
            "--sequence-parallel, --num-layers belong to the megatron backend; drop them or use --train-backend megatron",
        ),
        (
            ["--rollout-backend", "hf", "--sglang-mem-fraction-static", "0.5"],
            "--sglang-mem-fraction-static belongs to the sglang backend; drop it or use --rollout-backend sglang",
        ),
        (["--rollout-backend", "hf", "--sglang-anything", "1"], "--sglang-anything belongs to the sglang backend"),
        (
            ["--rollout-backend", "hf", "--sglang-server-concurrency", "8"],
            "--sglang-server-concurrency belongs to the sglang backend",
        ),
    ],
)
def test_backend_flag_conflicts(ps, argv, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(argv, ps)
    assert expected in str(info.value)


class ThirdPartyOptions:
    """A third-party reward and post-processor that own their flags, like the backends do."""

    @core_hookimpl
    def plugrl_register_rewards(self, register):
        register("myrm", lambda sample, **options: 1.0)

    @core_hookimpl
    def plugrl_register_reward_post_processors(self, register):
        register("clip_rewards", lambda samples, args: None)

    @core_hookimpl
    def plugrl_add_options(self, parser):
        group = parser.add_plugin_group("myrm reward", kind="reward", name="myrm")
        group.add_argument("--myrm-threshold", type=float)
        group = parser.add_plugin_group(
            "clip_rewards post-processor", kind="reward_post_processor", name="clip_rewards"
        )
        group.add_argument("--clip-rewards-max", type=float)


def test_third_party_plugins_own_flags_too(base):
    extra = {name: module for name, module in OPTION_MODULES.items() if name not in BUILTIN_PLUGINS}
    ps = make_plugin_manager(entry_points=False, extra_plugins={**extra, "third": ThirdPartyOptions()})
    argv = [a for a in base if a not in ("--rm-type", "deepscaler")]
    args = parse_config(argv + ["--myrm-threshold", "0.5", "--clip-rewards-max", "1"], ps)
    assert args.rm_type == "myrm" and args.myrm_threshold == 0.5
    assert args.reward_post_process == ["clip_rewards"]
    validate_config(args, ps)
    args = parse_config(
        argv
        + ["--reward-post-process", "overlong_penalty", "--clip-rewards-max", "1", "--rollout-max-response-len", "16"],
        ps,
    )
    assert args.reward_post_process == ["overlong_penalty", "clip_rewards"]
    with pytest.raises(ConfigError, match="--myrm-threshold belongs to the myrm reward; drop it or use --rm-type myrm"):
        parse_config(argv + ["--rm-type", "deepscaler", "--myrm-threshold", "0.5"], ps)
    assert "\nmyrm reward:" in build_parser(ps).format_help()


class MissingRequirementTrainer:
    @core_hookimpl
    def plugrl_register_train_backends(self, register):
        register("needs_xyz", "plugrl.plugins.filters.fifo:FifoBuffer", requires=("plugrl_not_a_real_pkg_xyz",),
                 extra="xyz")


def test_a_third_party_backend_with_a_missing_requirement_is_one_problem(base):
    """Selected by its flag (nothing implies it), a third-party backend whose package is missing is a config
    problem naming it, with no pip hint into plugrl's extras (the extra is its own distribution's)."""
    extra = {name: module for name, module in OPTION_MODULES.items() if name not in BUILTIN_PLUGINS}
    ps = make_plugin_manager(entry_points=False, extra_plugins={**extra, "xyz": MissingRequirementTrainer()})
    args = parse_config(base + ["--train-backend", "needs_xyz"], ps)
    with pytest.raises(ConfigError) as info:
        validate_config(args, ps)
    (problem,) = [p for p in info.value.problems if "needs_xyz" in p]
    assert problem == ("--train-backend needs_xyz requires the needs_xyz backend (pip install plugrl_not_a_real_pkg_xyz):"
                       " plugrl_not_a_real_pkg_xyz is not importable")


def test_generic_flags_do_not_imply_backends(ps):
    args = parse_config(["--rollout-concurrency", "8", "--lr", "1e-5", "--optimizer", "adam", "--clip-grad", "0.5"], ps)
    assert (args.train_backend, args.rollout_backend) == ("torch", "hf") and args.rollout_concurrency == 8


def test_debug_modes_skip_the_unused_backend_requirement(ps, base, monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron", None)  # as on a laptop without megatron-core
    monkeypatch.setitem(sys.modules, "megatron.core", None)
    assert ps.entry("train_backend", "megatron").missing_requirements()
    validate_config(parse_config(base + ["--train-backend", "megatron", "--debug-rollout-only"], ps), ps)


# --------------------------------------------------------------------------------------------------
# Help, serialisation, import hygiene
# --------------------------------------------------------------------------------------------------


def test_help_lists_every_group(ps, capsys):
    text = build_parser(ps).format_help()
    for title in (
        "run and cluster",
        "plugins",
        "checkpoints",
        "data",
        "rollout",
        "eval",
        "algorithm",
        "training (all backends)",
        "logging",
        "custom functions (slime --*-path)",
        "megatron backend",
        "sglang backend",
    ):
        assert f"\n{title}:" in text, title
    assert "(requires plugrl[megatron])" in text and "(requires plugrl[sglang])" in text
    assert "--tensor-model-parallel-size" in text and "--sglang-mem-fraction-static" in text
    with pytest.raises(SystemExit) as info:
        parse_config(["--help"], ps)
    assert info.value.code == 0 and "megatron backend" in capsys.readouterr().out


def test_config_to_dict_round_trip(ps, base, files):
    argv = base + [
        "--rm-opt",
        "timeout=3",
        "--reward-post-process",
        "overlong_penalty",
        "--rollout-max-response-len",
        "64",
        "--rollout-stop",
        "</s>",
        "<|im_end|>",
        "--apply-chat-template-kwargs",
        '{"enable_thinking": false}',
        "--async",
        "--rollout-num-gpus",
        "1",
        "--sglang-enable-metrics",
        "--sglang-mem-fraction-static",
        "0.5",
    ]
    args = parse_config(argv, ps)
    data = config_to_dict(args)
    assert json.loads(json.dumps(data)) == data
    assert yaml.safe_load(yaml.safe_dump(data)) == data
    assert not any(key.startswith("_") for key in data) and "config" not in data
    path = write_yaml(files["dir"] / "resolved.yaml", data)
    again = parse_config(["--config", path], ps)
    assert config_to_dict(again) == data
    assert again.rollout_backend == "sglang" and again.sglang_passthrough == {"enable_metrics": True}


def test_config_to_dict_round_trip_tiny_default(ps, files):
    data = config_to_dict(parse_config(["--recipe", DEFAULT_RECIPE, "--hf-checkpoint", files["ckpt"]], ps))
    path = write_yaml(files["dir"] / "resolved.yaml", data)
    again = parse_config(["--config", path], ps)
    assert again.recipe == DEFAULT_RECIPE and config_to_dict(again) == data
    validate_config(again, ps)


def test_parsing_and_validation_do_not_import_torch_or_backends(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for name, text in (("config.json", "{}"), ("tokenizer.json", "{}"), ("model.safetensors", "")):
        (model / name).write_text(text)
    code = textwrap.dedent("""
        import sys
        from plugrl.core.config import parse_config, validate_config
        from plugrl.core.plugins import make_plugin_manager
        ps = make_plugin_manager(entry_points=False)
        validate_config(parse_config(["--rollout-batch-size", "2", "--n-samples-per-prompt", "2", "--rm-type",
                                      "deepscaler", "--hf-checkpoint", "model", "--num-rollout", "1"], ps), ps)
        try:
            validate_config(parse_config(["--tensor-model-parallel-size", "2", "--sglang-foo", "1"], ps), ps)
        except ValueError:
            pass
        # (finding megatron.core's spec imports the bare "megatron" namespace package, which is cheap)
        heavy = [m for m in ("torch", "megatron.core", "sglang", "sglang_router", "transformers") if m in sys.modules]
        assert not heavy, heavy
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    assert config_module.ConfigError is ConfigError


@pytest.mark.parametrize("flags, message", [
    (["--sglang-config", "groups.yaml"], "--sglang-config groups.yaml: server groups"),
    (["--prefill-num-servers", "2"], "--prefill-num-servers 2: prefill/decode disaggregation is not implemented"),
])
def test_unimplemented_sglang_flags_are_refused_on_the_driver(capsys, flags, message):
    from plugrl.core.train_cli import main

    assert main([*flags, "--device", "cpu", "--dry-run"]) == 2  # either flag selects the sglang backend
    assert message in capsys.readouterr().err


def test_flags_moved_into_a_config_file_keep_the_default_run(tmp_path, capsys):
    """A --config file that names no data, model or recipe runs the embedded default, exactly as the
    same values given as flags do (the printed configs are equal)."""
    import yaml

    from plugrl.core.train_cli import main

    flags = ["--num-rollout", "3", "--rm-type", "math", "--advantage-estimator", "rloo"]
    assert main([*flags, "--device", "cpu", "--dry-run"]) == 0
    from_flags = capsys.readouterr().out.split("# ---- plan")[0]
    (tmp_path / "run.yaml").write_text("num-rollout: 3\nrm_type: math\nadvantage-estimator: rloo\n")
    assert main(["--config", str(tmp_path / "run.yaml"), "--device", "cpu", "--dry-run"]) == 0
    from_file = capsys.readouterr().out.split("# ---- plan")[0]
    # (the default output_dir is runs/<time to the second>: the two dry runs may fall in different seconds)
    file_config, flags_config = yaml.safe_load(from_file), yaml.safe_load(from_flags)
    assert file_config.pop("output_dir").startswith("runs/") and flags_config.pop("output_dir").startswith("runs/")
    assert file_config == flags_config
    assert file_config["recipe"] == DEFAULT_RECIPE
    # a file that names the data is the user's own run: no default recipe under it
    (tmp_path / "own.yaml").write_text(f"prompt-data: {tmp_path / 'none.jsonl'}\n")
    main(["--config", str(tmp_path / "own.yaml"), "--device", "cpu", "--dry-run"])
    assert "--rollout-batch-size is required" in capsys.readouterr().err


def test_launched_sglang_engines_need_a_supported_sglang_package_here(ps, base, monkeypatch):
    """A machine problem (``--dry-run`` lists it, a run stops on the driver): before, the rollout manager
    found out after the trainer had loaded."""
    from plugrl.plugins.backends.sglang import compat, launch

    monkeypatch.delenv(launch.LAUNCH_ENV, raising=False)
    monkeypatch.delenv(compat.ALLOW_UNSUPPORTED_ENV, raising=False)
    args = parse_config(base + ["--rollout-backend", "sglang"], ps)
    monkeypatch.setattr(compat, "installed_version", lambda: None)
    (problem,) = environment_problems(args, ps)
    assert "--rollout-backend sglang (the installed sglang package): the sglang package is not installed" in problem
    monkeypatch.setattr(compat, "installed_version", lambda: "0.6.0rc1")
    (problem,) = environment_problems(args, ps)
    assert "runs SGLang '0.6.0rc1'; plugrl supports SGLang >=0.5.9,<0.6" in problem
    monkeypatch.setattr(compat, "installed_version", lambda: "0.5.15.post1")
    assert environment_problems(args, ps) == []
    monkeypatch.setattr(compat, "installed_version", lambda: None)
    # engines not launched with SGLang's server: nothing to install here
    assert environment_problems(parse_config(base + ["--rollout-external-engine-addrs", "127.0.0.1:1"], ps), ps) == []
    assert config_problems(args, ps) == []  # a dry run elsewhere (a laptop) still previews it
    monkeypatch.setenv(launch.LAUNCH_ENV, "python -m plugrl.plugins.backends.sglang.server")
    assert environment_problems(args, ps) == []


@pytest.mark.parametrize("flags, expected", [
    ([], (256, 1)),                                        # the default run: 32 x 8 samples, one step
    (["--rollout-batch-size", "16"], (128, 1)),            # the recipe's 256 no longer divides 128: one step
    (["--n-samples-per-prompt", "4"], (128, 1)),
    (["--num-steps-per-rollout", "4"], (64, 4)),           # the user's steps decide the batch
    (["--rollout-batch-size", "64"], (256, 2)),            # the recipe's 256 still fits: kept, two steps
    (["--global-batch-size", "64"], (64, 4)),
])
def test_a_recipe_global_batch_size_gives_way_to_the_users_batch_flags(ps, files, flags, expected):
    args = parse_config(["--recipe", DEFAULT_RECIPE, "--hf-checkpoint", files["ckpt"], *flags], ps)
    assert (args.global_batch_size, args.num_steps_per_rollout) == expected
    assert args.global_batch_size * args.num_steps_per_rollout == args.rollout_batch_size * args.n_samples_per_prompt


def test_a_users_global_batch_size_is_never_changed(ps, files):
    args = parse_config(["--recipe", DEFAULT_RECIPE, "--hf-checkpoint", files["ckpt"], "--rollout-batch-size", "16",
                         "--global-batch-size", "256"], ps)
    assert args.global_batch_size == 256
    with pytest.raises(ConfigError, match=r"= 128 must be divisible by --global-batch-size \(256\)"):
        check_config(args, ps)


def test_rollout_concurrency_is_per_engine(ps, base):
    """slime's --sglang-server-concurrency bounds each engine: the run's in-flight limit is it times the
    engines (reference §2.3)."""
    from plugrl.core.rollout_manager import engine_count

    assert engine_count(parse_config(base, ps), ps) == 1  # CPU: one engine
    args = parse_config(base + ["--rollout-backend", "sglang", "--rollout-num-gpus", "6",
                                "--rollout-num-gpus-per-engine", "2", "--actor-num-gpus-per-node", "2"], ps)
    assert engine_count(args, ps) == 3
    args = parse_config(base + ["--rollout-external-engine-addrs", "h:1", "h:2"], ps)
    assert engine_count(args, ps) == 2


def test_rm_opt_with_a_custom_rm_path_goes_to_that_function_not_to_rm_type(ps, base, files, monkeypatch):
    """--custom-rm-path scores instead of --rm-type (core/reward_call.py), so its --rm-opt pairs are checked
    against nothing else: the deepscaler reward still named by --rm-type must not refuse them."""
    (files["dir"] / "config_test_rewards.py").write_text("def rm(args, sample):\n    return float(args.scale)\n")
    monkeypatch.syspath_prepend(str(files["dir"]))
    args = parse_config(base + ["--custom-rm-path", "config_test_rewards:rm", "--rm-opt", "scale=2"], ps)
    validate_config(args, ps)
    assert args.rm_opt == {"scale": 2}
    with pytest.raises(ConfigError, match="reward 'deepscaler' .* has no option 'scale'"):
        validate_config(parse_config(base + ["--rm-opt", "scale=2"], ps), ps)


class NoEnginePlacement:
    """The guide's first ``rollout_first`` draft: reads an unset --rollout-num-gpus as 0 engines."""

    @core_hookimpl
    def plugrl_register_placements(self, register):
        from plugrl.core.protocols import PlacementPlan

        def rollout_first(request):
            rollout = request.rollout_num_gpus or 0
            return PlacementPlan(num_bundles=rollout + request.actor_gpus,
                                 actor_bundles=tuple(range(rollout, rollout + request.actor_gpus)), rollout_offset=0,
                                 rollout_bundles=tuple(range(rollout)),
                                 engine_bundles=tuple((i,) for i in range(rollout)), colocated=False)

        register("rollout_first_draft", rollout_first)


def test_a_placement_planning_no_rollout_gpus_is_refused_on_the_driver(base):
    extra = {name: module for name, module in OPTION_MODULES.items() if name not in BUILTIN_PLUGINS}
    ps = make_plugin_manager(entry_points=False, extra_plugins={**extra, "draft": NoEnginePlacement()})
    with pytest.raises(ConfigError) as info:
        validate_config(parse_config(base + ["--placement", "rollout_first_draft"], ps), ps)
    assert ("--placement rollout_first_draft: rollout_bundles is empty (--rollout-num-gpus is unset, so the request's "
            "rollout_num_gpus is None): the rollout manager and the engines need at least one GPU; give "
            "--rollout-num-gpus N") in info.value.problems
    validate_config(parse_config(base + ["--placement", "rollout_first_draft", "--rollout-num-gpus", "1"], ps), ps)


@pytest.mark.parametrize("word,meant", [("--resume", "--load DIR (the --save directory to resume from)"),
                                        ("--model-path", "--hf-checkpoint")])
def test_flags_of_other_trainers_point_to_ours(ps, word, meant):
    """The closest spelling of --resume is --recipe; what a user means is --load."""
    with pytest.raises(ConfigError, match=f"unrecognized arguments: {word} x. Did you mean {re.escape(meant)}\\?"):
        parse_config([word, "x"], ps)


SLIME_HUB = "slime.rollout.filter_hub.dynamic_sampling_filters."


@pytest.mark.parametrize("argv, selected", [
    (["--dynamic-sampling-filter-path", SLIME_HUB + "check_reward_nonzero_std"],
     {"dynamic_sampling_filter": "nonzero_std", "dynamic_sampling_filter_path": None}),
    (["--dynamic-sampling-filter-path", SLIME_HUB + "check_reward_nonzero_std_with_fallback"],
     {"dynamic_sampling_filter": "nonzero_std_with_fallback", "dynamic_sampling_filter_path": None}),
    (["--buffer-filter-path", "slime.rollout.data_source:pop_first", "--partial-rollout"],
     {"buffer_filter": "fifo", "buffer_filter_path": None}),
    (["--custom-rm-path", "slime.rollout.rm_hub.async_rm"], {"rm_type": "deepscaler", "custom_rm_path": None}),
    (["--group-rm", "--custom-rm-path", "slime.rollout.rm_hub.batched_async_rm"],
     {"rm_type": "deepscaler", "custom_rm_path": None}),
    (["--custom-generate-function-path", "slime.rollout.sglang_rollout.generate"],
     {"custom_generate_function_path": None}),
])
def test_slime_builtin_paths_select_plugrl_builtins(ps, base, argv, selected):
    import importlib.util

    assert importlib.util.find_spec("slime") is None  # slime's own modules are not there to import
    args = parse_config(base + argv, ps)
    assert {dest: getattr(args, dest) for dest in selected} == selected
    validate_config(args, ps)


def test_unknown_or_contradicting_slime_paths_say_what_to_use(ps, base):
    message = problems_of(base + ["--dynamic-sampling-filter-path", SLIME_HUB + "something_else"], ps)
    assert f"--dynamic-sampling-filter-path {SLIME_HUB}something_else: slime is not installed" in message
    assert "use --dynamic-sampling-filter NAME" in message and "No module named" not in message
    message = problems_of(base + ["--custom-rm-path", "slime.rollout.rm_hub.f1.f1_score"], ps)
    assert "use --rm-type NAME" in message
    message = problems_of(base + ["--custom-loss-function-path", "slime.x.y", "--loss-type", "custom_loss"], ps)
    assert "--custom-loss-function-path slime.x.y: slime is not installed" in message
    message = problems_of(base + ["--partial-rollout", "--buffer-filter", "custom_x",
                                  "--buffer-filter-path", "slime.rollout.data_source.pop_first"], ps)
    assert "is plugrl's --buffer-filter fifo, but --buffer-filter custom_x is given; keep one" in message

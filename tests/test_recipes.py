"""The Qwen3-4B recipes and ``plugrl train --dry-run``: config values against slime's script, the printed
placement of each variant, overrides, driver-side layout errors, and a dry run that stays off GPUs/Ray."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from plugrl.core.cli import main as plugrl_main
from plugrl.core.config import RECIPES, config_to_dict, parse_config
from plugrl.core.dry_run import TrainLayout

# slime scripts/run-qwen3-4B.sh at HEAD 624b824a (NUM_GPUS=8), written out flag by flag; the model
# architecture flags (scripts/models/qwen3-4B.sh) are derived from the HF checkpoint instead.
SLIME_QWEN3_4B = {
    "actor_num_nodes": 1, "actor_num_gpus_per_node": 8, "colocate": True,
    # CKPT_ARGS
    "hf_checkpoint": "/root/Qwen3-4B", "ref_load": "/root/Qwen3-4B_torch_dist",
    "load": "/root/Qwen3-4B_slime/", "save": "/root/Qwen3-4B_slime/", "save_interval": 20,
    # ROLLOUT_ARGS
    "prompt_data": "/root/dapo-math-17k/dapo-math-17k.jsonl", "input_key": "prompt", "label_key": "label",
    "apply_chat_template": True, "rollout_shuffle": True, "rm_type": "deepscaler", "num_rollout": 3000,
    "rollout_batch_size": 32, "n_samples_per_prompt": 8, "rollout_max_response_len": 8192,
    "rollout_temperature": 1.0, "global_batch_size": 256, "balance_data": True,
    # EVAL_ARGS
    "eval_interval": 20, "eval_prompt_data": ["aime", "/root/aime-2024/aime-2024.jsonl"],
    "n_samples_per_eval_prompt": 16, "eval_max_response_len": 16384, "eval_top_p": 1.0,
    # PERF_ARGS
    "tensor_model_parallel_size": 2, "sequence_parallel": True, "pipeline_model_parallel_size": 1,
    "context_parallel_size": 1, "expert_model_parallel_size": 1, "expert_tensor_parallel_size": 1,
    "recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1,
    "use_dynamic_batch_size": True, "max_tokens_per_gpu": 9216,
    # GRPO_ARGS
    "advantage_estimator": "grpo", "use_kl_loss": True, "kl_loss_coef": 0.0, "kl_loss_type": "low_var_kl",
    "entropy_coef": 0.0, "eps_clip": 0.2, "eps_clip_high": 0.28,
    # OPTIMIZER_ARGS
    "optimizer": "adam", "lr": 1e-6, "lr_decay_style": "constant", "weight_decay": 0.1,
    "adam_beta1": 0.9, "adam_beta2": 0.98,
    # SGLANG_ARGS
    "rollout_num_gpus_per_engine": 2, "sglang_mem_fraction_static": 0.7,
    # MISC_ARGS
    "attention_dropout": 0.0, "hidden_dropout": 0.0, "accumulate_allreduce_grads_in_fp32": True,
    "attention_softmax_in_fp32": True, "attention_backend": "flash",
}
# what slime resolves from them (slime_validate_args): colocate -> rollout on the actor GPUs, both offloaded
SLIME_QWEN3_4B_RESOLVED = {
    "rollout_num_gpus": 8, "offload_train": True, "offload_rollout": True, "num_steps_per_rollout": 1,
    "over_sampling_batch_size": 32, "eval_temperature": 1.0, "eval_input_key": "prompt", "eval_label_key": "label",
    "train_backend": "megatron", "rollout_backend": "sglang", "placement": "colocate",
}
RECIPE_PATHS = ("/root/Qwen3-4B", "/root/dapo-math-17k/dapo-math-17k.jsonl", "/root/aime-2024/aime-2024.jsonl",
                "/root/Qwen3-4B_torch_dist")


def dry_run(capsys, *argv):
    """``plugrl train ARGV --dry-run`` in-process -> (exit status, config dict, plan lines, stderr)."""
    status = plugrl_main(["train", *argv, "--dry-run"])
    captured = capsys.readouterr()
    if status == 2:
        return status, None, [], captured.err
    config = yaml.safe_load(captured.out)
    comments = [line[2:] for line in captured.out.splitlines() if line.startswith("# ")]
    assert comments[0] == "---- plan (dry run: no GPU touched, Ray not started) ----"
    plan = comments[1:]
    return status, config, plan, captured.err


@pytest.fixture
def user_files(tmp_path, monkeypatch):
    """The user's copies of the guide's files: prompts, AIME, an HF checkpoint directory; and, as on the
    user's machine, a supported sglang package (the recipes launch SGLang engines; its metadata is read)."""
    from plugrl.plugins.backends.sglang import compat

    monkeypatch.setattr(compat, "installed_version", lambda: "0.5.15.post1")
    prompts, aime = tmp_path / "dapo.jsonl", tmp_path / "aime.jsonl"
    prompts.write_text('{"prompt": "1+1?", "label": "2"}\n')
    aime.write_text('{"prompt": "2+2?", "label": "4"}\n')
    model = tmp_path / "Qwen3-4B"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    # a complete model folder: core/preflight.py checks for tokenizer, chat template and weights
    (model / "tokenizer.json").write_text("{}")
    (model / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    (model / "model.safetensors").write_bytes(b"")
    (tmp_path / "Qwen3-4B_torch_dist").mkdir()  # the --ref-load conversion (plugrl convert hf-to-megatron)
    return ["--prompt-data", str(prompts), "--eval-prompt-data", "aime", str(aime),
            "--ref-load", str(tmp_path / "Qwen3-4B_torch_dist"), "--hf-checkpoint", str(model)]


def rank_rows(plan):
    """{rank: (bundle, tp, dp)} from the train rank table."""
    start = plan.index("  rank  bundle  tp  dp") + 1
    rows = {}
    for line in plan[start:]:
        words = line.split()
        if not words or not words[0].isdigit():
            break
        rows[int(words[0])] = tuple(int(w) for w in words[1:])
    return rows


def engine_rows(plan):
    return [line.strip() for line in plan if line.strip().startswith("engine ") and ": bundles " in line]


# --------------------------------------------------------------------------------------------------
# The main recipe
# --------------------------------------------------------------------------------------------------


def test_all_variants_are_registered():
    for name in ("qwen3-4b-8xh100", "qwen3-4b-8xh100-decoupled", "qwen3-4b-8xh100-async",
                 "qwen3-4b-8xh100-dynamic-sampling", "qwen3-4b-8xh100-fp8"):
        assert name in RECIPES


def test_qwen3_4b_dry_run_prints_slime_values_and_placement(capsys):
    status, config, plan, err = dry_run(capsys, "--recipe", "qwen3-4b-8xh100")
    for key, value in {**SLIME_QWEN3_4B, **SLIME_QWEN3_4B_RESOLVED}.items():
        assert config[key] == value, key
    assert config["recipe"] == "qwen3-4b-8xh100" and "dry_run" not in config

    assert plan[0].startswith("placement colocate: 8 bundles (1 GPU + 1 CPU each), 8 train GPUs, 8 rollout GPUs")
    assert any(line.startswith("train: megatron backend, world size 8") and "TP 2 × PP 1 × CP 1 → DP 4" in line
               and "sequence parallel" in line for line in plan)
    # Megatron's order with PP = CP = 1: tp = r % 2, dp = r // 2, rank r on GPU r
    assert rank_rows(plan) == {r: (r, r % 2, r // 2) for r in range(8)}
    assert any("4 engines × 2 GPUs" in line and "colocated with training" in line for line in plan)
    assert engine_rows(plan) == [f"engine {i}: bundles {2 * i}-{2 * i + 1}" for i in range(4)]
    text = "\n".join(plan)
    assert "32 prompts × 8 samples = 256 samples per rollout" in text
    assert "--global-batch-size 256 → 1 optimizer step per rollout" in text
    assert "micro-batches: dynamic" in text and "at most 9216 tokens" in text and "multiple of DP 4" in text
    assert "--offload-train on" in text and "--offload-rollout on" in text
    assert "eval: every 20 rollouts on aime, 16 samples per prompt, up to 16384 tokens" in text

    # the guide's paths are the user's: absent here, the dry run still prints and then names each flag
    missing = [p for p in RECIPE_PATHS if not Path(p).exists()]
    assert status == (1 if missing else 0)
    for path in missing:
        assert path in err
    if "/root/Qwen3-4B" in missing:
        assert ("--hf-checkpoint /root/Qwen3-4B is not a directory (set by recipe 'qwen3-4b-8xh100': put your "
                "copy there or pass --hf-checkpoint DIR)") in err
    if "/root/dapo-math-17k/dapo-math-17k.jsonl" in missing:
        assert "or pass --prompt-data PATH" in err
    if "/root/Qwen3-4B_torch_dist" in missing:
        assert ("--ref-load /root/Qwen3-4B_torch_dist does not exist (set by recipe 'qwen3-4b-8xh100': put your "
                "copy there or pass --ref-load DIR)") in err


def test_dry_run_is_ready_with_the_users_files(capsys, user_files):
    status, config, plan, err = dry_run(capsys, "--recipe", "qwen3-4b-8xh100", *user_files)
    assert status == 0 and err == ""
    assert plan[-1].startswith("ready:")
    assert config["hf_checkpoint"] == user_files[-1] and config["eval_prompt_data"] == user_files[3:5]


def test_a_real_run_refuses_missing_recipe_paths(capsys):
    if all(Path(p).exists() for p in RECIPE_PATHS):
        pytest.skip("the guide's files exist on this machine")
    assert plugrl_main(["train", "--recipe", "qwen3-4b-8xh100"]) == 2
    err = capsys.readouterr().err
    assert "plugrl train: error:" in err and "set by recipe 'qwen3-4b-8xh100'" in err


def test_printed_config_is_reusable_with_config(capsys, tmp_path):
    status = plugrl_main(["train", "--recipe", "qwen3-4b-8xh100", "--output-dir", "out", "--dry-run"])
    out = capsys.readouterr().out
    assert status in (0, 1)
    path = tmp_path / "run.yaml"
    path.write_text(out)
    again = config_to_dict(parse_config(["--config", str(path)]))
    assert again.pop("dry_run") is False  # the printed config is the run's, not the dry run's
    assert again == yaml.safe_load(out)


# --------------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe, loop", [("qwen3-4b-8xh100-decoupled", "loop: sync"),
                                          ("qwen3-4b-8xh100-async", "loop: async")])
def test_decoupled_and_async_placement(capsys, recipe, loop):
    status, config, plan, _ = dry_run(capsys, "--recipe", recipe)
    assert status in (0, 1)
    # the guide: --actor-num-gpus-per-node 2 --rollout-num-gpus 6 without --colocate
    assert (config["actor_num_gpus_per_node"], config["rollout_num_gpus"], config["colocate"]) == (2, 6, False)
    assert config["placement"] == "decoupled" and config["offload_train"] is False
    assert config["async_train"] is (recipe.endswith("async"))
    assert config["lr"] == 1e-6 and config["tensor_model_parallel_size"] == 2  # the rest is the main recipe
    assert plan[0].startswith("placement decoupled: 8 bundles (1 GPU + 1 CPU each), 2 train GPUs, 6 rollout GPUs "
                              "(offset 2)")
    assert rank_rows(plan) == {0: (0, 0, 0), 1: (1, 1, 0)}  # one TP pair, DP 1
    assert any("3 engines × 2 GPUs" in line and "decoupled" in line for line in plan)
    assert engine_rows(plan) == ["engine 0: bundles 2-3", "engine 1: bundles 4-5", "engine 2: bundles 6-7"]
    assert any(line.startswith(loop) for line in plan)


def test_dynamic_sampling_variant(capsys):
    _status, config, plan, _ = dry_run(capsys, "--recipe", "qwen3-4b-8xh100-dynamic-sampling")
    # the guide: --over-sampling-batch-size 64 with check_reward_nonzero_std, and --partial-rollout
    assert config["over_sampling_batch_size"] == 64 and config["rollout_batch_size"] == 32
    assert config["dynamic_sampling_filter"] == "nonzero_std" and config["partial_rollout"] is True
    assert config["buffer_filter"] == "fifo"  # slime's pop_first
    assert config["colocate"] is True and engine_rows(plan)[-1] == "engine 3: bundles 6-7"
    text = "\n".join(plan)
    assert "64 prompts per round (--over-sampling-batch-size), groups kept by nonzero_std until 32" in text
    assert "partial rollout: aborted groups go back to the buffer (fifo)" in text


def test_fp8_variant(capsys, tmp_path, user_files):
    status, config, plan, err = dry_run(capsys, "--recipe", "qwen3-4b-8xh100-fp8")
    assert config["hf_checkpoint"] == "/root/Qwen3-4B-FP8"  # scripts/low_precision/run-qwen3-4b-fp8.sh
    assert config["ref_load"] == "/root/Qwen3-4B_torch_dist"  # training stays on the BF16 conversion
    assert config["load"] == config["save"] != "/root/Qwen3-4B_slime/"
    if not Path("/root/Qwen3-4B-FP8").exists():
        assert status == 1 and "--hf-checkpoint /root/Qwen3-4B-FP8 is not a directory" in err
    # with the user's FP8 checkpoint the plan says what the engines get
    fp8 = tmp_path / "Qwen3-4B-FP8"
    fp8.mkdir()
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (fp8 / "config.json").write_text(json.dumps({"model_type": "qwen3", "quantization_config": quant}))
    (fp8 / "tokenizer.json").write_text("{}")  # a complete model folder (core/preflight.py)
    (fp8 / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    (fp8 / "model.safetensors").write_bytes(b"")
    status, config, plan, err = dry_run(capsys, "--recipe", "qwen3-4b-8xh100-fp8", *user_files[:7],
                                        "--hf-checkpoint", str(fp8))
    assert status == 0, err
    assert any("FP8 --hf-checkpoint (block 128×128)" in line for line in plan)
    # an FP8 format the pushes cannot reproduce stops the dry run on the driver, not the rollout manager
    for bad, named in (({"weight_block_size": None}, "weight_block_size=None"), ({"fmt": "e5m2"}, "fmt='e5m2'"),
                       ({"activation_scheme": "static"}, "activation_scheme='static'")):
        (fp8 / "config.json").write_text(json.dumps({"model_type": "qwen3", "quantization_config": {**quant, **bad}}))
        status, _, _, err = dry_run(capsys, "--recipe", "qwen3-4b-8xh100-fp8", *user_files[:7], "--hf-checkpoint", str(fp8))
        assert status == 2 and f"--hf-checkpoint {fp8}: unsupported fp8 quantization_config: {named}" in err, err


# --------------------------------------------------------------------------------------------------
# Overrides: command line > YAML > recipe
# --------------------------------------------------------------------------------------------------


def test_command_line_overrides_the_recipe(capsys):
    status, config, plan, _ = dry_run(capsys, "--recipe", "qwen3-4b-8xh100", "--lr", "2e-6",
                                      "--rollout-num-gpus", "4")
    assert status in (0, 1)
    assert config["lr"] == 2e-6 and config["weight_decay"] == 0.1
    # colocated on 8 train GPUs, rollout on the first 4 of them: 2 engines of 2 GPUs
    assert plan[0].startswith("placement colocate: 8 bundles (1 GPU + 1 CPU each), 8 train GPUs, 4 rollout GPUs")
    assert engine_rows(plan) == ["engine 0: bundles 0-1", "engine 1: bundles 2-3"]
    assert rank_rows(plan)[7] == (7, 1, 3)

    _status, config, plan, _ = dry_run(capsys, "--recipe", "qwen3-4b-8xh100-decoupled", "--rollout-num-gpus", "4")
    assert plan[0].startswith("placement decoupled: 6 bundles")
    assert engine_rows(plan) == ["engine 0: bundles 2-3", "engine 1: bundles 4-5"]


def test_precedence_for_the_qwen3_recipe(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"lr": 3e-6, "rollout-batch-size": 16, "sglang-mem-fraction-static": 0.6}))
    args = parse_config(["--recipe", "qwen3-4b-8xh100", "--config", str(run), "--rollout-batch-size", "64"])
    assert args.lr == 3e-6 and args._sources["--lr"] == f"yaml:{run}"  # YAML over recipe
    assert args.sglang_mem_fraction_static == 0.6
    assert args.rollout_batch_size == 64 and args._sources["--rollout-batch-size"] == "cli"  # CLI over YAML
    assert args.n_samples_per_prompt == 8 and args._sources["--n-samples-per-prompt"] == "recipe:qwen3-4b-8xh100"
    assert args.global_batch_size == 256 and args.num_steps_per_rollout == 2  # 64 × 8 / 256
    # a recipe named inside the YAML works the same
    named = tmp_path / "named.yaml"
    named.write_text(yaml.safe_dump({"recipe": "qwen3-4b-8xh100-async", "eps-clip-high": 0.3}))
    args = parse_config(["--config", str(named)])
    assert args.async_train is True and args.eps_clip_high == 0.3 and args.rollout_num_gpus == 6


def test_no_colocate_without_rollout_gpus_is_refused(capsys):
    """The placement default stays colocate without --rollout-num-gpus: --no-colocate alone would keep the
    engines on the train GPUs, only without offloading (SGLang's memory fraction beside Megatron's state)."""
    status, _config, _plan, err = dry_run(capsys, "--recipe", "qwen3-4b-8xh100", "--no-colocate")
    assert status == 2
    assert "--no-colocate without --rollout-num-gpus: the engines would still share the train GPUs" in err


def test_switches_of_the_recipe_can_be_turned_off(capsys):
    _status, config, plan, _ = dry_run(capsys, "--recipe", "qwen3-4b-8xh100", "--no-colocate",
                                      "--actor-num-gpus-per-node", "4", "--rollout-num-gpus", "4",
                                      "--no-use-dynamic-batch-size", "--micro-batch-size", "2")
    assert config["colocate"] is False and config["use_dynamic_batch_size"] is False
    assert plan[0].startswith("placement decoupled: 8 bundles (1 GPU + 1 CPU each), 4 train GPUs, 4 rollout GPUs")
    assert any(line.startswith("micro-batches: static, --micro-batch-size 2 → 128 per step, 64 per DP rank (DP 2)")
               for line in plan)


# --------------------------------------------------------------------------------------------------
# Layout errors, before any GPU work
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--tensor-model-parallel-size", "3"],
         ("--tensor-model-parallel-size 3 does not divide the 8 train GPUs (--actor-num-nodes 1 × "
          "--actor-num-gpus-per-node 8); use a size that divides 8 (1, 2, 4, 8)")),
        (["--pipeline-model-parallel-size", "3"],
         "--tensor-model-parallel-size 2 × --pipeline-model-parallel-size 3 = 6 does not divide the 8 train GPUs"),
        (["--context-parallel-size", "0"], "--context-parallel-size must be >= 1, got 0"),
        (["--rollout-num-gpus-per-engine", "3"],
         "--rollout-num-gpus (8) must be divisible by --rollout-num-gpus-per-engine (3)"),
        (["--actor-num-gpus-per-node", "16"],
         "--actor-num-gpus-per-node 16 is more than a node has (--num-gpus-per-node 8)"),
        (["--global-batch-size", "2"],
         "--global-batch-size 2 gives each optimizer step 2 samples, fewer than the 4 data-parallel ranks"),
        (["--no-use-dynamic-batch-size", "--micro-batch-size", "3"],
         ("--global-batch-size 256 in chunks of --micro-batch-size 3 gives 86 micro-batches per step, which do "
          "not divide evenly over 4 data-parallel ranks")),
        (["--async"], "--async with --colocate"),
    ],
)
def test_bad_layouts_fail_naming_the_flag(capsys, extra, expected):
    status, config, _plan, err = dry_run(capsys, "--recipe", "qwen3-4b-8xh100", *extra)
    assert status == 2 and config is None
    assert err.startswith("plugrl train: error:") and expected in err


def test_megatron_rank_coordinates():
    # Megatron's default order tp-cp-ep-dp-pp: enumerate (pp, dp, cp, tp) with tp innermost
    layout = TrainLayout(world=16, tp=2, pp=2, cp=2)
    assert layout.dp == 2
    rank = 0
    for pp in range(2):
        for dp in range(2):
            for cp in range(2):
                for tp in range(2):
                    assert layout.coordinates(rank) == {"tp": tp, "cp": cp, "dp": dp, "pp": pp}
                    rank += 1


# --------------------------------------------------------------------------------------------------
# The dry run stays on the driver
# --------------------------------------------------------------------------------------------------


def test_dry_run_imports_neither_torch_cuda_nor_ray(tmp_path):
    code = textwrap.dedent("""
        import contextlib, io, sys
        from plugrl.core.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            status = main(["train", "--recipe", "qwen3-4b-8xh100", "--dry-run"])
        assert status in (0, 1), status
        assert "4 engines × 2 GPUs" in out.getvalue()
        heavy = [m for m in ("torch", "torch.cuda", "ray", "sglang", "megatron.core", "transformers")
                 if m in sys.modules]
        assert not heavy, heavy
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr


def test_replacing_a_recipe_plugin_drops_its_recipe_values_but_not_the_users(capsys, user_files):
    """`--recipe qwen3-4b-8xh100 --rollout-backend hf`: the recipe's --sglang-* value is dropped (the
    user replaced SGLang) and the dry run says so; the same flag given by the user still conflicts.
    `--save ''` turns the recipe's saves off without tripping over the recipe's --save-interval."""
    status, config, plan, err = dry_run(capsys, "--recipe", "qwen3-4b-8xh100", *user_files,
                                        "--rollout-backend", "hf", "--rollout-num-gpus-per-engine", "1", "--save", "")
    assert status == 0, err
    assert config["rollout_backend"] == "hf" and config["sglang_mem_fraction_static"] is None
    assert config["train_backend"] == "megatron" and config["tensor_model_parallel_size"] == 2  # the rest stays
    assert config["save"] == "" and config["save_interval"] == 20
    assert "recipe values dropped (their plugin was replaced): --sglang-mem-fraction-static" in plan
    status, _, _, err = dry_run(capsys, "--recipe", "qwen3-4b-8xh100", *user_files, "--rollout-backend", "hf",
                                "--sglang-mem-fraction-static", "0.5")
    assert status == 2 and "--sglang-mem-fraction-static belongs to the sglang backend" in err
    _, _, plan, _ = dry_run(capsys, "--recipe", "qwen3-4b-8xh100", *user_files)
    assert not any(line.startswith("recipe values dropped") for line in plan)  # the recipe's own choice
    status, _, _, err = dry_run(capsys, "--recipe", "qwen3-4b-8xh100", *user_files, "--save", "",
                                "--save-interval", "5")
    assert status == 2 and "--save-interval needs --save DIR" in err  # the user's interval still needs a dir


QWEN3_4B_CONFIG = {"model_type": "qwen3", "num_hidden_layers": 36, "hidden_size": 2560, "intermediate_size": 9728,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                   "rope_theta": 1000000, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                   "max_position_embeddings": 40960}  # Qwen3-4B's config.json (the architecture keys)


def test_model_flags_that_contradict_the_checkpoint_stop_the_dry_run(capsys, user_files):
    """slime's MODEL_ARGS must match the checkpoint; a mismatch is found on the driver, not in the actors."""
    model = Path(user_files[-1])
    (model / "config.json").write_text(json.dumps(QWEN3_4B_CONFIG))
    status, _, _, err = dry_run(capsys, "--recipe", "qwen3-4b-8xh100", *user_files)
    assert status == 0, err  # the recipe's own model flags are Qwen3-4B's
    status, _, _, err = dry_run(capsys, "--recipe", "qwen3-4b-8xh100", *user_files, "--num-layers", "28")
    assert status == 2
    assert (f"--num-layers 28 contradicts the HF checkpoint's num_hidden_layers (which gives 36) (--hf-checkpoint "
            f"{model}); drop the flag or correct it") in err


def test_offloaded_sglang_engines_need_a_push_after_every_resume(capsys, user_files):
    """SGLang releases colocated engines' weights without a host copy: pushing every 2 rollouts would
    leave the rollout in between on released memory."""
    status, _, _, err = dry_run(capsys, "--recipe", "qwen3-4b-8xh100", *user_files, "--update-weights-interval", "2")
    assert status == 2 and "--update-weights-interval 2 with offloaded SGLang engines" in err
    status, _, _, err = dry_run(capsys, "--recipe", "qwen3-4b-8xh100", *user_files, "--update-weights-interval", "2",
                                "--sglang-enable-weights-cpu-backup")
    assert status != 2, err

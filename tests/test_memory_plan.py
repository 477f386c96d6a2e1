"""Host-memory planning (core/memory_plan.py): model sizes from config.json against a real transformers
model built on the meta device, pinned-block rounding, the 4B recipe's plan on one 128 GiB node, and
the refusal of a plan that cannot fit, naming the flags to change (driver side, --dry-run included)."""

import json

import pytest
import torch

from plugrl.core.config import parse_config
from plugrl.core.memory_plan import GIB, ModelShape, host_memory_problem, pinned_bytes, plan_memory
from plugrl.core.plugins import make_plugin_manager

QWEN3_4B = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 2560,
            "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "intermediate_size": 9728, "vocab_size": 151936, "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 40960, "rope_theta": 1000000}
SMALL_UNTIED = {**QWEN3_4B, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96, "vocab_size": 300,
                "tie_word_embeddings": False}


@pytest.mark.parametrize("n,expected", [(0, 0), (1, 1), (3, 4), (4, 4), (5, 8), (1_555_824_640, 2**31)])
def test_pinned_blocks_round_up_to_powers_of_two(n, expected):
    assert pinned_bytes(n) == expected


@pytest.mark.parametrize("config", [QWEN3_4B, SMALL_UNTIED], ids=["qwen3-4b", "small-untied"])
def test_shape_matches_transformers_parameters(config):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config(**config))
    numels = [p.numel() for p in model.parameters()]  # tied embeddings appear once
    shape = ModelShape.from_config(config)
    assert shape.params == sum(numels)
    assert sorted(shape.hf_tensors) == sorted(numels)
    assert sum(shape.megatron_tensors) == sum(numels)  # same weights, fused qkv and gate/up


def test_megatron_pads_the_vocabulary_rows_it_trains():
    """Megatron's embedding (and an untied output layer) has the vocabulary padded to the multiple;
    the HF shape, which is exported and served, does not."""
    plain = ModelShape.from_config(SMALL_UNTIED)
    padded = ModelShape.from_config(SMALL_UNTIED, vocab_multiple=128)  # 300 -> 384
    assert padded.params == plain.params and padded.hf_tensors == plain.hf_tensors
    assert sum(padded.megatron_tensors) - sum(plain.megatron_tensors) == 2 * (384 - 300) * 64
    tied = ModelShape.from_config({**SMALL_UNTIED, "tie_word_embeddings": True}, vocab_multiple=128)
    assert sum(tied.megatron_tensors) - tied.params == (384 - 300) * 64
    qwen3_4b = ModelShape.from_config(QWEN3_4B)
    # 151,936 = 1,187 x 128: nothing to pad at TP 1; at TP 2 (multiple 256) 152,064, 128 rows more
    assert ModelShape.from_config(QWEN3_4B, vocab_multiple=128).megatron_tensors == qwen3_4b.megatron_tensors
    assert sum(ModelShape.from_config(QWEN3_4B, vocab_multiple=256).megatron_tensors) - qwen3_4b.params == 128 * 2560


def test_unknown_architecture_gives_no_plan(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    assert ModelShape.from_config({"model_type": "mystery"}) is None


def recipe_args(tmp_path, *extra):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_4B))
    ps = make_plugin_manager(entry_points=False)
    return parse_config(["--recipe", "qwen3-4b-8xh100", "--hf-checkpoint", str(tmp_path), "--actor-num-gpus-per-node",
                         "1", "--tensor-model-parallel-size", "1", "--no-sequence-parallel",
                         "--rollout-num-gpus-per-engine", "1", *extra], ps)


def test_4b_recipe_on_one_gpu_plan(tmp_path):
    """Items from first principles: 4.02e9 params; trainer: one 8 GiB DDP buffer, three per-tensor fp32
    copies (main params + 2 moments) and a per-tensor bf16 reference model; the engine's per-tensor bf16
    copy; one bf16 export."""
    args = recipe_args(tmp_path)
    plan = plan_memory(args, colocated=True, node_bytes=128 * GIB)
    items = dict((what.split(" (")[0].split(":")[0], gib) for what, gib in plan.host_items)
    shape = ModelShape.from_config(QWEN3_4B)
    fp32_blocks = sum(pinned_bytes(4 * n) for n in shape.megatron_tensors)
    bf16_ref = sum(pinned_bytes(2 * n) for n in shape.megatron_tensors)
    trainer = [gib for what, gib in items.items() if what.startswith("trainer state")][0]
    assert trainer * GIB == pytest.approx(pinned_bytes(2 * shape.params) + 3 * fp32_blocks + bf16_ref)
    assert 1.2 < fp32_blocks / (4 * shape.params) < 1.45  # the rounding costs a third here
    export = [gib for what, gib in items.items() if what.startswith("one weight export")][0]
    assert export == pytest.approx(2 * shape.params / GIB)
    assert 95 < plan.host_gib < 118  # fits under Ray's 0.95 x 128 GiB
    assert host_memory_problem(plan, args) is None


def test_engine_weights_are_planned_on_the_host_only_when_kept(tmp_path):
    """The embedded hf engine drops its released weights when a full push follows every resume
    (core/plugin_traits.drops_released_weights): no host copy in the plan. Pushing every 2 rollouts or
    under --async, the per-tensor bf16 copy is planned. SGLang keeps a copy only with
    --sglang-enable-weights-cpu-backup (its model_runner.py)."""
    from plugrl.core.plugin_traits import drops_released_weights

    shape = ModelShape.from_config(QWEN3_4B)
    copy_gib = shape.pinned_copies("hf", 2, 1) / GIB

    def engine_item(args):
        plan = plan_memory(args, colocated=True, node_bytes=128 * GIB)
        return plan, [gib for what, gib in plan.host_items if what.startswith("engine weights")]

    dropped = recipe_args(tmp_path, "--rollout-backend", "hf")
    assert drops_released_weights(dropped)
    plan_dropped, item = engine_item(dropped)
    assert item == [0.0]
    for extra in (("--update-weights-interval", "2"), ("--async",)):
        kept = recipe_args(tmp_path, "--rollout-backend", "hf", *extra)
        assert not drops_released_weights(kept)
        plan_kept, item = engine_item(kept)
        assert item == [pytest.approx(copy_gib)]
    assert plan_kept.host_gib - plan_dropped.host_gib == pytest.approx(copy_gib)  # the only difference
    sglang = recipe_args(tmp_path)  # the recipe's own rollout backend
    assert drops_released_weights(sglang)
    assert engine_item(sglang)[1] == [0.0]
    backed_up = recipe_args(tmp_path, "--sglang-enable-weights-cpu-backup")
    assert not drops_released_weights(backed_up)
    assert engine_item(backed_up)[1] == [pytest.approx(copy_gib)]


def test_a_plan_that_cannot_fit_names_the_flags(tmp_path):
    args = recipe_args(tmp_path)
    problem = host_memory_problem(plan_memory(args, colocated=True, node_bytes=64 * GIB), args)
    assert problem and "--no-offload-train" in problem and "--no-use-kl-loss" in problem and "64 GiB" in problem
    without = recipe_args(tmp_path, "--no-offload-train", "--no-offload-rollout")
    kept = plan_memory(without, colocated=True, node_bytes=64 * GIB)
    assert not any(what.startswith("trainer state") for what, _ in kept.host_items)
    assert host_memory_problem(kept, without) is None


def test_dry_run_prints_the_plan_and_lists_the_problem(tmp_path, capsys):
    from plugrl.core.config import environment_problems
    from plugrl.core.dry_run import describe_run

    args = recipe_args(tmp_path, "--device", "cuda")
    ps = make_plugin_manager(entry_points=False)
    lines = describe_run(args, ps)
    assert any(line.startswith("host memory, busiest node") for line in lines)
    assert any("GPU memory, busiest GPU" in line for line in lines)
    from plugrl.core import memory_plan

    real = memory_plan.node_memory_bytes
    try:
        memory_plan.node_memory_bytes = lambda: 24 * GIB
        problems = environment_problems(args, ps)
    finally:
        memory_plan.node_memory_bytes = real
    assert any(p.startswith("host memory:") and "--no-offload-train" in p for p in problems), problems

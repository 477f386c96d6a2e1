"""Megatron bridge on CPU without megatron-core: config derivation, flag mismatches, the HF <->
Megatron weight mapping (round trips, TP=2 shard layout by formula), buckets and the bridge hook."""

import math
import subprocess
import sys
from types import SimpleNamespace

import pluggy
import pytest
import torch
from plugrl.plugins.backends.megatron import bridge as bridge_module
from plugrl.plugins.backends.megatron.config_bridge import (
    derive_model_config,
    padded_vocab_size,
)
from plugrl.plugins.backends.megatron.weights import (
    export_hf_buckets,
    hf_to_megatron,
    megatron_shard_shapes,
    megatron_to_hf,
)

# Qwen3-4B's config.json values (slime's scripts/models/qwen3-4B.sh is derived from the same).
QWEN3_4B = {
    "model_type": "qwen3", "num_hidden_layers": 36, "hidden_size": 2560,
    "intermediate_size": 9728, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000, "tie_word_embeddings": True,
    "vocab_size": 151936, "max_position_embeddings": 40960, "hidden_act": "silu",
}
# A tiny GQA config: 4 query heads in 2 KV groups, vocabulary that needs padding.
TINY = {
    "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "vocab_size": 317,
    "max_position_embeddings": 128, "hidden_act": "silu",
}


def tiny(model_type="qwen3", **overrides):
    return {**TINY, "model_type": model_type, "tie_word_embeddings": False, **overrides}


def random_hf_state(hf: dict) -> dict:
    """An HF state dict for ``hf`` whose every tensor holds distinct random values (so a swapped,
    transposed or mis-sliced tensor can never compare equal by accident; norms are not all ones)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {k: v for k, v in hf.items() if k != "model_type"}
    config = AutoConfig.for_model(hf["model_type"], **values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    state = {name: torch.randn(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def args(**flags):
    return SimpleNamespace(**flags)


# ------------------------------------------------------------------------------------- config


def test_qwen3_4b_config_matches_slime_model_args():
    cfg = derive_model_config(QWEN3_4B)
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (36, 2560, 9728)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels) == (32, 8, 128)
    assert cfg.group_query_attention and cfg.swiglu and cfg.disable_bias_linear and cfg.qk_layernorm
    assert not cfg.add_qkv_bias and not cfg.untie_embeddings_and_output_weights
    assert (cfg.norm_epsilon, cfg.rotary_base, cfg.normalization) == (1e-6, 1000000.0, "RMSNorm")
    assert cfg.vocab_size == cfg.padded_vocab_size == 151936  # 151936 = 1187 * 128


def test_vocab_padding_follows_divisor_times_tp():
    assert padded_vocab_size(317, 128, 1) == 384
    assert padded_vocab_size(317, 128, 2) == 512
    assert derive_model_config(tiny(), args(tensor_model_parallel_size=2)).padded_vocab_size == 512
    assert derive_model_config(tiny(), args(make_vocab_size_divisible_by=64)).padded_vocab_size == 320
    assert derive_model_config(QWEN3_4B, args(tensor_model_parallel_size=8)).padded_vocab_size == 152576


def test_families_differ_where_hf_does():
    qwen2 = derive_model_config(tiny("qwen2"))
    llama = derive_model_config(tiny("llama"))
    assert qwen2.add_qkv_bias and not qwen2.qk_layernorm
    assert not llama.add_qkv_bias and not llama.qk_layernorm
    # no head_dim in the config: hidden / heads
    assert derive_model_config({k: v for k, v in tiny("qwen2").items() if k != "head_dim"}).kv_channels == 16


def test_transformers_config_object_and_rope_parameters():
    from transformers import Qwen3Config

    hf = Qwen3Config(**{k: v for k, v in tiny().items() if k != "model_type"} | {"rope_theta": 5000.0})
    assert hf.rope_parameters["rope_theta"] == 5000.0  # transformers 5 moves rope_theta here
    assert derive_model_config(hf).rotary_base == 5000.0


@pytest.mark.parametrize(
    "flags, flag, given, expected",
    [
        ({"rotary_base": 5000}, "--rotary-base", "5000", "10000.0"),
        ({"num_layers": 3}, "--num-layers", "3", "2"),
        ({"hidden_size": 128}, "--hidden-size", "128", "64"),
        ({"ffn_hidden_size": 128}, "--ffn-hidden-size", "128", "96"),
        ({"num_query_groups": 4}, "--num-query-groups", "4", "2"),
        ({"kv_channels": 32}, "--kv-channels", "32", "16"),
        ({"norm_epsilon": 1e-5}, "--norm-epsilon", "1e-05", "1e-06"),
        ({"vocab_size": 320}, "--vocab-size", "320", "317"),
        ({"untie_embeddings_and_output_weights": True}, "--untie-embeddings-and-output-weights", "True", "False"),
    ],
)
def test_contradicting_flag_names_flag_and_both_values(flags, flag, given, expected):
    with pytest.raises(ValueError) as info:
        derive_model_config(tiny(tie_word_embeddings=True), args(**flags))
    message = str(info.value)
    assert flag in message and given in message and expected in message


def test_switch_flag_for_a_missing_feature_is_an_error():
    with pytest.raises(ValueError, match="--qk-layernorm"):
        derive_model_config(tiny("qwen2"), args(qk_layernorm=True))
    with pytest.raises(ValueError, match="--add-qkv-bias"):
        derive_model_config(tiny("qwen3"), args(add_qkv_bias=True))


def test_agreeing_and_layout_flags_pass():
    flags = args(rotary_base=10000, num_layers=2, hidden_size=64, num_query_groups=2, kv_channels=16,
                 qk_layernorm=True,
                 swiglu=True, disable_bias_linear=True, normalization="RMSNorm", untie_embeddings_and_output_weights=True,
                 group_query_attention=True, seq_length=64, tensor_model_parallel_size=2)
    cfg = derive_model_config(tiny(), flags)
    assert cfg.max_position_embeddings == 64 and cfg.tensor_model_parallel_size == 2


def test_unsupported_architectures_and_tp_are_errors():
    with pytest.raises(ValueError, match="model_type 'mixtral'"):
        derive_model_config(dict(tiny(), model_type="mixtral"))
    with pytest.raises(ValueError, match="hidden_act"):
        derive_model_config(tiny(hidden_act="gelu"))
    with pytest.raises(ValueError, match="rope_type"):
        derive_model_config(tiny(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="--tensor-model-parallel-size 3"):
        derive_model_config(tiny(), args(tensor_model_parallel_size=3))


# ------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("model_type", ["qwen3", "qwen2", "llama"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("tp", [1, 2])
def test_round_trip_is_bit_exact(model_type, tied, tp):
    hf = tiny(model_type, tie_word_embeddings=tied)
    state = random_hf_state(hf)
    cfg = derive_model_config(hf, args(tensor_model_parallel_size=tp))
    shards = [hf_to_megatron(state, cfg, tp_size=tp, tp_rank=r) for r in range(tp)]
    back = megatron_to_hf(shards, cfg)
    expected = {k: v for k, v in state.items() if not (tied and k == "lm_head.weight")}
    assert sorted(back) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name
    assert ("output_layer.weight" in shards[0]) == (not tied)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_shapes_by_formula(tp):
    hf = tiny(num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    cfg = derive_model_config(hf, args(tensor_model_parallel_size=tp))
    state = random_hf_state(hf)
    vocab = math.ceil(317 / (128 * tp)) * 128 * tp
    qkv_rows = (8 + 2 * 4) * 8
    for rank in range(tp):
        shard = hf_to_megatron(state, cfg, tp_size=tp, tp_rank=rank)
        shapes = {name: tuple(t.shape) for name, t in shard.items()}
        assert shapes == megatron_shard_shapes(cfg, tp)
        assert shapes["embedding.word_embeddings.weight"] == (vocab // tp, 64)
        assert shapes["output_layer.weight"] == (vocab // tp, 64)
        assert shapes["decoder.layers.1.self_attention.linear_qkv.weight"] == (qkv_rows // tp, 64)
        assert shapes["decoder.layers.1.self_attention.linear_proj.weight"] == (64, 64 // tp)
        assert shapes["decoder.layers.1.mlp.linear_fc1.weight"] == (2 * 96 // tp, 64)
        assert shapes["decoder.layers.1.mlp.linear_fc2.weight"] == (64, 96 // tp)
        assert shapes["decoder.layers.1.self_attention.q_layernorm.weight"] == (8,)


def test_qkv_interleaves_per_kv_group_and_tp_shards_hold_whole_groups():
    hf = tiny()  # 4 query heads, 2 KV groups, head_dim 16
    state = random_hf_state(hf)
    cfg = derive_model_config(hf, args(tensor_model_parallel_size=2))
    q = state["model.layers.0.self_attn.q_proj.weight"]
    k = state["model.layers.0.self_attn.k_proj.weight"]
    v = state["model.layers.0.self_attn.v_proj.weight"]
    d = 16
    full = hf_to_megatron(state, derive_model_config(hf))["decoder.layers.0.self_attention.linear_qkv.weight"]
    # group 0 = q heads 0,1 | k head 0 | v head 0; group 1 = q heads 2,3 | k head 1 | v head 1
    expected = torch.cat([q[0:2 * d], k[0:d], v[0:d], q[2 * d:4 * d], k[d:2 * d], v[d:2 * d]])
    assert torch.equal(full, expected)
    for rank in range(2):
        shard = hf_to_megatron(state, cfg, tp_size=2, tp_rank=rank)["decoder.layers.0.self_attention.linear_qkv.weight"]
        group = slice(rank * d, (rank + 1) * d)
        assert torch.equal(shard, torch.cat([q[rank * 2 * d:(rank + 1) * 2 * d], k[group], v[group]]))


def test_fc1_shards_hold_their_gate_and_up_slices():
    hf = tiny()
    state = random_hf_state(hf)
    cfg = derive_model_config(hf, args(tensor_model_parallel_size=2))
    gate = state["model.layers.1.mlp.gate_proj.weight"]
    up = state["model.layers.1.mlp.up_proj.weight"]
    full = hf_to_megatron(state, derive_model_config(hf))["decoder.layers.1.mlp.linear_fc1.weight"]
    assert torch.equal(full, torch.cat([gate, up]))
    for rank in range(2):
        rows = slice(rank * 48, (rank + 1) * 48)
        shard = hf_to_megatron(state, cfg, tp_size=2, tp_rank=rank)["decoder.layers.1.mlp.linear_fc1.weight"]
        assert torch.equal(shard, torch.cat([gate[rows], up[rows]]))


def test_row_parallel_and_vocab_parallel_slices():
    hf = tiny()
    state = random_hf_state(hf)
    cfg = derive_model_config(hf, args(tensor_model_parallel_size=2))
    shards = [hf_to_megatron(state, cfg, tp_size=2, tp_rank=r) for r in range(2)]
    o_proj = state["model.layers.0.self_attn.o_proj.weight"]
    assert torch.equal(shards[1]["decoder.layers.0.self_attention.linear_proj.weight"], o_proj[:, 32:])
    embed = state["model.embed_tokens.weight"]  # 317 rows padded to 512: rank 0 rows 0..255, rank 1 256..511
    assert torch.equal(shards[0]["embedding.word_embeddings.weight"], embed[:256])
    assert torch.equal(shards[1]["embedding.word_embeddings.weight"][:61], embed[256:])
    assert not shards[1]["embedding.word_embeddings.weight"][61:].any()


def test_qwen2_qkv_bias_is_interleaved_like_the_weight():
    hf = tiny("qwen2")
    state = random_hf_state(hf)
    cfg = derive_model_config(hf)
    bias = hf_to_megatron(state, cfg)["decoder.layers.0.self_attention.linear_qkv.bias"]
    q, k, v = (state[f"model.layers.0.self_attn.{p}_proj.bias"] for p in "qkv")
    assert torch.equal(bias, torch.cat([q[:32], k[:16], v[:16], q[32:], k[16:], v[16:]]))


def test_unmapped_or_missing_hf_tensors_are_errors():
    hf = tiny()
    state = random_hf_state(hf)
    cfg = derive_model_config(hf)
    with pytest.raises(ValueError, match="no Megatron mapping"):
        hf_to_megatron(dict(state, **{"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}), cfg)
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="up_proj"):
        hf_to_megatron(state, cfg)


def test_replicated_tensors_must_agree_across_shards():
    hf = tiny()
    cfg = derive_model_config(hf, args(tensor_model_parallel_size=2))
    state = random_hf_state(hf)
    shards = [hf_to_megatron(state, cfg, tp_size=2, tp_rank=r) for r in range(2)]
    shards[1]["decoder.final_layernorm.weight"] = shards[1]["decoder.final_layernorm.weight"] + 1
    with pytest.raises(ValueError, match="final_layernorm"):
        megatron_to_hf(shards, cfg)


def test_export_hf_buckets_respects_the_byte_limit_and_order():
    tensors = [(f"t{i}", torch.zeros(n, dtype=torch.float32)) for i, n in enumerate([10, 10, 30, 5, 100, 1])]
    buckets = list(export_hf_buckets(tensors, bucket_bytes=100))  # 25 floats per bucket
    assert [[name for name, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4"], ["t5"]]
    assert [pair for b in buckets for pair in b] == tensors
    with pytest.raises(ValueError):
        list(export_hf_buckets(tensors, 0))


# -------------------------------------------------------------------------------------- hook


def test_model_bridge_hook_answers_for_dense_families_only():
    from plugrl.core import hookspecs

    pm = pluggy.PluginManager("plugrl")
    pm.add_hookspecs(hookspecs)
    pm.register(bridge_module)
    pm.check_pending()  # the hook name matches the spec
    for model_type in ("qwen3", "qwen2", "llama"):
        found = pm.hook.plugrl_model_bridge(hf_config=tiny(model_type))
        assert isinstance(found, bridge_module.DenseDecoderBridge)
    assert pm.hook.plugrl_model_bridge(hf_config=dict(tiny(), model_type="mixtral")) is None
    found = pm.hook.plugrl_model_bridge(hf_config=tiny())
    cfg = found.model_config(args(tensor_model_parallel_size=2))
    state = random_hf_state(tiny())
    shards = [found.hf_to_megatron(state, cfg, tp_size=2, tp_rank=r) for r in range(2)]
    assert torch.equal(found.megatron_to_hf(shards, cfg)["lm_head.weight"], state["lm_head.weight"])


def test_bridge_import_pulls_in_neither_torch_nor_megatron():
    code = ("import sys, plugrl.plugins.backends.megatron.bridge, plugrl.plugins.backends.megatron.convert; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)

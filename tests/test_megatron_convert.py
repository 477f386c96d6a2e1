"""`plugrl convert hf-to-megatron | megatron-to-hf` on tiny Qwen3 checkpoints (CPU): the written
Megatron shards equal the mapping's, and the way back is an HF directory transformers loads with
weights equal to the original's."""

import json
from types import SimpleNamespace

import pytest
import torch
from plugrl.plugins.backends.megatron.config_bridge import derive_model_config
from plugrl.plugins.backends.megatron.convert import (
    load_hf_state,
    load_megatron_shards,
    main,
)
from plugrl.plugins.backends.megatron.weights import hf_to_megatron
from plugrl.plugins.backends.tiny_default import build_tiny_checkpoint


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def checkpoint(request, tmp_path_factory):
    """A tiny Qwen3 (2 KV groups) whose every tensor is random, norms included."""
    from transformers import AutoModelForCausalLM

    tied = request.param
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("hf") / "tiny", tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(2)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param))
    model.save_pretrained(path)
    return path, tied


def original_state(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.mark.parametrize("tp", [1, 2])
def test_round_trip_through_the_converter(checkpoint, tmp_path, tp):
    from transformers import AutoModelForCausalLM

    path, tied = checkpoint
    mcore = tmp_path / "mcore"
    assert main(["hf-to-megatron", "--hf-checkpoint", str(path), "--save", str(mcore),
                 "--tensor-model-parallel-size", str(tp)]) == 0
    assert (mcore / "latest_checkpointed_iteration.txt").read_text() == "release"
    shards, manifest = load_megatron_shards(mcore)
    assert len(shards) == tp and manifest["tensor_model_parallel_size"] == tp
    hf_config = json.loads((path / "config.json").read_text())
    cfg = derive_model_config(hf_config, SimpleNamespace(tensor_model_parallel_size=tp))
    hf_state = load_hf_state(path)
    for rank, shard in enumerate(shards):
        expected = hf_to_megatron(hf_state, cfg, tp_size=tp, tp_rank=rank)
        assert shard.keys() == expected.keys()
        assert all(torch.equal(shard[k], expected[k]) for k in expected)

    out = tmp_path / "hf"
    # a small shard limit forces the sharded safetensors + index path
    assert main(["megatron-to-hf", "--load", str(mcore), "--hf-checkpoint", str(path), "--save", str(out),
                 "--max-shard-bytes", "40000"]) == 0
    assert (out / "model.safetensors.index.json").exists()
    assert (out / "tokenizer.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    original = original_state(path)
    assert reloaded.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(reloaded[name], tensor), name
    if tied:
        assert "lm_head.weight" not in load_hf_state(out)


def test_contradicting_flag_fails_before_writing(checkpoint, tmp_path):
    path, _ = checkpoint
    with pytest.raises(ValueError, match="--rotary-base 5000.0 contradicts .*10000"):
        main(["hf-to-megatron", "--hf-checkpoint", str(path), "--save", str(tmp_path / "x"), "--rotary-base", "5000"])
    assert not (tmp_path / "x").exists()


def test_megatron_to_hf_refuses_a_different_architecture(checkpoint, tmp_path):
    path, tied = checkpoint
    mcore = tmp_path / "mcore"
    main(["hf-to-megatron", "--hf-checkpoint", str(path), "--save", str(mcore)])
    other = build_tiny_checkpoint(tmp_path / "other", tie_word_embeddings=not tied)
    with pytest.raises(ValueError, match="untie_embeddings_and_output_weights"):
        main(["megatron-to-hf", "--load", str(mcore), "--hf-checkpoint", str(other), "--save", str(tmp_path / "o")])


def test_unknown_direction_is_usage_error(capsys):
    assert main(["sideways"]) == 2
    assert "hf-to-megatron" in capsys.readouterr().err

"""`plugrl convert hf-to-megatron | megatron-to-hf` on tiny Qwen3 checkpoints (CPU, fp32 and bf16): the
written checkpoint is a megatron-core torch_dist checkpoint in Megatron-LM's release layout, and the way
back is an HF directory transformers loads with weights bit-equal (values and dtype) to the original's."""

import json

import pytest
import torch
from plugrl.plugins.backends.megatron.config_bridge import padded_vocab_size
from plugrl.plugins.backends.megatron.convert import (
    load_hf_state,
    main,
)
from plugrl.plugins.backends.megatron.dist_ckpt import is_torch_dist, tensors_metadata
from plugrl.plugins.backends.tiny_default import build_tiny_checkpoint

pytest.importorskip("megatron.core", reason="megatron-core not installed (plugrl[megatron])")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")


@pytest.fixture(scope="module", params=[(False, torch.float32), (True, torch.bfloat16)], ids=["untied-fp32", "tied-bf16"])
def checkpoint(request, tmp_path_factory):
    """A tiny Qwen3 (2 KV groups) whose every tensor is random, norms included, saved in ``dtype``."""
    from transformers import AutoModelForCausalLM

    tied, dtype = request.param
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("hf") / "tiny", tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(2)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param))
    model.to(dtype).save_pretrained(path)
    return path, tied, dtype


@pytest.mark.parametrize("tp", [1, 2])
def test_round_trip_through_the_converter(checkpoint, tmp_path, tp):
    from transformers import AutoModelForCausalLM

    path, tied, dtype = checkpoint
    original = load_hf_state(path)
    assert {t.dtype for t in original.values()} == {dtype}
    mcore = tmp_path / "mcore"
    assert main(["hf-to-megatron", "--hf-checkpoint", str(path), "--save", str(mcore),
                 "--tensor-model-parallel-size", str(tp)]) == 0
    # Megatron-LM's release layout around a torch_dist checkpoint
    assert (mcore / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert json.loads((mcore / "release" / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert (mcore / "release" / ".metadata").exists() and list((mcore / "release").glob("*.distcp"))
    assert is_torch_dist(mcore) and is_torch_dist(mcore / "release")
    info = json.loads((mcore / "plugrl_convert.json").read_text())
    assert info["format"] == "torch_dist" and info["model_config"]["tensor_model_parallel_size"] == tp
    # Stored in the HF dtype, with the vocabulary padded for the requested TP size (a multiple of 128 x TP)
    hf_config = json.loads((path / "config.json").read_text())
    embedding = tensors_metadata(mcore)["embedding.word_embeddings.weight"]
    assert embedding.dtype == dtype
    assert tuple(embedding.global_shape) == (padded_vocab_size(hf_config["vocab_size"], 128, tp),
                                             hf_config["hidden_size"])

    out = tmp_path / "hf"
    # a small shard limit forces the sharded safetensors + index path
    assert main(["megatron-to-hf", "--load", str(mcore), "--hf-checkpoint", str(path), "--save", str(out),
                 "--max-shard-bytes", "40000"]) == 0
    assert (out / "model.safetensors.index.json").exists()
    assert (out / "tokenizer.json").exists()
    written = load_hf_state(out)
    assert written.keys() == original.keys()
    assert ("lm_head.weight" in written) == (not tied)  # HF ties it; Megatron shares the embedding
    for name, tensor in original.items():
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).state_dict()
    expected = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).state_dict()
    assert reloaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(reloaded[name], tensor), name


def test_contradicting_flag_fails_before_writing(checkpoint, tmp_path):
    path, _, _ = checkpoint
    with pytest.raises(ValueError, match="--rotary-base 5000.0 contradicts .*10000"):
        main(["hf-to-megatron", "--hf-checkpoint", str(path), "--save", str(tmp_path / "x"), "--rotary-base", "5000"])
    assert not (tmp_path / "x").exists()


def test_refuses_to_overwrite_a_checkpoint(checkpoint, tmp_path):
    path, _, _ = checkpoint
    (tmp_path / "x" / "release").mkdir(parents=True)
    (tmp_path / "x" / "release" / "metadata.json").write_text("{}")
    with pytest.raises(FileExistsError, match="release is not empty"):
        main(["hf-to-megatron", "--hf-checkpoint", str(path), "--save", str(tmp_path / "x")])


def test_megatron_to_hf_refuses_a_different_architecture(checkpoint, tmp_path):
    path, tied, _ = checkpoint
    mcore = tmp_path / "mcore"
    main(["hf-to-megatron", "--hf-checkpoint", str(path), "--save", str(mcore)])
    other = build_tiny_checkpoint(tmp_path / "other", tie_word_embeddings=not tied)
    with pytest.raises(ValueError, match="untie_embeddings_and_output_weights"):
        main(["megatron-to-hf", "--load", str(mcore), "--hf-checkpoint", str(other), "--save", str(tmp_path / "o")])
    # Without the converter's record, the load itself refuses: the output layer is in one and not the other.
    (mcore / "plugrl_convert.json").unlink()
    with pytest.raises(ValueError, match="output_layer.weight"):
        main(["megatron-to-hf", "--load", str(mcore), "--hf-checkpoint", str(other), "--save", str(tmp_path / "o")])


def test_megatron_to_hf_needs_a_torch_dist_checkpoint(checkpoint, tmp_path):
    path, _, _ = checkpoint
    with pytest.raises(FileNotFoundError, match="is not a torch_dist checkpoint: no .*metadata.json"):
        main(["megatron-to-hf", "--load", str(path), "--hf-checkpoint", str(path), "--save", str(tmp_path / "o")])


def test_unknown_direction_is_usage_error(capsys):
    assert main(["sideways"]) == 2
    assert "hf-to-megatron" in capsys.readouterr().err


def test_bad_paths_and_flags_are_one_line_errors(tmp_path, capsys):
    """``plugrl convert`` with a missing checkpoint or a contradicting flag: one line naming it, exit 1."""
    from plugrl.core.plugin_commands import run_command

    missing = tmp_path / "Qwen3-4B"
    assert run_command("convert", ["hf-to-megatron", "--hf-checkpoint", str(missing), "--save", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err == f"plugrl convert: error: --hf-checkpoint {missing} is not a directory\n"
    missing.mkdir()
    assert run_command("convert", ["hf-to-megatron", "--hf-checkpoint", str(missing), "--save", str(tmp_path / "o")]) == 1
    assert "no config.json there" in capsys.readouterr().err


def test_bad_sizes_and_save_paths_are_refused_before_any_weight_is_read(checkpoint, tmp_path, capsys):
    """A 0 size (a ZeroDivisionError deep inside), --save a file or the source folder, and a --save that
    already holds another model's weights (they would load beside the new ones): one line, exit 1."""
    from plugrl.core.plugin_commands import run_command

    path, _, _ = checkpoint

    def convert(*argv):
        code = run_command("convert", list(argv))
        return code, capsys.readouterr().err.strip()

    assert convert("hf-to-megatron", "--hf-checkpoint", str(path), "--save", str(tmp_path / "m"),
                   "--tensor-model-parallel-size", "0") == (
        1, "plugrl convert: error: --tensor-model-parallel-size must be >= 1, got 0")
    afile = tmp_path / "rows.jsonl"
    afile.write_text("{}\n")
    assert convert("hf-to-megatron", "--hf-checkpoint", str(path), "--save", str(afile)) == (
        1, f"plugrl convert: error: --save {afile} is a file; give a directory (a Megatron save root)")
    mcore = tmp_path / "mcore"
    assert convert("hf-to-megatron", "--hf-checkpoint", str(path), "--save", str(mcore))[0] == 0
    assert convert("megatron-to-hf", "--load", str(mcore), "--hf-checkpoint", str(path), "--save", str(tmp_path / "o"),
                   "--max-shard-bytes", "0") == (1, "plugrl convert: error: --max-shard-bytes must be >= 1, got 0")
    assert not (tmp_path / "o").exists()  # nothing half-written
    assert convert("megatron-to-hf", "--load", str(mcore), "--hf-checkpoint", str(path), "--save", str(path)) == (
        1, f"plugrl convert: error: --save {path} is the --hf-checkpoint directory; write the conversion somewhere else")
    out = tmp_path / "out"
    assert convert("megatron-to-hf", "--load", str(mcore), "--hf-checkpoint", str(path), "--save", str(out))[0] == 0
    code, err = convert("megatron-to-hf", "--load", str(mcore), "--hf-checkpoint", str(path), "--save", str(out))
    assert (code, err) == (1, f"plugrl convert: error: --save {out} already holds weights (model.safetensors): "
                              "remove them or choose another --save")


def test_ctrl_c_in_a_plugin_command_is_one_line(monkeypatch, capsys):
    from plugrl.core import plugin_commands

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(plugin_commands, "command_providers", lambda plugin_set=None: {"convert": (interrupted, "x")})
    assert plugin_commands.run_command("convert", ["hf-to-megatron"]) == 130
    assert capsys.readouterr().err == ("\nplugrl convert: interrupted; an output it was writing may be incomplete: "
                                       "remove it before running the command again\n")

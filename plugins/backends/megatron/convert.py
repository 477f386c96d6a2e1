"""``plugrl convert hf-to-megatron | megatron-to-hf``: checkpoint conversion on CPU (one process).

Checkpoint format: Megatron's legacy per-rank ``torch`` layout, not ``torch_dist``.
megatron-core 0.16.1's ``dist_checkpointing.save`` cannot run without CUDA (its async writer calls
``torch.cuda.synchronize`` unconditionally and its finalize step touches CUDA), so the converter
writes, for PP=1 and each TP rank r::

    SAVE/latest_checkpointed_iteration.txt           "release"
    SAVE/release/mp_rank_{r:02d}/model_optim_rng.pt  {"model": state_dict, "checkpoint_version": 3.0, "iteration": 0}
    SAVE/plugrl_megatron.json                        manifest: format, TP size, the MegatronModelConfig

The state dicts are those of megatron-core's GPTModel with the local layer spec (see weights.py).
``megatron-to-hf`` reads that layout back and writes an HF directory (safetensors, sharded with an
index when larger than ``--max-shard-bytes``) with the original checkpoint's config and tokenizer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

MANIFEST = "plugrl_megatron.json"
FORMAT = "plugrl-megatron-torch-v1"
TRACKER = "latest_checkpointed_iteration.txt"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

USAGE = """plugrl convert hf-to-megatron --hf-checkpoint DIR --save DIR [--tensor-model-parallel-size N]
plugrl convert megatron-to-hf --load DIR --hf-checkpoint ORIG --save DIR"""

_INT_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "kv_channels", "vocab_size", "make_vocab_size_divisible_by", "seq_length", "max_position_embeddings")
_SWITCHES = ("group_query_attention", "use_rotary_position_embeddings", "disable_bias_linear", "qk_layernorm",
             "swiglu", "untie_embeddings_and_output_weights", "add_qkv_bias")


def read_hf_config(path: str | Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def load_hf_state(path: str | Path) -> dict:
    """Every tensor of an HF safetensors checkpoint directory (single file or sharded)."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path} (only safetensors checkpoints are converted)")
    state: dict = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def _tensor_args(parser: argparse.ArgumentParser) -> None:
    for dest in _INT_FLAGS:
        parser.add_argument("--" + dest.replace("_", "-"), type=int, dest=dest)
    parser.add_argument("--norm-epsilon", type=float)
    parser.add_argument("--rotary-base", type=float)
    parser.add_argument("--normalization")
    for dest in _SWITCHES:
        parser.add_argument("--" + dest.replace("_", "-"), action="store_true", default=None, dest=dest)


def hf_to_megatron_main(argv: list[str]) -> int:
    import torch

    from .config_bridge import derive_model_config
    from .weights import hf_to_megatron

    parser = argparse.ArgumentParser(prog="plugrl convert hf-to-megatron")
    parser.add_argument("--hf-checkpoint", required=True)
    parser.add_argument("--save", required=True)
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    _tensor_args(parser)
    args = parser.parse_args(argv)

    cfg = derive_model_config(read_hf_config(args.hf_checkpoint), args)  # mismatches fail before any work
    hf_state = load_hf_state(args.hf_checkpoint)
    save = Path(args.save)
    tp = cfg.tensor_model_parallel_size
    files = []
    for rank in range(tp):
        shard = hf_to_megatron(hf_state, cfg, tp_size=tp, tp_rank=rank)
        rel = Path("release") / f"mp_rank_{rank:02d}" / "model_optim_rng.pt"
        (save / rel).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": shard, "checkpoint_version": 3.0, "iteration": 0}, save / rel)
        files.append(str(rel))
    (save / TRACKER).write_text("release")
    manifest = {"format": FORMAT, "layer_spec": "megatron-core local", "tensor_model_parallel_size": tp,
                "pipeline_model_parallel_size": 1, "files": files, "model_config": cfg.to_dict(),
                "hf_checkpoint": str(Path(args.hf_checkpoint).resolve())}
    (save / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {tp} TP shard(s) of a {cfg.num_layers}-layer {cfg.model_type} model to {save}")
    return 0


def load_megatron_shards(load: str | Path) -> tuple[list[dict], dict]:
    """The TP shards (rank order) and the manifest of a checkpoint written by hf-to-megatron."""
    import torch

    load = Path(load)
    manifest_path = load / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(f"{load} has no {MANIFEST}: not written by `plugrl convert hf-to-megatron`")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    shards = [torch.load(load / rel, map_location="cpu", weights_only=True)["model"] for rel in manifest["files"]]
    return shards, manifest


def write_hf_checkpoint(hf_state: dict, orig: str | Path, save: str | Path, max_shard_bytes: int) -> None:
    """safetensors weights (+ index when sharded) plus every non-weight file of ``orig``."""
    from safetensors.torch import save_file

    from .weights import export_hf_buckets

    orig, save = Path(orig), Path(save)
    save.mkdir(parents=True, exist_ok=True)
    for item in orig.iterdir():
        if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES) and item.name not in WEIGHT_INDEXES:
            shutil.copy2(item, save / item.name)
    buckets = list(export_hf_buckets(sorted(hf_state.items()), max_shard_bytes))
    if len(buckets) == 1:
        save_file(dict(buckets[0]), str(save / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, bucket in enumerate(buckets, start=1):
        name = f"model-{i:05d}-of-{len(buckets):05d}.safetensors"
        save_file(dict(bucket), str(save / name), metadata={"format": "pt"})
        for key, tensor in bucket:
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (save / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def megatron_to_hf_main(argv: list[str]) -> int:
    from types import SimpleNamespace

    from .config_bridge import MegatronModelConfig, derive_model_config
    from .weights import megatron_to_hf

    parser = argparse.ArgumentParser(prog="plugrl convert megatron-to-hf")
    parser.add_argument("--load", required=True, help="a checkpoint written by hf-to-megatron")
    parser.add_argument("--hf-checkpoint", required=True, help="the original HF checkpoint (config, tokenizer)")
    parser.add_argument("--save", required=True)
    parser.add_argument("--max-shard-bytes", type=int, default=5 * 1024**3)
    args = parser.parse_args(argv)

    shards, manifest = load_megatron_shards(args.load)
    stored = MegatronModelConfig.from_dict(manifest["model_config"])
    layout = SimpleNamespace(tensor_model_parallel_size=stored.tensor_model_parallel_size,
                             make_vocab_size_divisible_by=stored.make_vocab_size_divisible_by,
                             max_position_embeddings=stored.max_position_embeddings)
    expected = derive_model_config(read_hf_config(args.hf_checkpoint), layout)
    if expected != stored:
        diff = {k: (v, expected.to_dict()[k]) for k, v in stored.to_dict().items() if expected.to_dict()[k] != v}
        raise ValueError(f"{args.load} was not converted from {args.hf_checkpoint}'s architecture: "
                         f"(checkpoint, HF) differ in {diff}")
    hf_state = megatron_to_hf(shards, stored)
    write_hf_checkpoint(hf_state, args.hf_checkpoint, args.save, args.max_shard_bytes)
    print(f"wrote HF checkpoint ({len(hf_state)} tensors) to {args.save}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from plugrl.core.cli import dispatch

    commands = {"hf-to-megatron": f"{__name__}:hf_to_megatron_main", "megatron-to-hf": f"{__name__}:megatron_to_hf_main"}
    return dispatch(list(sys.argv[1:] if argv is None else argv), USAGE, commands, "plugrl convert")


if __name__ == "__main__":
    sys.exit(main())

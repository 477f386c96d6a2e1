"""``plugrl convert hf-to-megatron | megatron-to-hf``: checkpoint conversion on CPU (one process).

``hf-to-megatron`` writes a megatron-core distributed checkpoint in the ``torch_dist`` format, laid out
as Megatron-LM (and slime's ``tools/convert_hf_to_torch_dist.py``) save a release checkpoint::

    SAVE/latest_checkpointed_iteration.txt   "release"
    SAVE/release/metadata.json               {"sharded_backend": "torch_dist", ...}
    SAVE/release/.metadata, __0_*.distcp     PyTorch DCP: every tensor as one global tensor
    SAVE/release/common.pt                   {"checkpoint_version": 3.0}
    SAVE/plugrl_convert.json                 what the converter used: HF path, dtype, MegatronModelConfig

The tensors are those of megatron-core's GPTModel with the local layer spec (see weights.py), in the
HF checkpoint's dtype. A torch_dist checkpoint is TP-agnostic: the converter builds one TP=1 model in
a one-process gloo world and saves it; the train backend loads it at any TP with
``dist_ckpt.load_torch_dist``. ``--tensor-model-parallel-size`` therefore only validates that the
model splits into that many TP shards and sets the vocabulary padding stored (Megatron pads the
vocabulary to a multiple of ``--make-vocab-size-divisible-by`` x TP; a different padding still
loads, megatron-core fills or drops the padding rows).

``megatron-to-hf`` builds a TP=1 model from the original HF config, loads the torch_dist checkpoint
into it and writes an HF directory (safetensors in the checkpoint's dtype, sharded with an index when
larger than ``--max-shard-bytes``) with the original checkpoint's config and tokenizer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

INFO = "plugrl_convert.json"
FORMAT = "torch_dist"
RELEASE = "release"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# The per-TP-rank layout earlier plugrl versions wrote (read only by load_megatron_shards).
LEGACY_MANIFEST = "plugrl_megatron.json"

USAGE = """plugrl convert hf-to-megatron --hf-checkpoint DIR --save DIR [--tensor-model-parallel-size N]
plugrl convert megatron-to-hf --load DIR --hf-checkpoint ORIG --save DIR"""

_INT_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "kv_channels", "vocab_size", "make_vocab_size_divisible_by", "seq_length", "max_position_embeddings")
_SWITCHES = ("group_query_attention", "use_rotary_position_embeddings", "disable_bias_linear", "qk_layernorm",
             "swiglu", "untie_embeddings_and_output_weights", "add_qkv_bias")


def read_hf_config(path: str | Path) -> dict:
    config = Path(path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"--hf-checkpoint {path}: no config.json there (give a Hugging Face checkpoint "
                                "folder)" if Path(path).is_dir() else f"--hf-checkpoint {path} is not a directory")
    return json.loads(config.read_text())


def load_hf_state(path: str | Path) -> dict:
    """Every tensor of an HF safetensors checkpoint directory (single file or sharded)."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path} (only safetensors checkpoints are converted)")
    from plugrl.core.progress import progress_iter

    state: dict = {}
    for file in progress_iter(files, "[convert] reading", unit="shard", every=10.0):  # minutes for a 4B+ model
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


def _positive_flags(args, dests) -> None:
    """Sizes that must be >= 1, checked before any weight is read (a 0 divides by zero deep inside)."""
    from plugrl.core.flags import below_minimum

    problems = below_minimum(args, dests)
    if problems:
        raise ValueError(problems[0])


def _save_directory(save: Path, what: str) -> None:
    """``--save`` may not be an existing file (it would fail only after every weight was read)."""
    if save.exists() and not save.is_dir():
        raise ValueError(f"--save {save} is a file; give a directory{what}")


def _writable_save(save: Path, hf_checkpoint: str) -> None:
    """``--save`` must be a directory this command may fill: not a file, not the source checkpoint, and
    holding no weights of another model (they would be loaded beside the new ones). Checked first."""
    _save_directory(save, "")
    if save.exists() and Path(hf_checkpoint).exists() and save.resolve() == Path(hf_checkpoint).resolve():
        raise ValueError(f"--save {save} is the --hf-checkpoint directory; write the conversion somewhere else")
    if save.is_dir():
        old = sorted(p.name for p in save.iterdir() if p.name.endswith(WEIGHT_SUFFIXES) or p.name in WEIGHT_INDEXES)
        if old:
            raise ValueError(f"--save {save} already holds weights ({', '.join(old[:3])}"
                             f"{' ...' if len(old) > 3 else ''}): remove them or choose another --save")


def checkpoint_dtype(hf_state: dict):
    """The dtype the Megatron model is built in: the HF tensors' own (the promotion of all floating
    dtypes if they are mixed, which holds every value exactly)."""
    import torch

    dtypes = {t.dtype for t in hf_state.values() if t.is_floating_point()}
    if not dtypes:
        raise ValueError("the HF checkpoint has no floating-point tensors")
    dtype = dtypes.pop()
    for other in dtypes:
        dtype = torch.promote_types(dtype, other)
    return dtype


def _build_cpu_model(cfg, dtype):
    """A TP=1 GPTModel (local spec) on the CPU in ``dtype``, inside ``dist_ckpt.single_process_world``.
    Not initialised: every parameter is loaded right after."""
    from .config_bridge import build_gpt_model

    return build_gpt_model(dataclasses.replace(cfg, tensor_model_parallel_size=1), use_cpu_initialization=True,
                           perform_initialization=False, params_dtype=dtype).eval()


def hf_to_megatron_main(argv: list[str]) -> int:
    from .config_bridge import derive_model_config
    from .dist_ckpt import TRACKER, save_torch_dist, single_process_world
    from .weights import hf_to_megatron

    parser = argparse.ArgumentParser(prog="plugrl convert hf-to-megatron")
    parser.add_argument("--hf-checkpoint", required=True)
    parser.add_argument("--save", required=True, help="a Megatron save root: the checkpoint goes to SAVE/release")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1,
                        help="the training TP size to validate against and pad the vocabulary for; "
                             "the checkpoint itself loads at any TP")
    _tensor_args(parser)
    args = parser.parse_args(argv)

    _positive_flags(args, ("tensor_model_parallel_size", *_INT_FLAGS))
    cfg = derive_model_config(read_hf_config(args.hf_checkpoint), args)  # mismatches fail before any work
    save = Path(args.save)
    _save_directory(save, " (a Megatron save root)")
    target = save / RELEASE
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} is not empty: remove it or choose another --save")
    hf_state = load_hf_state(args.hf_checkpoint)
    dtype = checkpoint_dtype(hf_state)
    # The full (TP=1) tensors, padded for the requested TP size; freed before the save.
    state = hf_to_megatron(hf_state, cfg, tp_size=1, tp_rank=0)
    del hf_state
    with single_process_world():
        model = _build_cpu_model(cfg, dtype)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [key for key in missing if not key.endswith("_extra_state")]
        if missing or unexpected:  # the mapping and the GPTModel disagree: a bridge bug, never user error
            raise RuntimeError(f"mapped weights do not fit the GPTModel (missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]})")
        del state
        save_torch_dist(model, target)
    (save / TRACKER).write_text(RELEASE)
    info = {"format": FORMAT, "layer_spec": "megatron-core local", "dtype": str(dtype).removeprefix("torch."),
            "saved_tensor_model_parallel_size": 1, "model_config": cfg.to_dict(),
            "hf_checkpoint": str(Path(args.hf_checkpoint).resolve())}
    (save / INFO).write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote a torch_dist checkpoint of a {cfg.num_layers}-layer {cfg.model_type} model ({info['dtype']}) "
          f"to {target}")
    return 0


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
    from plugrl.core.progress import progress_iter

    weight_map, total = {}, 0
    for i, bucket in enumerate(progress_iter(buckets, "[convert] writing", unit="shard", every=10.0), start=1):
        name = f"model-{i:05d}-of-{len(buckets):05d}.safetensors"
        save_file(dict(bucket), str(save / name), metadata={"format": "pt"})
        for key, tensor in bucket:
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (save / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def megatron_to_hf_main(argv: list[str]) -> int:
    from types import SimpleNamespace

    import torch

    from .config_bridge import (
        DEFAULT_VOCAB_DIVISOR,
        MegatronModelConfig,
        derive_model_config,
    )
    from .dist_ckpt import (
        checkpoint_dir,
        load_torch_dist,
        single_process_world,
        tensors_metadata,
    )
    from .weights import megatron_to_hf

    parser = argparse.ArgumentParser(prog="plugrl convert megatron-to-hf")
    parser.add_argument("--load", required=True,
                        help="a torch_dist checkpoint (directory with metadata.json, or a Megatron save root)")
    parser.add_argument("--hf-checkpoint", required=True, help="the original HF checkpoint (config, tokenizer)")
    parser.add_argument("--save", required=True)
    parser.add_argument("--max-shard-bytes", type=int, default=5 * 1024**3)
    args = parser.parse_args(argv)
    _positive_flags(args, ("max_shard_bytes",))
    _writable_save(Path(args.save), args.hf_checkpoint)

    load = Path(args.load)
    if (load / LEGACY_MANIFEST).exists():
        raise ValueError(f"{load} is a per-rank checkpoint of an older plugrl; convert the HF checkpoint again "
                         "with `plugrl convert hf-to-megatron` (it now writes torch_dist)")
    metadata = tensors_metadata(load)  # raises, naming the path, when it is not a torch_dist checkpoint
    # The converter's record sits in the save root; --load may name the root or its release directory.
    info_path = next((p for p in (load / INFO, checkpoint_dir(load).parent / INFO) if p.exists()), None)
    info = json.loads(info_path.read_text()) if info_path else None
    stored = MegatronModelConfig.from_dict(info["model_config"]) if info else None
    layout = SimpleNamespace(
        make_vocab_size_divisible_by=stored.make_vocab_size_divisible_by if stored else DEFAULT_VOCAB_DIVISOR,
        max_position_embeddings=stored.max_position_embeddings if stored else None)
    cfg = derive_model_config(read_hf_config(args.hf_checkpoint), layout)
    if stored is not None:
        # Compare the architecture only: the TP size and its vocabulary padding do not matter here.
        mine = dataclasses.replace(stored, tensor_model_parallel_size=1, padded_vocab_size=cfg.padded_vocab_size)
        if mine != cfg:
            diff = {k: (v, cfg.to_dict()[k]) for k, v in mine.to_dict().items() if cfg.to_dict()[k] != v}
            raise ValueError(f"{args.load} was not converted from {args.hf_checkpoint}'s architecture: "
                             f"(checkpoint, HF) differ in {diff}")
    embedding = metadata.get("embedding.word_embeddings.weight")
    if embedding is None:
        raise ValueError(f"{checkpoint_dir(load)} holds no embedding.word_embeddings.weight: not a GPTModel checkpoint")
    # Build with the stored padding and dtype so the load copies every tensor as it is.
    cfg = dataclasses.replace(cfg, padded_vocab_size=int(embedding.global_shape[0]))
    with single_process_world():
        model = _build_cpu_model(cfg, embedding.dtype)
        load_torch_dist(model, load)
        state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    # megatron-core's torch RMSNorm fallback keeps its weights in fp32 whatever params_dtype is: write
    # every tensor in the dtype the converter read (the HF config's when the checkpoint came from elsewhere).
    hf_config = read_hf_config(args.hf_checkpoint)
    name = (info or {}).get("dtype") or hf_config.get("dtype") or hf_config.get("torch_dtype")
    dtype = getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else embedding.dtype
    hf_state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in megatron_to_hf([state], cfg).items()}
    write_hf_checkpoint(hf_state, args.hf_checkpoint, args.save, args.max_shard_bytes)
    print(f"wrote HF checkpoint ({len(hf_state)} tensors) to {args.save}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from plugrl.core.cli import dispatch

    commands = {"hf-to-megatron": f"{__name__}:hf_to_megatron_main", "megatron-to-hf": f"{__name__}:megatron_to_hf_main"}
    return dispatch(list(sys.argv[1:] if argv is None else argv), USAGE, commands, "plugrl convert")


if __name__ == "__main__":
    sys.exit(main())

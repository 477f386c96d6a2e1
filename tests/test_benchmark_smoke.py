"""benchmarks/train_throughput.py runs end to end on CPU (``--device cpu``, the tiny model): both
backends, the megatron one as two TP processes. Only the mechanics are checked (numbers from a CPU
smoke run mean nothing); the model size each backend reports must be the same model's."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core", reason="megatron-core not installed (plugrl[megatron])")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"


def test_train_throughput_smoke_run_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny", "--device", "cpu", "--tokens", "256",
                           "--samples", "4", "--response", "16", "--steps", "1",
                           "--backends", "torch,torch-fused,torch-full-logits,torch-no-grad-cache,megatron",
                           "--megatron-tp", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["backend"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"torch", "torch-fused", "torch-full-logits", "torch-no-grad-cache", "megatron tp2"}, \
        proc.stderr[-3000:]
    assert rows["torch-full-logits"]["params"] == rows["torch-fused"]["params"] == rows["torch"]["params"]
    assert rows["megatron tp2"]["gpus"] == 2 and rows["torch"]["gpus"] == 1
    # TP shards summed over ranks, replicated weights once: the HF model's count plus megatron's
    # vocabulary padding rows (tied embeddings: one matrix)
    from types import SimpleNamespace

    from plugrl.plugins.backends.megatron.config_bridge import derive_model_config
    from plugrl.plugins.backends.tiny_default import build_tiny_checkpoint
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(build_tiny_checkpoint(tmp_path / "tiny"))
    cfg = derive_model_config(hf, SimpleNamespace(tensor_model_parallel_size=2))
    padding = (cfg.padded_vocab_size - cfg.vocab_size) * cfg.hidden_size
    assert rows["megatron tp2"]["params"] == rows["torch"]["params"] + padding
    assert rows["torch"]["tokens"] == rows["megatron tp2"]["tokens"] == 256
    for row in rows.values():  # timed-step host diagnostics (benchmarks/gc_pauses.py)
        assert row["gc_s_per_step"] >= 0 and row["gc_full_collections_per_step"] >= 0
    assert "Python gc" in proc.stdout
    assert "megatron tp2" in proc.stdout and "tok/s/GPU" in proc.stdout


def test_train_throughput_data_parallel_with_a_cached_checkpoint(tmp_path):
    """``--megatron-dp 2 --micro-batches 2 --megatron-overlap-grad-reduce``: two ranks, each with its own two
    --tokens micro-batches per step, reducing gradients during the backward; ``--checkpoint-cache`` reuses
    the checkpoint already there instead of building another."""
    from plugrl.plugins.backends.tiny_default import build_tiny_checkpoint

    cache = tmp_path / "cache"
    weights = build_tiny_checkpoint(cache / "tiny", bf16=True) / "model.safetensors"
    built = weights.stat().st_mtime_ns
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny", "--device", "cpu", "--tokens", "256",
                           "--samples", "4", "--response", "16", "--steps", "1", "--backends", "megatron",
                           "--megatron-dp", "2", "--micro-batches", "2", "--megatron-overlap-grad-reduce",
                           "--checkpoint-cache", str(cache), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["backend"] == "megatron tp1 dp2 overlap x2mb" and row["gpus"] == 2
    assert row["micro_batches"] == 2 and row["tokens"] == 2 * 2 * 256  # two micro-batches of --tokens per DP rank
    assert weights.stat().st_mtime_ns == built and sorted(p.name for p in cache.iterdir()) == ["tiny"]


def test_train_throughput_accumulates_micro_batches_into_one_step(tmp_path):
    """``--micro-batches 3``: every row trains 3 micro-batches of --tokens per optimizer step (the
    backend's own micro-batch count, not the script's arithmetic) and counts all their tokens."""
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny", "--device", "cpu", "--tokens", "256",
                           "--samples", "4", "--response", "16", "--steps", "1", "--micro-batches", "3",
                           "--backends", "transformers,torch", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["backend"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"transformers", "torch x3mb"}, proc.stderr[-3000:]
    assert rows["torch x3mb"]["micro_batches"] == 3
    assert rows["torch x3mb"]["tokens"] == rows["transformers"]["tokens"] == 3 * 256
    assert "3 x 256 tokens/step" in proc.stdout

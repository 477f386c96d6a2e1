"""Throughput of the embedded ``hf`` rollout engine: generated tokens per second at several batch sizes.

Runs anywhere (CPU or one GPU); builds a random-init Qwen3 checkpoint locally (no hub):
  tiny   the default test model (2 layers, hidden 64)
  0.6b   Qwen3-0.6B shape (28 layers, hidden 1024, vocab 151936)
  4b     Qwen3-4B shape (36 layers, hidden 2560, vocab 151936), as in shared/MEASURED.md
Each batch size submits that many concurrent ``generate`` calls (random prompts, ``ignore_eos`` so
every request runs to ``--new-tokens``) and times them end to end. ``--compare-generate`` also times
``model.generate`` on the same batch (sampling, same lengths, same SDPA backends) as a reference.
``--cudnn-attention`` lets SDPA use cuDNN, which re-plans for every new KV length: on an H100 with
torch 2.11 that made every decode step ~30 ms slower per layer call (engine and generate alike).
The header reports the engine's decode path: ``slots+cuda_graphs`` / ``slots`` (the fast path: slot KV
cache and the engine's own forward, with or without CUDA graphs) or ``hf (why)`` (HF forwards over a
``DynamicCache``); ``--no-fast-decode`` / ``--no-cuda-graphs`` select the slower ones for comparison;
``--decode-attention sdpa,matmul,flash`` runs one engine per attention implementation (rows labelled,
one ``generate`` baseline per batch); ``--compile-decode on,off`` also one per compile_decode value
(the fused decode ops compiled or run eagerly; ``auto`` = compiled on CUDA); ``--kv-bucket 256,64`` also
one per kv_bucket value (the smallest KV-length bucket the CUDA graphs are captured for). After the table, where
each timed pass's time went (the engine's ``stats()`` split: prefill, and per decode step the launch,
the wait for the sampled tokens, the host's per-row bookkeeping); ``--profile`` adds the CUDA kernels of
one more pass at the largest batch.

    python benchmarks/hf_engine_throughput.py --model tiny --batch-sizes 1,64,256
    python benchmarks/hf_engine_throughput.py --model 4b --batch-sizes 64,256 --prompt-len 256 --new-tokens 256 --compare-generate
    python benchmarks/hf_engine_throughput.py --model 4b --batch-sizes 64,256 --prompt-len 256 --new-tokens 256 \
        --compare-generate --decode-attention sdpa,matmul,flash --profile
    python benchmarks/hf_engine_throughput.py --model 4b --batch-sizes 64,256 --prompt-len 256 --new-tokens 256 \
        --compare-generate --kv-bucket 256,64
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

import torch
from plugrl.plugins.backends.hf.engine import HFRolloutEngine, _attention_backends
from plugrl.plugins.backends.hf.slot_batch import KV_BUCKET
from plugrl.plugins.backends.torch.tiny_default import build_tiny_checkpoint

SHAPES = {
    "tiny": {},
    "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960),
    "4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960),
}


def build(shape: str, directory: Path) -> Path:
    """The tiny test checkpoint, or a random bf16 Qwen3 of the given shape with the tiny tokenizer (its
    ids are a subset of the large vocabulary, so prompts and decoding work)."""
    if shape == "tiny":
        return build_tiny_checkpoint(directory / shape)
    return build_tiny_checkpoint(directory / shape, bf16=True, **SHAPES[shape])


def prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 300) for _ in range(length)] for _ in range(batch)]


SPLIT = ("prefill_s", "decode_launch_s", "decode_wait_s", "decode_host_s")  # the engine's time split (stats())


async def time_engine(engine, batch, prompt_len, new_tokens, temperature) -> tuple[float, int, dict]:
    """-> (generated tokens per second, decode steps taken, the engine's time split in seconds plus
    the wall time as "wall_s")."""
    params = {"max_new_tokens": new_tokens, "temperature": temperature, "ignore_eos": True}
    before = engine.stats()
    start = time.perf_counter()
    outs = await asyncio.gather(*[engine.generate(p, params) for p in prompts(batch, prompt_len, batch)])
    elapsed = time.perf_counter() - start
    after = engine.stats()
    split = {key: after[key] - before[key] for key in SPLIT} | {"wall_s": elapsed}
    return sum(len(o["tokens"]) for o in outs) / elapsed, after["decode_steps"] - before["decode_steps"], split


def split_line(batch: int, steps: int, split: dict) -> str:
    """Where the timed pass's wall time went: prefill, and per decode step the forward's launch, the wait
    for the sampled tokens (the GPU working) and the host's per-row bookkeeping (the GPU idle)."""
    per_step = {key: 1e3 * split[key] / max(1, steps) for key in SPLIT[1:]}
    other = split["wall_s"] - sum(split[key] for key in SPLIT)
    return (f"{batch:>6} prefill {1e3 * split['prefill_s']:.2f} ms | per decode step: launch {per_step['decode_launch_s']:.2f} ms, "
            f"wait {per_step['decode_wait_s']:.2f} ms, host {per_step['decode_host_s']:.2f} ms | "
            f"outside the decode thread's phases {other:.2f} s of {split['wall_s']:.2f} s")


def time_generate(engine, batch, prompt_len, new_tokens, temperature, engine_cudnn: bool) -> float:
    model, device = engine.model, engine.device
    ids = torch.tensor(prompts(batch, prompt_len, batch), device=device)
    mask = torch.ones_like(ids)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    # same SDPA backends as the engine, so the two columns differ only in the decode loop
    with torch.inference_mode(), _attention_backends(engine_cudnn)():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                             pad_token_id=engine.tokenizer.pad_token_id)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (out.shape[1] - prompt_len) * batch / (time.perf_counter() - start)


COMPILE_DECODE = {"auto": "auto", "on": True, "off": False}  # --compile-decode values -> the engine option


def run_engine(args, path, attention: str, compile_decode: str, batches: list[int], baseline: dict, *,
               header: bool, kv_bucket: int = KV_BUCKET) -> list[str]:
    """One engine with ``decode_attention=attention``, ``compile_decode`` and ``kv_bucket``: a table row per batch size
    (the ``generate`` baseline is timed once per batch, on the first engine, and kept in ``baseline``;
    ``header``: print the run's header and the table's first). Returns the time-split lines."""
    engine = HFRolloutEngine(str(path), device=args.device, dtype=args.dtype, max_batch_size=max(batches),
                             cudnn_attention=args.cudnn_attention, fast_decode=not args.no_fast_decode,
                             cuda_graphs=not args.no_cuda_graphs, decode_attention=attention,
                             compile_decode=COMPILE_DECODE[compile_decode], kv_bucket=kv_bucket)
    label = attention if compile_decode == "auto" else f"{attention}/ops-{compile_decode}"
    label += "" if kv_bucket == KV_BUCKET else f"/kv{kv_bucket}"
    try:
        asyncio.run(time_engine(engine, 2, args.prompt_len, 4, args.temperature))  # warm-up
        if header:
            dtype = next(engine.model.parameters()).dtype
            name = args.checkpoint or args.model
            device_name = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu"
            print(f"model={name} device={engine.device} ({device_name}) dtype={dtype} torch={torch.__version__} "
                  f"threads={torch.get_num_threads()} cudnn_attention={args.cudnn_attention} "
                  f"prompt={args.prompt_len} new={args.new_tokens} T={args.temperature}")
            header = f"{'attention':>15} {'batch':>6} {'engine tok/s':>13} {'cold tok/s':>11} {'steps':>6}"
            print(header + (f" {'generate tok/s':>15} {'engine/generate':>16}" if args.compare_generate else ""))
        splits = [f"decode path: {engine.decode_path}, decode_attention={attention}, compile_decode={compile_decode}, "
                  f"kv_bucket={kv_bucket}"]
        for batch in batches:
            # first pass at a new batch size captures its CUDA graphs; the timed pass replays them
            # (a rollout engine runs the same shapes again and again)
            # ("cold tok/s" is that first pass, capture included)
            cold, _, _ = asyncio.run(time_engine(engine, batch, args.prompt_len, args.new_tokens, args.temperature))
            rate, steps, split = asyncio.run(time_engine(engine, batch, args.prompt_len, args.new_tokens,
                                                         args.temperature))
            splits.append(split_line(batch, steps, split))
            row = f"{label:>15} {batch:>6} {rate:>13,.0f} {cold:>11,.0f} {steps:>6}"
            if args.compare_generate:
                if batch not in baseline:
                    time_generate(engine, batch, args.prompt_len, 8, args.temperature, args.cudnn_attention)  # warm-up
                    baseline[batch] = time_generate(engine, batch, args.prompt_len, args.new_tokens, args.temperature,
                                                    args.cudnn_attention)
                row += f" {baseline[batch]:>15,.0f} {rate / baseline[batch]:>15.2f}x"
            print(row, flush=True)
        splits.append(f"engine decode info: {engine.decode_info()}")
        if args.profile and engine.device.type == "cuda":
            from kernel_profile import profile_cuda, profile_lines

            batch = max(batches)
            profiled = profile_cuda(lambda: asyncio.run(time_engine(
                engine, batch, args.prompt_len, args.new_tokens, args.temperature)), top=args.top)
            splits += [""] + profile_lines(f"engine ({label}) bs{batch}", profiled)
        return splits
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--checkpoint", help="an existing HF checkpoint instead of --model")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--batch-sizes", default="1,64,256")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--compare-generate", action="store_true", help="also time model.generate")
    parser.add_argument("--cudnn-attention", action="store_true", help="let SDPA use cuDNN (engine option)")
    parser.add_argument("--no-fast-decode", action="store_true", help="engine option fast_decode=False")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="engine option cuda_graphs=False")
    parser.add_argument("--decode-attention", default="sdpa",
                        help="comma-separated engine decode_attention values, one engine each (sdpa, matmul, flash)")
    parser.add_argument("--compile-decode", default="auto",
                        help="comma-separated engine compile_decode values, one engine each per attention: auto (on "
                             "CUDA), on, off (the fused decode ops compiled or not)")
    parser.add_argument("--kv-bucket", default=str(KV_BUCKET),
                        help="comma-separated engine kv_bucket values (the smallest KV-length bucket), one engine "
                             "each per attention and compile value")
    parser.add_argument("--profile", action="store_true",
                        help="CUDA kernel profile of one more pass at the largest batch (benchmarks/kernel_profile.py)")
    parser.add_argument("--top", type=int, default=25, help="kernels listed with --profile")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    attentions = [a.strip() for a in args.decode_attention.split(",") if a.strip()]
    compiles = [c.strip() for c in args.compile_decode.split(",") if c.strip()]
    unknown = sorted(set(compiles) - set(COMPILE_DECODE))
    if unknown:
        parser.error(f"--compile-decode: unknown {unknown}; use {', '.join(COMPILE_DECODE)}")
    try:
        kv_buckets = [int(k) for k in args.kv_bucket.split(",") if k.strip()]
    except ValueError:
        parser.error(f"--kv-bucket {args.kv_bucket!r}: comma-separated whole numbers")
    if not kv_buckets or min(kv_buckets) < 1:
        parser.error(f"--kv-bucket {args.kv_bucket!r}: values must be >= 1")
    variants = [(a, c, k) for a in attentions for c in compiles for k in kv_buckets]
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or build(args.model, Path(tmp))
        baseline: dict = {}
        splits = []
        for i, (attention, compile_decode, kv) in enumerate(variants):
            splits += [""] + run_engine(args, path, attention, compile_decode, batches, baseline, header=i == 0,
                                        kv_bucket=kv)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the next engine loads its own copy of the weights
        print("\nthe engine's time in the timed passes:" + "\n".join(splits))


if __name__ == "__main__":
    main()

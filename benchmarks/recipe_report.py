"""The table of a recipe run on GPUs (``benchmarks/recipe_run.sh``): per run directory, the median
step split (rollout / train / weight sync / offload / other), train tokens/s per train GPU and MFU,
weight-sync seconds, and peak memory per GPU.

Reads each run's ``metrics.jsonl`` and ``config.yaml`` (written by ``plugrl train``) and, when the
script sampled it, ``smi.csv`` (``nvidia-smi --query-gpu=index,memory.used --format=csv,noheader``
lines). Medians skip the first rollout (start-up, first pinned allocations, warm caches).

Train tokens/s per GPU = ``train/tokens`` / ``perf/train_time`` / train GPUs. ``perf/train_time`` is
the whole train phase: the old-policy (and reference) log-prob forwards as well as the update, so
MFU here counts 6·N FLOPs per trained token and understates the FLOPs the GPUs do (each extra
forward is another 2·N). The train backends also log the two parts of the phase,
``perf/train_log_probs_time`` (the old-policy and reference forwards) and ``perf/train_update_time`` (forward,
backward and optimizer steps); "update MFU" is 6·N per token over the update time alone, the
quantity ``benchmarks/train_throughput.py`` reports, so the two can be compared.

    python benchmarks/recipe_report.py RUN_DIR [RUN_DIR ...] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

PHASES = ("rollout", "train", "weight_sync", "offload", "save")


def model_parameters(hf_checkpoint: str) -> int:
    """Parameters of the checkpoint's architecture, counted on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hf_checkpoint)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def peak_memory_gib(smi_csv: Path) -> dict[int, float]:
    """{GPU index: the largest ``memory.used`` sampled, GiB}; unreadable lines are skipped."""
    peak: dict[int, float] = {}
    if not smi_csv.exists():
        return peak
    for line in smi_csv.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2 or not parts[1].endswith("MiB"):
            continue
        try:
            index, used = int(parts[0]), float(parts[1].split()[0]) / 1024
        except ValueError:
            continue
        peak[index] = max(peak.get(index, 0.0), used)
    return peak


def summarize(run_dir: Path, *, n_params: int | None = None, peak_flops: float = 989e12) -> dict:
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("phase") == "train" and "perf/step_time" in r]
    if len(rows) < 2:
        raise ValueError(f"{run_dir}: {len(rows)} finished rollouts in metrics.jsonl; the report needs at least 2 "
                         "(the first is dropped as warm-up)")
    rows = rows[1:]
    train_gpus = int(config["actor_num_nodes"]) * int(config["actor_num_gpus_per_node"])
    n_params = n_params if n_params is not None else model_parameters(config["hf_checkpoint"])

    def median(key: str) -> float:
        return statistics.median(float(r.get(key, 0.0)) for r in rows)

    result = {"run": run_dir.name, "steps": len(rows), "train_gpus": train_gpus,
              "tp": int(config.get("tensor_model_parallel_size") or 1),
              "placement": "colocated" if config.get("colocate") else "decoupled",
              "step": median("perf/step_time")}
    for phase in PHASES:
        result[phase] = median(f"perf/{phase}_time")
    result["other"] = statistics.median(
        float(r["perf/step_time"]) - sum(float(r.get(f"perf/{p}_time", 0.0)) for p in PHASES) for r in rows)
    per_gpu = [float(r["train/tokens"]) / float(r["perf/train_time"]) / train_gpus for r in rows]
    result["train_tokens_per_gpu_s"] = statistics.median(per_gpu)
    result["mfu"] = 6 * n_params * result["train_tokens_per_gpu_s"] / peak_flops
    # the updates alone (perf/train_update_time, logged by the train backends): what train_throughput.py times
    if all(float(r.get("perf/train_update_time", 0.0)) > 0 for r in rows):
        update = [float(r["train/tokens"]) / float(r["perf/train_update_time"]) / train_gpus for r in rows]
        result["update_mfu"] = 6 * n_params * statistics.median(update) / peak_flops
        result["log_probs"] = median("perf/train_log_probs_time")
        result["update"] = median("perf/train_update_time")
    else:  # runs from revisions before the split
        result["update_mfu"] = result["log_probs"] = result["update"] = None
    result["peak_gib"] = peak_memory_gib(run_dir / "smi.csv")
    return result


def format_table(results: list[dict]) -> str:
    header = ("| run | placement | train GPUs | TP | steps | step s | rollout | train | weight sync | offload "
              "| save | other | train tok/s/GPU | MFU (6N) | train: log-probs / update s | update MFU (6N) "
              "| peak GiB per GPU |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in results:
        peak = " ".join(f"{r['peak_gib'][i]:.1f}" for i in sorted(r["peak_gib"])) or "-"
        split = f"{r['log_probs']:.2f} / {r['update']:.2f}" if r.get("update") is not None else "-"
        update_mfu = f"{r['update_mfu']:.1%}" if r.get("update_mfu") is not None else "-"
        lines.append(f"| {r['run']} | {r['placement']} | {r['train_gpus']} | {r['tp']} | {r['steps']} | {r['step']:.2f} "
                     f"| {r['rollout']:.2f} | {r['train']:.2f} | {r['weight_sync']:.2f} | {r['offload']:.2f} "
                     f"| {r['save']:.2f} | {r['other']:.2f} | {r['train_tokens_per_gpu_s']:,.0f} | {r['mfu']:.1%} "
                     f"| {split} | {update_mfu} | {peak} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100/H200: 989)")
    args = parser.parse_args(argv)
    results = []
    for run_dir in args.run_dirs:
        try:
            results.append(summarize(run_dir, peak_flops=args.peak_tflops * 1e12))
        except (OSError, ValueError, KeyError) as exc:
            print(f"{run_dir}: no report ({exc})")
    if results:
        print(format_table(results))
    return 0 if len(results) == len(args.run_dirs) else 1


if __name__ == "__main__":
    raise SystemExit(main())

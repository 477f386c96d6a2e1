"""Where a training step's time goes: per-phase seconds and the framework overhead's share of step time.

Runs ``plugrl train`` (the embedded tiny default run unless the extra flags say otherwise) in a
subprocess on this machine, then reads the run's ``metrics.jsonl`` (the ``perf/*_time`` timers that
``core/loop.py`` and the rollout manager log per rollout) and prints one table. It can also read an
existing run (``--run-dir``) without training.

What the rows mean (medians over the measured rollouts; "share" = the phase's total over the total
step time, so the shares of the rows above the overhead line add up to 100%):

sync loop (generation and training take turns):
  generate          generation + reward in the rollout manager (``perf/generate_time``)
  train             ``perf/train_time`` (the train group's call, Ray hand-off of the batch included)
  weight_sync       ``perf/weight_sync_time`` (the push only)
  eval              ``perf/eval_time`` (rollouts with an eval only)
  offload           ``perf/offload_time`` (colocated GPU runs only)
  save              ``perf/save_time`` (colocated GPU runs with a save due: the trainer's state)
  rollout to batch  ``perf/rollout_time - perf/generate_time``: samples -> train data, metrics
  rollout hand-off  ``perf/wait_rollout_time - perf/rollout_time``: the Ray call and result transfer
  loop other        ``step - wait_rollout - train - weight_sync - eval - offload - save``: hooks, polling, ...
The framework overhead is the last three: ``step - generate - train - weight_sync - eval - offload - save``.

async loop (``--async``: rollout k+1 generates while k trains): generation overlaps training, so the
step is ``wait_rollout`` (the driver blocked on generation, hand-off included) + train + weight_sync
+ eval + offload + save + loop other, and the framework overhead is ``loop other``; the rollout manager's
generate time is shown for reference, outside the sum.

"between steps" (from the rows' timestamps) is time outside ``perf/step_time``: the log line,
checkpoint saves, the next step's start.

    python benchmarks/step_breakdown.py --num-rollout 25                 # CPU, sync loop
    python benchmarks/step_breakdown.py --num-rollout 25 --async
    python benchmarks/step_breakdown.py --device cuda --train-backend megatron -- --rollout-batch-size 64
    python benchmarks/step_breakdown.py --run-dir runs/2024-...          # an existing run
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# The timers a step is made of (core/loop.py); absent ones count as 0 (eval/offload run on some steps).
STEP_PARTS = ("train", "weight_sync", "eval", "offload", "save")


def _t(row: dict, name: str) -> float:
    value = row.get(f"perf/{name}_time")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def step_rows(rows: list[dict], skip_first: int = 0) -> list[dict]:
    """The per-rollout train rows that carry ``perf/step_time``, one per rollout id (the last one
    written wins: an appended, resumed run rewrote it), in rollout order, minus the first
    ``skip_first`` (warm-up: lazy initialisation, first-call compilation)."""
    by_id = {}
    for row in rows:
        if row.get("phase") == "train" and isinstance(row.get("perf/step_time"), (int, float)):
            by_id[int(row["rollout_id"])] = row
    ordered = [by_id[k] for k in sorted(by_id)]
    return ordered[skip_first:]


def breakdown(rows: list[dict], *, async_train: bool) -> dict:
    """Per-step phase seconds for ``rows`` (from :func:`step_rows`): ``{"phases": {name: [s, ...]},
    "overhead": [s, ...], "step": [s, ...], "in_sum": [names whose shares add up to the step],
    "reference": [names shown outside the sum], "between": [s, ...]}``. See the module docstring for
    what each phase is."""
    if not rows:
        raise ValueError("no train rows with perf/step_time: did the run log any rollout?")
    phases: dict[str, list[float]] = {}
    overhead, steps = [], []

    def add(name: str, value: float) -> None:
        phases.setdefault(name, []).append(value)

    for row in rows:
        step = _t(row, "step")
        parts = {name: _t(row, name) for name in STEP_PARTS}
        loop_other = step - _t(row, "wait_rollout") - sum(parts.values())
        if async_train:
            add("wait_rollout", _t(row, "wait_rollout"))
            for name, value in parts.items():
                add(name, value)
            add("loop other", loop_other)
            add("generate (overlapped)", _t(row, "generate"))
            overhead.append(loop_other)
        else:
            add("generate", _t(row, "generate"))
            for name, value in parts.items():
                add(name, value)
            add("rollout to batch", _t(row, "rollout") - _t(row, "generate"))
            add("rollout hand-off", _t(row, "wait_rollout") - _t(row, "rollout"))
            add("loop other", loop_other)
            overhead.append(step - _t(row, "generate") - sum(parts.values()))
        steps.append(step)
    # Wall time between consecutive rows' log timestamps that is not in the later row's step.
    between = [float(b["time"]) - float(a["time"]) - _t(b, "step") for a, b in itertools.pairwise(rows)
               if int(b["rollout_id"]) == int(a["rollout_id"]) + 1 and "time" in a and "time" in b]
    in_sum = [n for n in phases if n != "generate (overlapped)"]
    return {"phases": phases, "overhead": overhead, "step": steps, "in_sum": in_sum,
            "reference": [n for n in phases if n not in in_sum], "between": between}


def format_table(result: dict, *, device: str, title: str) -> str:
    """The markdown table printed at the end (see the module docstring)."""
    total = sum(result["step"])
    lines = [title, f"device: {device}; {len(result['step'])} rollouts measured", "",
             f"| {'phase':<22} | {'median s':>9} | {'share of step':>13} |",
             f"|{'-' * 24}|{'-' * 11}|{'-' * 15}|"]
    for name in result["in_sum"]:
        values = result["phases"][name]
        if not any(values):
            continue  # a phase this run never had (offload on CPU, eval with no eval set)
        lines.append(f"| {name:<22} | {statistics.median(values):9.4f} | {sum(values) / total:12.1%} |")
    lines.append(f"| {'**step**':<22} | {statistics.median(result['step']):9.4f} | {1:12.1%} |")
    overhead = result["overhead"]
    lines.append(f"| {'**framework overhead**':<22} | {statistics.median(overhead):9.4f} | "
                 f"{sum(overhead) / total:12.1%} |")
    for name in result["reference"]:
        lines.append(f"| {name:<22} | {statistics.median(result['phases'][name]):9.4f} | {'-':>13} |")
    if result["between"]:
        lines.append(f"| {'between steps':<22} | {statistics.median(result['between']):9.4f} | {'-':>13} |")
    return "\n".join(lines)


def device_name(device: str) -> str:
    """What ran the phases: the CPU model and core count, or the GPUs."""
    if device == "cuda":
        import torch

        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:  # not Linux
        pass
    return f"CPU {model}, {os.cpu_count()} cores"


def run_config(run_dir: Path) -> dict:
    """The run's resolved ``config.yaml`` (``plugrl train`` writes it before training), or {}."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def run_train(run_dir: Path, num_rollout: int, train_backend: str, device: str, extra: list[str]) -> None:
    """``plugrl train`` into ``run_dir`` (its console output goes to ``run_dir/train.log``)."""
    argv = [sys.executable, "-m", "plugrl.core.cli", "train", "--num-rollout", str(num_rollout),
            "--train-backend", train_backend, "--device", device, "--output-dir", str(run_dir), *extra]
    log = run_dir / "train.log"
    print(f"running: {' '.join(argv[1:])}\n  (log: {log})", file=sys.stderr, flush=True)
    with open(log, "w") as out:
        code = subprocess.call(argv, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise SystemExit(f"plugrl train exited with {code}; last lines of {log}:\n" + "\n".join(tail))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Flags this script does not know are passed to plugrl train.")
    p.add_argument("--num-rollout", type=int, default=25)
    p.add_argument("--train-backend", choices=["torch", "megatron"], default="torch")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--output-dir", help="run directory (default: a new temporary one, kept); must not hold a run")
    p.add_argument("--run-dir", help="read this existing run instead of training")
    p.add_argument("--skip-first", type=int, default=1, help="rollouts left out as warm-up (default 1)")
    args, extra = p.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if args.run_dir:
        run_dir = Path(args.run_dir)
    else:
        run_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="plugrl-step-breakdown-"))
        if (run_dir / "metrics.jsonl").exists():
            p.error(f"{run_dir} already holds a run (metrics.jsonl is appended to); pass a new --output-dir "
                    f"or read it with --run-dir")
        run_dir.mkdir(parents=True, exist_ok=True)
        run_train(run_dir, args.num_rollout, args.train_backend, args.device, extra)
    from plugrl.core.metrics import read_metrics

    config = run_config(run_dir)
    async_train = bool(config.get("async_train", "--async" in extra))
    rows = step_rows(read_metrics(run_dir / "metrics.jsonl"), args.skip_first)
    result = breakdown(rows, async_train=async_train)
    title = (f"step breakdown of {run_dir}: {'async' if async_train else 'sync'} loop, train backend "
             f"{config.get('train_backend') or args.train_backend}")
    print(format_table(result, device=device_name(args.device), title=title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

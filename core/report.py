"""``plugrl report RUN_DIR``: plot a run's metrics into ``report.png`` and summarise them in ``report.md``.

Runs on the user's machine after (or during) a run; reads only files: ``RUN_DIR/metrics.jsonl``
(written by :class:`plugrl.core.metrics.MetricsLogger`) and ``RUN_DIR/config.yaml``. A run that is
still going, or was killed, reports whatever it has logged so far.

Panels (only those with data), each against the rollout id: reward, eval accuracy
(``eval/*/pass@1``, else ``eval/*/mean_reward``), response length, KL, entropy, clip fraction.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .metrics import format_number, latest_rows, read_metrics

# (panel title, metric names plotted on it); eval accuracy is found by pattern in _panels().
_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward", ("rollout/raw_reward",)),
    ("response length (tokens)", ("rollout/response_len",)),
    ("KL (kl_loss: to reference; ppo_kl: to rollout policy)", ("train/kl_loss", "train/ppo_kl")),
    ("entropy", ("train/entropy_loss",)),
    ("clip fraction", ("train/pg_clipfrac",)),
)

# Config summary fields: (label, candidate keys); keys are compared with '-' and '_' unified.
_SUMMARY_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model", ("hf_checkpoint", "model", "model_name", "model_path")),
    ("estimator", ("advantage_estimator",)),
    ("reward", ("rm_type", "custom_rm_path")),
    ("lr", ("lr", "learning_rate")),
)

# Direction of the "best" column, by name fragment; metrics matching neither (entropy, response length,
# counts) have no best, since a rise or a fall can be healthy or a symptom depending on the run.
_NO_DIRECTION = ("entropy", "response_len", "num_", "reward_samples")
# failure counts whose names also hold "reward": checked before the higher-is-better fragments
_FAILURES = ("_errors", "_timeouts", "stuck_threads", "_failed")
_HIGHER_IS_BETTER = ("reward", "pass@", "acc")
_LOWER_IS_BETTER = ("loss", "kl", "clipfrac", "truncat", "_time", "grad_norm")

_NON_METRIC_KEYS = {"rollout_id", "phase", "time"}


def _normalise(key: str) -> str:
    return key.replace("-", "_").lower()


def _flatten(config: Mapping[str, Any]) -> dict[str, Any]:
    # Nested sections (per-plugin options) are searched too; the first occurrence of a key wins.
    flat: dict[str, Any] = {}
    stack = [config]
    while stack:
        section = stack.pop(0)
        for key, value in section.items():
            if isinstance(value, Mapping):
                stack.append(value)
            else:
                flat.setdefault(_normalise(str(key)), value)
    return flat


def config_summary(config: Mapping[str, Any]) -> str:
    """``model X | estimator grpo | reward deepscaler | lr 1e-06 | batch 32x8 (G=256)``, from what exists."""
    flat = _flatten(config)
    parts = []
    for label, candidates in _SUMMARY_FIELDS:
        for key in candidates:
            if flat.get(key) not in (None, ""):
                value = flat[key]
                if label == "model":
                    value = Path(str(value)).name or value
                parts.append(f"{label} {value}")
                break
    batch, n = flat.get("rollout_batch_size"), flat.get("n_samples_per_prompt")
    if batch is not None:
        text = f"batch {batch}x{n}" if n is not None else f"batch {batch}"
        if flat.get("global_batch_size") is not None:
            text += f" (G={flat['global_batch_size']})"
        parts.append(text)
    return " | ".join(parts)


def _series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        step = row.get("rollout_id")
        if not isinstance(step, int):
            continue
        for key, value in row.items():
            if key in _NON_METRIC_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue
            series.setdefault(key, []).append((step, float(value)))
    for points in series.values():
        points.sort(key=lambda p: p[0])
    return series


def _panels(series: Mapping[str, list]) -> list[tuple[str, list[str]]]:
    panels = []
    reward = [name for name in _PANELS[0][1] if series.get(name)]
    if reward:
        panels.append((_PANELS[0][0], reward))
    accuracy = sorted(n for n in series if n.startswith("eval/") and n.endswith("/pass@1"))
    if accuracy:
        panels.append(("eval accuracy (pass@1)", accuracy))
    else:
        mean_rewards = sorted(n for n in series if n.startswith("eval/") and n.endswith("/mean_reward"))
        if mean_rewards:
            panels.append(("eval mean reward", mean_rewards))
    for title, names in _PANELS[1:]:
        present = [name for name in names if series.get(name)]
        if present:
            panels.append((title, present))
    return panels


def _best(name: str, points: list[tuple[int, float]]) -> tuple[int, float] | None:
    """(rollout id, value) of the best point, the earliest on ties; None where no direction is known."""
    if any(marker in name for marker in _NO_DIRECTION):
        return None
    if any(marker in name for marker in _FAILURES):
        return min(points, key=lambda p: (p[1], p[0]))
    if any(marker in name for marker in _HIGHER_IS_BETTER):
        return max(points, key=lambda p: (p[1], -p[0]))
    if any(marker in name for marker in _LOWER_IS_BETTER):
        return min(points, key=lambda p: (p[1], p[0]))
    return None


def _plot(path: Path, series: Mapping[str, list], panels: list[tuple[str, list[str]]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    count = max(1, len(panels))
    cols = 1 if count == 1 else 2
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    flat_axes = [ax for row in axes for ax in row]
    for ax, (panel_title, names) in zip(flat_axes, panels):
        for name in names:
            xs, ys = zip(*series[name])
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=name)
        ax.set_title(panel_title)
        ax.set_xlabel("rollout")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")  # the metric names say exactly what is plotted
    if not panels:
        flat_axes[0].text(0.5, 0.5, "no plottable metrics yet", ha="center", va="center")
    for ax in flat_axes[len(panels) or 1 :]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _markdown(run_dir: Path, summary: str, series: Mapping[str, list], image: str) -> str:
    lines = [f"# plugrl report: {run_dir.name}", ""]
    lines.append(f"Config: {summary}" if summary else "Config: (no config.yaml)")
    last_step = max((p[0] for points in series.values() for p in points), default=None)
    if last_step is not None:
        lines.append(f"Rollouts logged: up to rollout {last_step}")
    lines += ["", f"![metrics]({image})", ""]
    lines.append(
        "Best: the maximum for rewards and accuracies, the minimum for losses, KL, clip fraction, truncation, "
        "times and grad norm; '-' where neither direction is better."
    )
    lines.append("")
    lines.append("| metric | first | last | best | best at rollout | points |")
    lines.append("|---|---|---|---|---|---|")
    for name in sorted(series):
        points = series[name]
        best = _best(name, points)
        best_value, best_step = (format_number(best[1]), str(best[0])) if best else ("-", "-")
        lines.append(
            f"| {name} | {format_number(points[0][1])} | {format_number(points[-1][1])} | "
            f"{best_value} | {best_step} | {len(points)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="plugrl report",
        description="Plot a run's metrics.jsonl into RUN_DIR/report.png and summarise it in RUN_DIR/report.md.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a plugrl train output directory")
    args = parser.parse_args(argv)

    run_dir = Path(args.run_dir)
    if run_dir.is_file() and run_dir.name.startswith("metrics"):  # the metrics file itself: its run directory
        run_dir = run_dir.parent
    metrics_path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        print(f"plugrl report: run directory not found: {run_dir}", file=sys.stderr)
        return 2
    if not metrics_path.is_file():
        print(f"plugrl report: no metrics file at {metrics_path} (is {run_dir} a plugrl train output dir?)", file=sys.stderr)
        return 2
    try:
        rows = latest_rows(read_metrics(metrics_path))  # a line written twice (resumed run) counts once
    except ValueError as exc:
        print(f"plugrl report: {exc}", file=sys.stderr)
        return 2

    config: dict = {}
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        import yaml

        try:
            loaded = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            print(f"plugrl report: warning: cannot parse {config_path}: {exc}", file=sys.stderr)
            loaded = None
        config = loaded if isinstance(loaded, dict) else {}

    summary = config_summary(config)
    series = _series(rows)
    panels = _panels(series)
    title = f"{run_dir.resolve().name}" + (f"\n{summary}" if summary else "")
    image_path = run_dir / "report.png"
    try:
        _plot(image_path, series, panels, title)
        (run_dir / "report.md").write_text(_markdown(run_dir.resolve(), summary, series, image_path.name),
                                           encoding="utf-8")
    except OSError as exc:  # a read-only run directory, or a folder named report.png
        print(f"plugrl report: cannot write the report into {run_dir}: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {image_path} and {run_dir / 'report.md'} ({len(rows)} rows, {len(series)} metrics)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

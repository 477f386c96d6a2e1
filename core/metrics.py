"""What a user sees during ``plugrl train``: the metrics log, TensorBoard/wandb scalars, the console line.

Runs in the **driver** process only: train actors and the rollout manager return metric dicts over
Ray and the driver logs them here, so there is exactly one writer per run directory.

Files under the run's output directory:

* ``metrics.jsonl``: one JSON object per (rollout, phase) — ``{"rollout_id", "phase", "time",
  **metrics}`` — flushed line by line, so a killed run keeps everything logged so far;
  :func:`read_metrics` reads it back (and ``plugrl report`` plots it).
  The first line of a run is ``{"rollout_id": -1, "phase": "meta", "reward": ..., "advantage_estimator":
  ..., "filter": ..., "plugins": {kind: {"name", "origin"}}, "plugrl_version", "rm_opt", "filter_opt", "adv_opt",
  "buffer_opt", "placement_opt"}``:
  which plugins (and whose) produced the numbers (:meth:`MetricsLogger.log_meta`). A resumed run adds a
  meta line (at its first rollout id) only when its selection differs. Readers filter on ``phase``.
* ``config.yaml``: the resolved run configuration (:meth:`MetricsLogger.write_config`).
* ``tensorboard/``: event files when ``--use-tensorboard``.

Metric names the console line and the report know about (producers use these names):

* ``rollout/raw_reward`` mean reward before group normalisation; ``rollout/response_len`` mean
  response length in tokens; ``rollout/truncated`` fraction truncated.
* ``rollout/reward_errors`` samples of the rollout whose reward call failed (raised or timed out; they
  scored 0), ``rollout/reward_timeouts`` how many of those timed out, ``rollout/reward_samples`` samples
  sent to the reward, ``rollout/reward_stuck_threads`` timed-out sync calls still running. The console
  line shows the first two when non-zero.
* ``train/loss``, ``train/pg_loss``, ``train/pg_clipfrac`` (fraction of tokens clipped),
  ``train/kl_loss`` (KL to the reference model), ``train/entropy_loss``, ``train/ppo_kl``,
  ``train/grad_norm``, ``train/tokens`` (prompt + response tokens trained on in the rollout, all ranks).
* ``eval/{dataset}/pass@1``, ``eval/{dataset}/mean_reward`` (see :mod:`plugrl.core.eval_metrics`).
* ``perf/{what}_time`` wall seconds of a phase of one rollout. From the rollout manager:
  ``perf/generate_time`` (generation + reward), ``perf/rollout_time`` (that plus building the train
  data). From the driver loop (``core/loop.py`` says what each covers): ``perf/wait_rollout_time``,
  ``perf/train_time``, ``perf/weight_sync_time``, ``perf/eval_time`` (rollouts with an eval),
  ``perf/offload_time`` (colocated GPU runs), ``perf/save_time`` (colocated GPU runs, the trainer's
  part of a due checkpoint), ``perf/step_time`` (the whole rollout). From the train backends (rank 0,
  GPU-synchronised), the two parts of ``perf/train_time``: ``perf/train_log_probs_time`` (old-policy
  and reference forwards) and ``perf/train_update_time`` (forward, backward, optimizer). With the
  embedded ``hf`` engine, ``perf/engine_*``: its decode steps, prefill forwards and generated tokens in the rollout, and the
  decode thread's seconds in prefill, decode launches, waiting for the GPU and per-row host work.
  ``benchmarks/step_breakdown.py`` turns them into a per-phase table.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

# (metric name, console label) in display order; the console line shows those present.
CONSOLE_KEYS: tuple[tuple[str, str], ...] = (
    ("rollout/raw_reward", "reward"),
    ("rollout/response_len", "resp_len"),
    ("rollout/truncated", "trunc"),
    ("train/loss", "loss"),
    ("train/kl_loss", "kl"),
    ("train/entropy_loss", "entropy"),
    ("train/pg_clipfrac", "clipfrac"),
    ("train/grad_norm", "grad_norm"),
)

# Short console names for the common ``perf/*_time`` metrics; other ``perf/X_time`` show as ``X``.
TIME_LABELS: dict[str, str] = {
    "perf/rollout_time": "gen",
    "perf/train_time": "train",
    "perf/weight_sync_time": "sync",
    "perf/eval_time": "eval",
    "perf/offload_time": "offload",
    "perf/save_time": "save",
    "perf/step_time": "step",
}


# ---------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------


def format_number(value: float) -> str:
    """Compact human formatting: 3 significant digits, no exponent for ordinary magnitudes."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:.0f}"
    if magnitude < 1e-4:
        return f"{value:.1e}"
    return f"{value:.3g}"


def _format_seconds(value: float) -> str:
    value = float(value)
    if value >= 100:
        return f"{value:.0f}s"
    if value >= 10:
        return f"{value:.1f}s"
    return f"{value:.2g}s"


def eval_accuracies(metrics: Mapping[str, Any]) -> list[str]:
    """``{name} acc {value}`` for each ``eval/{name}/pass@1`` in ``metrics`` (console lines)."""
    return [
        f"{name[len('eval/') : -len('/pass@1')]} acc {format_number(value)}"
        for name, value in metrics.items()
        if name.startswith("eval/") and name.endswith("/pass@1") and _is_number(value)
    ]


def console_line(
    rollout_id: int,
    metrics: Mapping[str, Any],
    keys: Sequence[tuple[str, str]] | None = None,
) -> str:
    """One compact line per rollout for the terminal, printed by the driver after each step.

    Example: ``rollout 3 | reward 0.41 | math500 acc 0.38 | resp_len 9.8 | loss -0.012 | kl 0.0003 |
    clipfrac 0 | gen 1.2s train 0.8s sync 0.05s``.

    ``keys`` is a sequence of ``(metric name, label)`` pairs (default :data:`CONSOLE_KEYS`); missing
    metrics are skipped. Eval accuracy (``eval/{name}/pass@1``) follows the reward as
    ``{name} acc``, and every ``perf/*_time`` metric is appended as a duration.
    """
    keys = CONSOLE_KEYS if keys is None else keys
    parts = [f"rollout {rollout_id}"]
    accuracies = eval_accuracies(metrics)
    for index, (name, label) in enumerate(keys):
        value = metrics.get(name)
        if _is_number(value):
            parts.append(f"{label} {format_number(value)}")
        if index == 0:
            # Accuracy right after the headline reward, where the eye looks for progress.
            parts.extend(accuracies)
            accuracies = []
    parts.extend(accuracies)
    failed, timeouts = metrics.get("rollout/reward_errors"), metrics.get("rollout/reward_timeouts")
    if _is_number(failed) and failed:  # a failing grader must not look like a model that learns nothing
        parts.append(f"reward_errors {failed}" + (f" ({timeouts} timed out)" if _is_number(timeouts) and timeouts else ""))

    times = []
    ordered = [n for n in TIME_LABELS if n in metrics] + sorted(
        n for n in metrics if n.startswith("perf/") and n.endswith("_time") and n not in TIME_LABELS
    )
    for name in ordered:
        value = metrics[name]
        if _is_number(value):
            label = TIME_LABELS.get(name) or name[len("perf/") : -len("_time")]
            times.append(f"{label} {_format_seconds(value)}")
    if times:
        parts.append(" ".join(times))
    return " | ".join(parts)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _to_scalar(value: Any) -> Any:
    """Plain Python number for ints/floats, 0-d tensors and numpy scalars; anything else unchanged."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    item = getattr(value, "item", None)  # torch / numpy scalars, without importing either
    if callable(item):
        try:
            result = item()
        except (ValueError, RuntimeError):  # a tensor with more than one element
            return value
        if isinstance(result, (int, float)):
            return result
    return value


def _yaml_safe(value: Any) -> Any:
    # safe_dump only takes plain containers and scalars; paths, enums, dataclasses become strings.
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _yaml_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [_yaml_safe(v) for v in items]
    return str(value)


def write_config(output_dir: str | os.PathLike, config: Mapping[str, Any]) -> Path:
    """Write ``output_dir/config.yaml``: the resolved config, non-serialisable values stringified."""
    import yaml

    path = Path(output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(_yaml_safe(dict(config)), sort_keys=False, allow_unicode=True))
    return path


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Read a ``metrics.jsonl`` back into a list of dicts.

    A truncated last line (the run was killed mid-write) is ignored; a corrupt line elsewhere is an
    error naming the line, since that means the file was damaged rather than cut short.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON line ({exc.msg})") from exc
        if isinstance(row, dict):
            rows.append(row)
    return rows


def latest_rows(rows: list[dict]) -> list[dict]:
    """One row per (rollout_id, phase): the last one written (a rollout re-run after a resume replaces
    the lines of its first attempt), in the order of those last rows."""
    last = {(row.get("rollout_id"), row.get("phase")): i for i, row in enumerate(rows)}
    return [row for i, row in enumerate(rows) if last[(row.get("rollout_id"), row.get("phase"))] == i]


def set_aside_rows(output_dir: str | os.PathLike, from_rollout: int) -> int:
    """Resuming at ``from_rollout``: move ``metrics.jsonl`` lines of rollouts >= it (logged after the
    checkpoint, so they are about to be run again) to ``metrics.superseded.jsonl``, so the resumed run
    never duplicates a line and nothing logged is lost. Returns how many lines moved."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    _drop_partial_last_line(path)
    keep, moved = [], []
    # surrogateescape: a damaged (non-UTF-8) byte in some line is carried through unchanged, not a crash
    for line in path.read_text(encoding="utf-8", errors="surrogateescape").splitlines(keepends=True):
        try:
            rollout_id = json.loads(line).get("rollout_id")
        except (ValueError, AttributeError):
            rollout_id = None
        (moved if isinstance(rollout_id, int) and rollout_id >= from_rollout else keep).append(line)
    if moved:
        with open(Path(output_dir) / "metrics.superseded.jsonl", "a", encoding="utf-8", errors="surrogateescape") as f:
            f.writelines(moved)
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(keep), encoding="utf-8", errors="surrogateescape")
        os.replace(tmp, path)  # atomic: a kill now leaves either file whole
    return len(moved)


def start_fresh_metrics(output_dir: str | os.PathLike) -> Path | None:
    """A new (not resumed) run in a directory that has a ``metrics.jsonl``: rename it to
    ``metrics.<time>.jsonl`` so the new run's history is not appended to the old one, and the old run's
    ``config.yaml`` to ``config.<time>.yaml`` beside it (the new run writes its own)."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file() or path.stat().st_size == 0:
        return None
    stamp = time.strftime('%Y%m%d-%H%M%S', time.localtime(path.stat().st_mtime))
    suffix = ""
    while (path.with_name(f"metrics.{stamp}{suffix}.jsonl").exists()
           or path.with_name(f"config.{stamp}{suffix}.yaml").exists()):
        suffix += "-1"
    kept = path.with_name(f"metrics.{stamp}{suffix}.jsonl")
    os.replace(path, kept)
    config = path.with_name("config.yaml")
    if config.is_file():
        os.replace(config, path.with_name(f"config.{stamp}{suffix}.yaml"))
    return kept


# ---------------------------------------------------------------------------------------------------
# The logger
# ---------------------------------------------------------------------------------------------------


def _drop_partial_last_line(path: Path) -> None:
    """A run killed mid-write leaves a cut-off last line; move it out so a resumed run appends whole lines.
    The cut bytes are appended to ``<name>.cut`` beside the file (kept, not read as metrics)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        end = data.rfind(b"\n") + 1
        with open(path.with_name(path.name + ".cut"), "ab") as cut:
            cut.write(data[end:] + b"\n")
        f.truncate(end)
    warnings.warn(f"{path}: its last line was cut off (the run was killed while writing it); moved it to "
                  f"{path.name}.cut", stacklevel=2)


class MetricsLogger:
    """The driver's sink for every metric of a run: JSONL always, TensorBoard and wandb on request.

    ``log(step, metrics, phase=...)`` is called by the driver loop once per phase of a rollout
    (``"rollout"``, ``"train"``, ``"eval"``, ...); ``step`` is the rollout id. wandb is imported
    lazily; ``wandb_mode="offline"`` (or ``WANDB_MODE=offline`` in the environment) works without a
    network. Every value is logged against the ``rollout_id`` axis in wandb, so phases logged out of
    order (the async loop finishes generation of k+1 before training on k) are not dropped.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        use_tensorboard: bool = False,
        use_wandb: bool = False,
        wandb_project: str | None = None,
        wandb_group: str | None = None,
        wandb_mode: str | None = None,
        wandb_key: str | None = None,
        run_name: str | None = None,
        config: dict | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.reward_totals = {"samples": 0, "failed": 0}  # over the train lines of this run (exit status)
        self._tb = None
        self._wandb_run = None
        if use_wandb:
            # Fail before anything is written, with the fix in the message.
            try:
                import wandb
            except ImportError as exc:
                raise RuntimeError(
                    "--use-wandb was given but wandb is not installed: pip install wandb "
                    "(or drop --use-wandb; metrics.jsonl and --use-tensorboard need nothing extra)"
                ) from exc
        if config is not None:
            self.write_config(config)
        # Append: a resumed run continues the same file. Held open for the run, closed by close().
        _drop_partial_last_line(self.metrics_path)
        self._file = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115
        if use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))
        if use_wandb:
            kwargs: dict[str, Any] = {
                "project": wandb_project or "plugrl",
                "group": wandb_group,
                "name": run_name,
                "dir": str(self.output_dir),
                "config": _yaml_safe(config) if config is not None else None,
            }
            if wandb_mode:
                kwargs["mode"] = wandb_mode
            if wandb_key and (wandb_mode or os.environ.get("WANDB_MODE", "online")) == "online":
                wandb.login(key=wandb_key, relogin=True)  # --wandb-key; offline/disabled runs need no login
            self._wandb_run = wandb.init(**kwargs)
            self._wandb_run.define_metric("rollout_id")
            self._wandb_run.define_metric("*", step_metric="rollout_id")

    def write_config(self, config: Mapping[str, Any]) -> Path:
        """Write ``output_dir/config.yaml`` (see :func:`write_config`)."""
        return write_config(self.output_dir, config)

    def log(self, step: int, metrics: Mapping[str, Any], *, phase: str) -> dict:
        """Record one phase's metrics for rollout ``step``; returns the JSON row written."""
        if self._file is None:
            raise RuntimeError("MetricsLogger.log called after close()")
        values = {str(k): _to_scalar(v) for k, v in metrics.items()}
        row = {"rollout_id": int(step), "phase": phase, "time": time.time(), **values}
        for key, total in (("rollout/reward_samples", "samples"), ("rollout/reward_errors", "failed")):
            if _is_number(values.get(key)):
                self.reward_totals[total] += values[key]
        self._file.write(json.dumps(row, default=str) + "\n")
        self._file.flush()
        numeric = {k: float(v) for k, v in values.items() if _is_number(v)}
        if self._tb is not None:
            for name, value in numeric.items():
                self._tb.add_scalar(name, value, global_step=int(step))
            self._tb.flush()
        if self._wandb_run is not None and numeric:
            self._wandb_run.log({"rollout_id": int(step), **numeric})
        return row

    def log_meta(self, meta: Mapping[str, Any], *, rollout_id: int = -1) -> dict | None:
        """Write the ``phase: "meta"`` line naming the run's plugins, unless the file's last meta line
        (a resumed run's first attempt) already says the same; returns the row written."""
        previous = [row for row in read_metrics(self.metrics_path) if row.get("phase") == "meta"] \
            if self.metrics_path.stat().st_size else []
        fields = json.loads(json.dumps(dict(meta), default=str))
        if previous and {k: previous[-1].get(k) for k in fields} == fields:
            return None
        return self.log(rollout_id, fields, phase="meta")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

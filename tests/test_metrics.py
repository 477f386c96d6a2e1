"""Run metrics (plugrl.core.metrics) and eval summaries (plugrl.core.eval_metrics), on CPU."""

from __future__ import annotations

import itertools
import json
import math
import sys

import pytest
import yaml
from plugrl.core.eval_metrics import (
    eval_metrics,
    group_per_prompt,
    pass_at_k,
    summarize_eval,
)
from plugrl.core.metrics import (
    MetricsLogger,
    console_line,
    format_number,
    read_metrics,
    write_config,
)

# ---- metrics.jsonl -------------------------------------------------------------------------------------


def test_log_writes_one_flushed_json_line_per_call(tmp_path):
    logger = MetricsLogger(tmp_path / "run")
    logger.log(0, {"rollout/raw_reward": 0.25, "rollout/response_len": 12}, phase="rollout")
    # Flushed before close: a killed run keeps this line.
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert row["rollout_id"] == 0 and row["phase"] == "rollout"
    assert row["rollout/raw_reward"] == 0.25 and row["rollout/response_len"] == 12
    assert isinstance(row["time"], float)
    logger.log(0, {"train/loss": -0.5}, phase="train")
    logger.close()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [(r["rollout_id"], r["phase"]) for r in rows] == [(0, "rollout"), (0, "train")]
    with pytest.raises(RuntimeError, match="after close"):
        logger.log(1, {}, phase="train")


def test_log_converts_tensor_scalars(tmp_path):
    torch = pytest.importorskip("torch")
    with MetricsLogger(tmp_path) as logger:
        row = logger.log(3, {"train/loss": torch.tensor(1.5), "note": "text"}, phase="train")
    assert row["train/loss"] == 1.5 and row["note"] == "text"
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["train/loss"] == 1.5


def test_logger_appends_on_resume(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(0, {"a": 1.0}, phase="train")
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"a": 2.0}, phase="train")
    assert [r["a"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1.0, 2.0]


def test_meta_line_names_the_plugins_once_per_selection(tmp_path):
    meta = {"reward": "deepscaler", "advantage_estimator": "grpo", "filter": None,
            "plugins": {"reward": {"name": "deepscaler", "origin": "plugrl built-in (x)"}}, "rm_opt": {}}
    with MetricsLogger(tmp_path) as logger:
        row = logger.log_meta(meta)
        logger.log(0, {"a": 1.0}, phase="train")
    assert row["phase"] == "meta" and row["rollout_id"] == -1 and row["plugins"] == meta["plugins"]
    with MetricsLogger(tmp_path) as logger:  # a resume with the same selection adds nothing
        assert logger.log_meta(meta, rollout_id=1) is None
        logger.log(1, {"a": 2.0}, phase="train")
    with MetricsLogger(tmp_path) as logger:  # a resume that changed the estimator says so where it starts
        assert logger.log_meta({**meta, "advantage_estimator": "rloo"}, rollout_id=2)["rollout_id"] == 2
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["rollout_id"], r["phase"]) for r in rows] == [(-1, "meta"), (0, "train"), (1, "train"), (2, "meta")]
    assert [r["advantage_estimator"] for r in rows if r["phase"] == "meta"] == ["grpo", "rloo"]


def test_report_ignores_the_meta_line(tmp_path):
    from plugrl.core.report import main as report_main

    with MetricsLogger(tmp_path) as logger:
        logger.log_meta({"reward": "deepscaler", "plugins": {"reward": {"name": "deepscaler"}}})
        for step in range(3):
            logger.log(step, {"rollout/raw_reward": 0.1 * step}, phase="train")
    assert report_main([str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "raw_reward" in text and "plugins" not in text and "deepscaler" not in text


def test_read_metrics_tolerates_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"rollout_id": 0, "a": 1}\n{"rollout_id": 1, "a": 2}\n{"rollout_id": 2, "a"')
    assert [r["rollout_id"] for r in read_metrics(path)] == [0, 1]
    path.write_text('{"rollout_id": 0, "a": 1}\n\n')
    assert len(read_metrics(path)) == 1


def test_read_metrics_rejects_corrupt_middle_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"rollout_id": 0}\n{broken\n{"rollout_id": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(path)


# ---- config.yaml ---------------------------------------------------------------------------------------


def test_write_config_stringifies_unserialisable_values(tmp_path):
    class Opaque:
        def __str__(self):
            return "opaque-object"

    config = {
        "hf_checkpoint": tmp_path / "model",
        "lr": 1e-6,
        "eps_clip_high": 0.28,
        "sizes": (1, 2),
        "plugin": {"name": "deepscaler", "obj": Opaque()},
        "tags": {"b", "a"},
    }
    with MetricsLogger(tmp_path / "run", config=config) as logger:
        assert (tmp_path / "run" / "config.yaml").is_file()
        logger.write_config({"lr": 2e-6})
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()) == {"lr": 2e-6}

    path = write_config(tmp_path / "other", config)
    loaded = yaml.safe_load(path.read_text())
    assert loaded == {
        "hf_checkpoint": str(tmp_path / "model"),
        "lr": 1e-6,
        "eps_clip_high": 0.28,
        "sizes": [1, 2],
        "plugin": {"name": "deepscaler", "obj": "opaque-object"},
        "tags": ["a", "b"],
    }


# ---- tensorboard / wandb -------------------------------------------------------------------------------


def test_tensorboard_event_file_created(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsLogger(tmp_path, use_tensorboard=True) as logger:
        logger.log(0, {"rollout/raw_reward": 0.5, "text": "ignored"}, phase="rollout")
        logger.log(1, {"rollout/raw_reward": 0.75}, phase="rollout")
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    scalars = accumulator.Scalars("rollout/raw_reward")
    assert [(s.step, s.value) for s in scalars] == [(0, 0.5), (1, 0.75)]


def test_use_wandb_without_wandb_installed_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(RuntimeError, match="pip install wandb"):
        MetricsLogger(tmp_path, use_wandb=True)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    with MetricsLogger(
        tmp_path, use_wandb=True, wandb_mode="offline", wandb_project="plugrl-test", run_name="t", config={"lr": 1e-6}
    ) as logger:
        logger.log(0, {"rollout/raw_reward": 0.5}, phase="rollout")
        logger.log(0, {"train/loss": 0.1}, phase="train")
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 2


# ---- console line --------------------------------------------------------------------------------------


def test_console_line_content():
    metrics = {
        "rollout/raw_reward": 0.4123,
        "eval/aime/pass@1": 0.375,
        "rollout/response_len": 9.84,
        "train/loss": -0.01234,
        "train/kl_loss": 0.0003,
        "train/pg_clipfrac": 0.0,
        "perf/train_time": 0.81,
        "perf/rollout_time": 1.234,
        "perf/weight_sync_time": 0.05,
        "perf/step_time": 2.2,
        "perf/custom_time": 12.34,
        "unrelated/metric": 5.0,
    }
    line = console_line(3, metrics)
    assert line == (
        "rollout 3 | reward 0.412 | aime acc 0.375 | resp_len 9.84 | loss -0.0123 | kl 0.0003 | clipfrac 0 | "
        "gen 1.2s train 0.81s sync 0.05s step 2.2s custom 12.3s"
    )
    assert console_line(0, {}) == "rollout 0"
    assert console_line(1, {"train/loss": 2.0}, keys=[("train/loss", "L")]) == "rollout 1 | L 2"


def test_format_number_is_compact():
    assert [format_number(v) for v in (0, 0.0, 3, 0.41, 9.8, -0.012, 0.0003, 1234.5, 2e-7, float("nan"))] == [
        "0", "0", "3", "0.41", "9.8", "-0.012", "0.0003", "1234", "2.0e-07", "nan",
    ]


# ---- eval metrics --------------------------------------------------------------------------------------


def _pass_at_k_by_enumeration(n, c, k):
    correct = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_subset_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_by_enumeration(n, c, k), abs=1e-12)
    assert pass_at_k(4, 1, 1) == 0.25
    assert pass_at_k(1000, 1, 1000) == 1.0  # exact binomials: no overflow


def test_pass_at_k_validates():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_summarize_eval_hand_example():
    # Prompt A: 4 samples, 1 correct; prompt B: 4 samples, 3 correct (dapo-style -1 counts wrong).
    rewards = [[1, 0, 0, 0], [1, 1, -1, 1]]
    truncated = [[False, True, False, False], [False, False, False, True]]
    lengths = [[10, 20, 30, 40], [5, 5, 5, 5]]
    summary = summarize_eval(rewards, truncated, lengths)
    assert summary["mean_reward"] == pytest.approx(3 / 8)
    assert summary["pass@1"] == pytest.approx((1 / 4 + 3 / 4) / 2)
    # pass@2: A = 1 - C(3,2)/C(4,2) = 1/2; B = 1 - C(1,2)/C(4,2) = 1.
    assert summary["pass@2"] == pytest.approx((0.5 + 1.0) / 2)
    # pass@4: A = 1, B = 1.
    assert summary["pass@4"] == pytest.approx(1.0)
    assert "pass@8" not in summary
    assert summary["response_len"] == pytest.approx(120 / 8)
    assert summary["truncated_ratio"] == pytest.approx(2 / 8)
    assert summary["num_prompts"] == 2 and summary["num_samples"] == 8


def test_summarize_eval_k_limited_by_smallest_prompt_and_threshold():
    summary = summarize_eval([[1, 0, 1], [0.4, 0.6]], [[False] * 3, [False] * 2], [[1] * 3, [1] * 2], correct_above=0.5)
    assert {k for k in summary if k.startswith("pass@")} == {"pass@1", "pass@2"}
    assert summary["pass@1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    single = summarize_eval([[1.0], [0.0]], [[False], [True]], [[3], [5]])
    assert single["pass@1"] == 0.5 and "pass@2" not in single


def test_summarize_eval_errors():
    with pytest.raises(ValueError, match="no eval prompts"):
        summarize_eval([], [], [])
    with pytest.raises(ValueError, match="differ in length"):
        summarize_eval([[1]], [], [[1]])
    with pytest.raises(ValueError, match="prompt 0"):
        summarize_eval([[1, 0]], [[False]], [[1, 2]])


def test_eval_metrics_keys_and_grouping():
    rewards = group_per_prompt([1, 0, 0, 0, 1, 1], 2)
    assert rewards == [[1, 0], [0, 0], [1, 1]]
    metrics = eval_metrics("aime", rewards, [[False, False]] * 3, [[4, 6]] * 3)
    assert metrics["eval/aime/pass@1"] == pytest.approx(0.5)
    assert metrics["eval/aime/pass@2"] == pytest.approx(2 / 3)
    assert metrics["eval/aime/response_len"] == 5
    assert all(key.startswith("eval/aime/") for key in metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    with pytest.raises(ValueError, match="--n-samples-per-eval-prompt 4"):
        group_per_prompt([1, 2, 3], 4)


def test_resumed_logger_drops_a_cut_off_last_line(tmp_path):
    from plugrl.core.metrics import MetricsLogger, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"rollout_id": 0, "phase": "train", "x": 1}\n{"rollout_id": 1, "pha')
    with pytest.warns(UserWarning, match="moved it to metrics.jsonl.cut"):
        logger = MetricsLogger(tmp_path)
    logger.log(1, {"x": 2}, phase="train")
    logger.close()
    rows = read_metrics(path)
    assert [(r["rollout_id"], r["x"]) for r in rows] == [(0, 1), (1, 2)]


def test_wandb_key_logs_in_and_is_written_nowhere(tmp_path, monkeypatch):
    """--wandb-key reaches wandb.login (online runs only) and never the run's files or wandb config.
    wandb's servers cannot be reached here: a stand-in module records the calls."""
    import types

    from plugrl.core.config import build_parser, config_to_dict

    calls = []

    class Run:
        def define_metric(self, *a, **k):
            pass

        def finish(self):
            pass

    fake = types.SimpleNamespace(login=lambda **kw: calls.append(("login", kw)),
                                 init=lambda **kw: calls.append(("init", kw)) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    args = build_parser().parse_args(["--use-wandb", "--wandb-key", "secret-123", "--output-dir", str(tmp_path)])
    config = config_to_dict(args)
    assert "wandb_key" not in config and "secret-123" not in str(config)
    logger = MetricsLogger(tmp_path, use_wandb=True, wandb_key=args.wandb_key, config=config)
    logger.close()
    assert calls[0] == ("login", {"key": "secret-123", "relogin": True})
    assert "secret-123" not in str(calls[1][1]) and "secret-123" not in (tmp_path / "config.yaml").read_text()
    calls.clear()
    MetricsLogger(tmp_path / "offline", use_wandb=True, wandb_mode="offline", wandb_key="secret-123").close()
    assert [c[0] for c in calls] == ["init"]  # offline: no login

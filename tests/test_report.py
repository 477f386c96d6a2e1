"""`plugrl report RUN_DIR` (plugrl.core.report): report.png and report.md from a run directory."""

from __future__ import annotations

import json

import pytest
import yaml

from plugrl.core.report import config_summary, main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_run(run_dir, *, truncated_tail=False):
    run_dir.mkdir()
    rows = []
    for step in range(4):
        rows.append(
            {"rollout_id": step, "phase": "rollout", "time": 1000.0 + step,
             "rollout/raw_reward": 0.1 * (step + 1), "rollout/response_len": 100 - 10 * step}
        )
        rows.append(
            {"rollout_id": step, "phase": "train", "time": 1000.5 + step, "train/loss": 0.5 - 0.1 * step,
             "train/kl_loss": 0.001 * step, "train/entropy_loss": 1.0 - 0.05 * step, "train/pg_clipfrac": 0.0,
             "perf/train_time": 1.5}
        )
        if step % 2 == 0:
            rows.append({"rollout_id": step, "phase": "eval", "time": 1001.0 + step,
                         "eval/aime/pass@1": 0.2 + 0.1 * step, "eval/aime/mean_reward": 0.3})
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if truncated_tail:
        text += '{"rollout_id": 4, "phase": "rol'
    (run_dir / "metrics.jsonl").write_text(text)
    config = {
        "hf-checkpoint": "/models/Qwen3-4B",
        "advantage-estimator": "grpo",
        "rm-type": "deepscaler",
        "lr": 1e-6,
        "rollout-batch-size": 32,
        "n-samples-per-prompt": 8,
        "global-batch-size": 256,
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))


def test_report_writes_png_and_markdown(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _write_run(run_dir, truncated_tail=True)
    assert main([str(run_dir)]) == 0

    png = run_dir / "report.png"
    assert png.is_file() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == PNG_SIGNATURE

    md = (run_dir / "report.md").read_text()
    assert "![metrics](report.png)" in md
    assert "model Qwen3-4B | estimator grpo | reward deepscaler | lr 1e-06 | batch 32x8 (G=256)" in md
    assert "| metric | first | last | best | best at rollout | points |" in md
    # first / last / best / best-at / points
    assert "| rollout/raw_reward | 0.1 | 0.4 | 0.4 | 3 | 4 |" in md
    assert "| train/loss | 0.5 | 0.2 | 0.2 | 3 | 4 |" in md  # lower is better for losses
    assert "| eval/aime/pass@1 | 0.2 | 0.4 | 0.4 | 2 | 2 |" in md
    assert "| rollout/response_len | 100 | 70 | - | - | 4 |" in md  # no better direction
    assert "| train/entropy_loss | 1 | 0.85 | - | - | 4 |" in md
    assert "| train/kl_loss | 0 | 0.003 | 0 | 0 | 4 |" in md
    assert "wrote" in capsys.readouterr().out


def test_report_without_config_and_with_few_metrics(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"rollout_id": 0, "phase": "train", "train/loss": 1.0}) + "\n")
    assert main([str(run_dir)]) == 0
    assert (run_dir / "report.png").read_bytes()[:8] == PNG_SIGNATURE
    md = (run_dir / "report.md").read_text()
    assert "(no config.yaml)" in md and "| train/loss | 1 | 1 | 1 | 0 | 1 |" in md


def test_report_missing_dir_or_metrics_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main([str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert str(empty / "metrics.jsonl") in capsys.readouterr().err


def test_report_via_cli(tmp_path):
    from plugrl.core.cli import main as cli_main

    run_dir = tmp_path / "run"
    _write_run(run_dir)
    assert cli_main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.md").is_file()


def test_config_summary_nested_and_partial():
    assert config_summary({}) == ""
    assert config_summary({"train": {"advantage_estimator": "gspo"}, "rollout_batch_size": 4}) == (
        "estimator gspo | batch 4"
    )


def test_report_requires_run_dir_argument():
    with pytest.raises(SystemExit) as excinfo:
        main([])
    assert excinfo.value.code == 2


def test_failure_counts_are_best_when_lowest_and_the_metrics_file_names_its_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [{"rollout_id": i, "phase": "rollout", "rollout/reward_errors": errors, "rollout/reward_timeouts": errors,
             "rollout/reward_samples": 16} for i, errors in enumerate([0, 17, 3])]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([str(run_dir / "metrics.jsonl")]) == 0  # the file: its run directory is reported
    md = (run_dir / "report.md").read_text()
    assert "| rollout/reward_errors | 0 | 3 | 0 | 0 | 3 |" in md  # not the worst rollout as the best
    assert "| rollout/reward_timeouts | 0 | 3 | 0 | 0 | 3 |" in md
    assert "| rollout/reward_samples | 16 | 16 | - | - | 3 |" in md
    (run_dir / "report.md").unlink()
    (run_dir / "report.md").mkdir()  # cannot be written
    assert main([str(run_dir)]) == 2
    assert f"plugrl report: cannot write the report into {run_dir}" in capsys.readouterr().err

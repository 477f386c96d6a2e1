"""benchmarks/recipe_report.py: the issue-8 table from a run directory, checked against numbers
worked out by hand from synthetic metrics."""

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import recipe_report


def _run_dir(tmp_path, *, colocate=True, gpus=8, tp=2, checkpoint="unused"):
    run = tmp_path / "colocated-tp2"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({
        "actor_num_nodes": 1, "actor_num_gpus_per_node": gpus, "tensor_model_parallel_size": tp,
        "colocate": colocate, "hf_checkpoint": checkpoint}))
    rows = [{"phase": "eval", "rollout_id": -1, "eval/x": 1.0}]
    # rollout 0 is warm-up (dropped); then three rollouts with known times
    for rid, (step, roll, train, sync, off, save, tokens) in enumerate([
            (99.0, 50.0, 30.0, 9.0, 9.0, 0.0, 1_000_000),
            (20.0, 10.0, 5.0, 2.0, 1.0, 0.0, 400_000),
            (24.0, 10.0, 5.0, 2.0, 1.0, 4.0, 400_000),
            (22.0, 11.0, 4.0, 3.0, 1.0, 0.0, 320_000)]):
        rows.append({"phase": "train", "rollout_id": rid, "perf/step_time": step, "perf/rollout_time": roll,
                     "perf/train_time": train, "perf/weight_sync_time": sync, "perf/offload_time": off,
                     "perf/save_time": save, "train/tokens": tokens, "perf/train_log_probs_time": train / 5,
                     "perf/train_update_time": train * 4 / 5})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (run / "smi.csv").write_text("0, 1024 MiB\n1, 2048 MiB\n0, 40960 MiB\nnot a line\n1, 512 MiB\n")
    return run


def test_summary_medians_throughput_and_memory(tmp_path):
    result = recipe_report.summarize(_run_dir(tmp_path), n_params=4_000_000_000, peak_flops=1e15)
    assert result["steps"] == 3 and result["train_gpus"] == 8 and result["tp"] == 2
    assert result["placement"] == "colocated"
    assert result["step"] == 22.0 and result["rollout"] == 10.0 and result["train"] == 5.0
    assert result["weight_sync"] == 2.0 and result["offload"] == 1.0 and result["save"] == 0.0
    assert result["other"] == pytest.approx(2.0)  # per row: 20-18=2, 24-22=2, 22-19=3 -> median 2
    # tokens / train seconds / 8 GPUs: 10,000, 10,000, 10,000 per GPU-second
    assert result["train_tokens_per_gpu_s"] == pytest.approx(10_000)
    assert result["mfu"] == pytest.approx(6 * 4e9 * 10_000 / 1e15)
    assert result["peak_gib"] == {0: 40.0, 1: 2.0}
    # the updates took 4/5 of each train phase: 12,500 tokens per GPU-second
    assert result["update_mfu"] == pytest.approx(6 * 4e9 * 12_500 / 1e15)
    assert result["log_probs"] == pytest.approx(1.0) and result["update"] == pytest.approx(4.0)
    table = recipe_report.format_table([result])
    assert "| colocated-tp2 | colocated | 8 | 2 | 3 | 22.00 |" in table and "40.0 2.0" in table
    assert "| 1.00 / 4.00 | 30.0% |" in table


def test_runs_without_the_train_split_still_report(tmp_path):
    run = _run_dir(tmp_path)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("perf/train_update_time", None)
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = recipe_report.summarize(run, n_params=4_000_000_000, peak_flops=1e15)
    assert result["update_mfu"] is None
    assert "| - | - |" in recipe_report.format_table([result])


def test_parameters_are_counted_without_loading_weights(tmp_path):
    from plugrl.plugins.backends.tiny_default import build_tiny_checkpoint
    from transformers import AutoModelForCausalLM

    checkpoint = build_tiny_checkpoint(tmp_path / "tiny")
    loaded = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(checkpoint).parameters())
    assert recipe_report.model_parameters(str(checkpoint)) == loaded


def test_a_run_with_too_few_rollouts_is_named(tmp_path):
    run = _run_dir(tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(ValueError, match="colocated-tp2: 1 finished rollouts"):
        recipe_report.summarize(run, n_params=1)
    assert recipe_report.main([str(run)]) == 1

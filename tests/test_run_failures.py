"""Failures during a run (core/run_errors.py, core/train_cli.py): an exception an actor method raised is
one ``plugrl train: error:`` line naming the actor, the method and the original exception, then the stop
hint; the full traceback is kept in ``{--output-dir}/error.log`` and the metrics written so far stay."""

import json

import pytest

from plugrl.core import loop, run_errors
from plugrl.core.train_cli import main as train_main
from plugrl.plugins.backends.tiny_default import build_tiny_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny")


def short_run(model, out) -> list[str]:
    """A two-rollout run of the tiny model on the toy data (its run is stood in for by each test)."""
    return ["--hf-checkpoint", str(model), "--prompt-data", "plugins/backends/torch/data/toy_math_train.jsonl",
            "--input-key", "prompt", "--label-key", "label", "--rm-type", "deepscaler", "--rollout-batch-size", "4",
            "--n-samples-per-prompt", "2", "--num-rollout", "2", "--output-dir", str(out)]


def ray_task_error(actor_method: str, cause: BaseException):
    """What ``ray.get`` raises when an actor method raised ``cause`` (built as Ray builds it)."""
    from ray.exceptions import RayTaskError

    try:
        raise cause
    except BaseException as exc:  # noqa: BLE001 - the traceback Ray formats
        import traceback

        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return RayTaskError(actor_method, text, cause, proctitle=f"ray::{actor_method}()", pid=1, ip="127.0.0.1",
                        actor_repr=None, actor_id="a" * 32).as_instanceof_cause()


def test_the_line_names_actor_method_and_the_original_exception():
    exc = ray_task_error("RolloutManager.generate",
                         ValueError("prompt of 1202 tokens does not fit the context length 256"))
    assert isinstance(exc, ValueError)
    assert run_errors.task_error_line(exc) == ("the rollout manager's generate raised ValueError: prompt of 1202 "
                                               "tokens does not fit the context length 256")
    other = ray_task_error("TrainWorker.train", RuntimeError("CUDA error: misaligned address\nmore detail"))
    assert run_errors.task_error_line(other) == "a train worker's train raised RuntimeError: CUDA error: misaligned address"


def test_a_task_error_mid_run_is_one_line_with_the_stop_hint_and_keeps_metrics(model, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"

    def run_training(args, plugin_set, *, logger_, **_):
        logger_.log(0, {"rollout/raw_reward": 0.5}, phase="train")  # rollout 0 finished before the failure
        logger_.close()
        raise ray_task_error("RolloutManager.generate", ValueError("prompt of 1202 tokens does not fit"))

    monkeypatch.setattr(loop, "run_training", run_training)
    code = train_main(short_run(model, out))
    err = capsys.readouterr().err
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("plugrl train: error:")]
    assert errors == [f"plugrl train: error: the rollout manager's generate raised ValueError: prompt of 1202 tokens "
                      f"does not fit (full traceback in {out}/error.log)"]
    assert (f"plugrl train: Metrics so far are in {out}/metrics.jsonl; no checkpoints: pass --save DIR "
            "--save-interval N to be able to resume.") in err
    assert "Traceback" not in err
    log = (out / "error.log").read_text()
    assert "ray::RolloutManager.generate()" in log and "ValueError: prompt of 1202 tokens does not fit" in log
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout_id"] for r in rows if r["phase"] == "train"] == [0]


def test_a_full_disk_on_the_driver_is_one_line(model, tmp_path, capsys, monkeypatch):
    """The metrics file's flush fails (ENOSPC) and so does its close in the cleanup (ordered as core/loop.py's:
    the shutdown in a ``finally`` after the close): one line naming the file and the cause, then the stop
    hint; the stand-in cluster records that it was stopped."""
    out, stopped = tmp_path / "out", []

    class Cluster:
        def __init__(self, *args, **kwargs):
            pass

        def shutdown(self, interrupted=False):
            stopped.append(interrupted)

    class FullLogger:
        def close(self):
            raise OSError(28, "No space left on device", str(out / "metrics.jsonl"))

    def run_training(args, plugin_set, *, logger_, **_):
        cluster = Cluster()
        try:
            raise OSError(28, "No space left on device", str(out / "metrics.jsonl"))
        finally:  # the loop's own cleanup, as core/loop.py orders it
            try:
                FullLogger().close()
            finally:
                cluster.shutdown()

    monkeypatch.setattr(loop, "run_training", run_training)
    code = train_main(short_run(model, out))
    err = capsys.readouterr().err
    assert code == 1 and stopped == [False] and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("plugrl train: error:")]
    assert errors == [f"plugrl train: error: a file operation on the driver failed ({out}/metrics.jsonl): No space left "
                      f"on device (full traceback in {out}/error.log)"]


def test_driver_errors_say_what_failed():
    """Ray's GetTimeoutError is a TimeoutError, hence an OSError: it is a timed-out wait, not a file error."""
    from ray.exceptions import GetTimeoutError

    from plugrl.core.train_cli import driver_error_line

    assert driver_error_line(OSError(28, "No space left on device", "/runs/a/metrics.jsonl")) == (
        "a file operation on the driver failed (/runs/a/metrics.jsonl): No space left on device")
    assert driver_error_line(GetTimeoutError("Get timed out: some object(s) not ready.")) == (
        "waiting on the actors timed out (GetTimeoutError: Get timed out: some object(s) not ready.)")
    assert driver_error_line(ConnectionResetError(104, "Connection reset by peer")) == (
        "ConnectionResetError on the driver: [Errno 104] Connection reset by peer")


def test_a_wrong_reward_key_names_the_flag_and_the_keys_the_reward_returned():
    from plugrl.core.plugin_call import PluginCallError, calling
    from plugrl.core.train_data import shaped_rewards
    from plugrl.core.types import Sample

    sample = Sample(prompt="1+1", reward={"acc": 1.0, "pred": 2.0})
    message = ("--reward-key score: the reward returned a dict without that key (its keys: 'acc', 'pred'); "
               "pass --reward-key with one of them")
    with pytest.raises(ValueError) as raised:
        sample.get_reward_value(reward_key="score")
    assert str(raised.value) == message
    assert sample.get_reward_value(reward_key="acc") == 1.0
    # in the rollout manager it surfaces as the one line of the rewards-and-advantages step
    with pytest.raises(PluginCallError, match=r"raised ValueError: --reward-key score: the reward returned a dict "
                                              r"without that key \(its keys: 'acc', 'pred'\)"):
        with calling("the rollout's rewards and advantages (--advantage-estimator grpo)"):
            shaped_rewards([[sample, sample]], None, "score")


@pytest.mark.slow
def test_a_real_actor_exception_is_one_line_not_a_traceback(model, tmp_path):
    """Real Ray: a --custom-generate-function-path that raises inside the rollout manager's generate."""
    import os
    import subprocess
    import sys

    (tmp_path / "broken_generate.py").write_text(
        "async def generate(args, sample, sampling_params):\n"
        "    raise LookupError('no engine named foo')\n")
    out = tmp_path / "out"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(
        [sys.executable, "-m", "plugrl.core.cli", "train", "--hf-checkpoint", str(model), "--prompt-data",
         "plugins/backends/torch/data/toy_math_train.jsonl@[0:8]", "--input-key", "prompt", "--label-key", "label",
         "--rm-type", "deepscaler", "--rollout-batch-size", "4", "--n-samples-per-prompt", "2", "--num-rollout", "2",
         "--rollout-max-response-len", "8", "--custom-generate-function-path", "broken_generate.generate",
         "--output-dir", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("plugrl train: error:")]
    assert errors == [f"plugrl train: error: the rollout manager's generate raised LookupError: no engine named foo "
                      f"(full traceback in {out}/error.log)"], result.stderr[-3000:]
    after = result.stderr.split("plugrl train: error:")[-1]
    assert "Traceback (most recent call last)" not in after
    assert f"plugrl train: Metrics so far are in {out}/metrics.jsonl" in after
    assert "broken_generate.py" in (out / "error.log").read_text()

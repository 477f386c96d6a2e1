"""The train group: slime's bundle order, the rendezvous env, data parallelism equal to one rank,
and ``plugrl train`` with two train ranks (checkpoint, resume, a rank that dies).

The Ray tests run a real local Ray on CPU: two train actors form a gloo world of two.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from plugrl.core.train_group import rendezvous_env
from plugrl.plugins.backends.placement import sort_bundles
from plugrl.plugins.backends.tiny_default import SFT_FILE, build_tiny_checkpoint

from .test_resume import session_pids

PLUGRL = [sys.executable, "-m", "plugrl.core.cli"]


# ---- bundle order (pure) --------------------------------------------------------------------------


def no_dns(host: str) -> str:
    raise socket.gaierror(f"no DNS in this test: {host}")


def test_one_node_sorts_by_gpu_id():
    infos = [("10.0.0.1", 3), ("10.0.0.1", 0), ("10.0.0.1", 2), ("10.0.0.1", 1)]
    # logical bundle i -> the bundle that reported GPU i
    assert sort_bundles(infos, resolve=no_dns) == [1, 3, 2, 0]


def test_nodes_sort_by_ip_octets_as_numbers_then_gpu():
    # slime's sort_key parses the octets as ints: 10.0.0.9 comes before 10.0.0.10 (as strings it
    # would not), and 9.x before 10.x.
    infos = [("10.0.0.10", 1), ("10.0.0.9", 1), ("10.0.0.10", 0), ("9.1.1.1", 0), ("10.0.0.9", 0)]
    assert sort_bundles(infos, resolve=no_dns) == [3, 4, 1, 2, 0]


def test_gpu_ids_given_as_strings_sort_as_numbers():
    infos = [("10.0.0.1", "10"), ("10.0.0.1", "9"), ("10.0.0.1", "0")]
    assert sort_bundles(infos, resolve=no_dns) == [2, 1, 0]


def test_hostnames_are_resolved_then_fall_back_to_code_points():
    table = {"node-b": "10.0.0.1", "node-a": "10.0.0.2"}

    def resolve(host):
        if host not in table:
            raise socket.gaierror(host)
        return table[host]

    # node-b resolves to the lower IP, so it comes first although "node-a" < "node-b" as text.
    assert sort_bundles([("node-a", 0), ("node-b", 1), ("node-b", 0)], resolve=resolve) == [2, 1, 0]
    # Unresolvable names compare by their characters' code points: "x" (120) < "y" (121); an IPv4
    # node ([10, ...]) comes before both.
    infos = [("y", 0), ("x", 1), ("10.0.0.1", 5), ("x", 0)]
    assert sort_bundles(infos, resolve=resolve) == [2, 3, 1, 0]


def test_equal_keys_keep_bundle_order():
    assert sort_bundles([("10.0.0.1", 0), ("10.0.0.1", 0)], resolve=no_dns) == [0, 1]


def test_rendezvous_env_names_rank_zero_and_counts_ranks_per_node():
    envs = rendezvous_env(["10.0.0.2", "10.0.0.2", "10.0.0.3"], master_port=29500)
    assert envs[0] == {"MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "29500", "RANK": "0", "WORLD_SIZE": "3",
                       "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    assert [e["RANK"] for e in envs] == ["0", "1", "2"]
    assert [e["LOCAL_WORLD_SIZE"] for e in envs] == ["2", "2", "1"]
    assert {e["MASTER_ADDR"] for e in envs} == {"10.0.0.2"} and {e["LOCAL_RANK"] for e in envs} == {"0"}


# ---- plugrl train with two ranks -------------------------------------------------------------------

SHORT = ["train", "--actor-num-gpus-per-node", "2", "--device", "cpu", "--sft-warmup-steps", "5",
         "--rollout-batch-size", "4", "--n-samples-per-prompt", "4", "--global-batch-size", "16",
         "--eval-interval", "0", "--seed", "7"]


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "PLUGRL_CACHE": str(cache), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["phase"] == "train"]


def session_train_workers(sid: int) -> list[int]:
    """Train rank processes (Ray sets their title to ``ray::TrainWorker...``) of session ``sid``."""
    pids = []
    for pid in session_pids(sid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::TrainWorker"):
            pids.append(pid)
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank processes in /proc")
def test_cli_two_ranks_checkpoint_a_dying_rank_then_resume(tmp_path, cli_env):
    """``plugrl train`` with two CPU train ranks: it trains and checkpoints; a train rank killed
    mid-run stops it with a message naming the rank; ``--load`` resumes after the last checkpoint
    and completes."""
    run = tmp_path / "run"
    ckpt = run / "ckpt"
    args = SHORT + ["--num-rollout", "500", "--output-dir", str(run), "--save", str(ckpt), "--save-interval", "1"]
    with open(tmp_path / "first.out", "w") as out, open(tmp_path / "first.err", "w") as err:
        proc = subprocess.Popen(PLUGRL + args, env=cli_env, stdout=out, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not ((ckpt / "latest").exists() and len(train_rows(run)) >= 2):
            assert proc.poll() is None, (tmp_path / "first.err").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 10 minutes"
            time.sleep(0.5)
        workers = session_train_workers(proc.pid)
        assert len(workers) == 2, workers  # one process per rank
        os.kill(max(workers), signal.SIGKILL)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = (tmp_path / "first.err").read_text()
    assert proc.returncode == 1, stderr[-3000:]
    assert re.search(r"the train worker \(rank [01] of 2\) process died", stderr), stderr[-3000:]
    assert f"resume with --load {ckpt}" in stderr
    done = [r["rollout_id"] for r in train_rows(run)]
    assert done == list(range(len(done))) and 2 <= len(done) < 500
    assert all("train/loss" in r and "train/grad_norm" in r for r in train_rows(run))
    last_saved = int((ckpt / "latest").read_text().strip().split("_")[1])
    assert last_saved >= 1 and (ckpt / f"rollout_{last_saved:06d}" / "train_state.pt").exists()

    # Resume: two more rollouts after the last checkpoint, on two ranks again.
    end = last_saved + 3
    resumed = subprocess.run(PLUGRL + SHORT + ["--num-rollout", str(end), "--output-dir", str(run), "--save",
                                               str(ckpt), "--save-interval", "1", "--load", str(ckpt)],
                             env=cli_env, capture_output=True, text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {ckpt} at rollout {last_saved + 1}" in resumed.stderr
    ids = [r["rollout_id"] for r in train_rows(run)]
    assert ids[-2:] == [last_saved + 1, last_saved + 2]
    assert (ckpt / "latest").read_text().strip() == f"rollout_{end - 1:06d}"


# ---- real Ray on CPU ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cpu():
    import ray

    # Two fake GPUs: Ray hands out GPU ids to actors without touching a device, enough to test
    # the bundle probe; the train actors themselves are CPU actors.
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny"))


@pytest.fixture(scope="module")
def ref_checkpoint(tmp_path_factory):
    """Other random weights as the reference model, so the KL is far from zero from the start."""
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("ref") / "tiny", seed=1))


def test_probe_reports_each_bundles_node_and_gpu(ray_cpu):
    from plugrl.core.train_group import probe_bundles
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([{"GPU": 1, "CPU": 1}] * 2, strategy="PACK")
    ray_cpu.get(pg.ready())
    try:
        infos = probe_bundles(pg, 2)
    finally:
        remove_placement_group(pg)
    node_ip = ray_cpu.util.get_node_ip_address()
    assert sorted(infos) == [(node_ip, 0), (node_ip, 1)]
    physical = sort_bundles(infos)
    assert [infos[b][1] for b in physical] == [0, 1]


def train_config(checkpoint: str, ref_checkpoint: str) -> dict:
    return dict(  # noqa: C408 - keyword form reads like the flags
        hf_checkpoint=checkpoint, ref_load=ref_checkpoint, device="cpu", train_backend="torch", apply_chat_template=True,
        # reinforce++-baseline with a reward KL: ref log-probs, a KL that must be gathered over ranks,
        # and advantages whitened over the whole batch.
        advantage_estimator="reinforce_plus_plus_baseline", kl_coef=0.05, kl_loss_type="k1",
        normalize_advantages=True, lr=1e-3, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.98, adam_eps=1e-8,
        clip_grad=1.0, seed=0, rollout_temperature=1.0, micro_batch_size=2, use_dynamic_batch_size=False,
        max_tokens_per_gpu=None, global_batch_size=4, eps_clip=0.2, eps_clip_high=0.28, loss_type="policy_loss",
        use_kl_loss=False, entropy_coef=0.0, n_samples_per_prompt=4,
    )


def train_data() -> dict:
    """Eight samples of varied lengths, each its own rollout: two optimizer steps of four."""
    gen = torch.Generator().manual_seed(3)
    tokens, resp = [], []
    for i in range(8):
        prompt_len, response_len = 3 + (5 * i) % 7, 2 + (3 * i) % 6
        tokens.append(torch.randint(5, 300, (prompt_len + response_len,), generator=gen).tolist())
        resp.append(response_len)
    rewards = [1.0, -1.0, 0.5, -0.5, 0.25, -0.75, 1.0, 0.0]
    return {
        "tokens": tokens, "response_lengths": resp, "rewards": rewards, "raw_reward": rewards,
        "loss_masks": [[1] * (r - 1) + [0] if i % 3 == 0 else [1] * r for i, r in enumerate(resp)],
        "rollout_log_probs": [[-1.0] * r for r in resp], "rollout_ids": list(range(8)),
        "rollout_mask_sums": [r - 1 if i % 3 == 0 else r for i, r in enumerate(resp)],
        "truncated": [0] * 8, "sample_indices": list(range(8)),
    }


# A small warm-up lr: Adam's first steps are ~lr·sign(g), so a weight whose gradient is near zero
# moves by up to lr on float noise alone (the packing differs between one and two ranks).
SFT = {"steps": 3, "batch_size": 8, "lr": 1e-4, "prompt_loss_weight": 1.0, "seed": 5}


def test_two_ranks_train_like_one(ray_cpu, checkpoint, ref_checkpoint, tmp_path):
    """One rollout of two optimizer steps, then a short warm-up, on a gloo world of two: losses,
    metrics and weights equal those of the single-process trainer on the same data."""
    from plugrl.core.train_group import TrainGroup, remote_actor_class
    from plugrl.core.train_worker import TrainWorker

    config = train_config(checkpoint, ref_checkpoint)
    two_ranks = TrainGroup(remote_actor_class(TrainWorker), config, 10, [{"num_cpus": 1}] * 2)
    try:
        _check_two_ranks_like_one(ray_cpu, two_ranks, config, tmp_path)
    finally:
        two_ranks.kill()


def _weights(ray_cpu, group) -> dict:
    return {k: v for bucket in ray_cpu.get(group.export_weights(None)) for k, v in bucket.items()}


def _assert_same_weights(weights: dict, expected: dict) -> None:
    assert set(weights) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor, atol=1e-5, rtol=0, msg=name)


def _check_two_ranks_like_one(ray_cpu, two_ranks, config, tmp_path):
    from plugrl.core.train_worker import TrainWorker

    single = TrainWorker(config, 10)  # world of one, in this process: the expectation
    initial = {k: v.clone() for k, v in single.backend.model.state_dict().items()}
    expected_metrics = single.train(0, train_data())
    metrics = two_ranks.train(0, train_data())
    assert set(metrics) == set(expected_metrics)
    for key, value in expected_metrics.items():
        if not key.startswith("perf/"):  # wall-clock timers differ between any two runs
            assert metrics[key] == pytest.approx(value, abs=1e-5), key
    assert abs(expected_metrics["train/pg_loss"]) > 1e-3 and expected_metrics["train/grad_norm"] > 0.0
    expected = single.backend.model.state_dict()
    assert max(float((expected[k] - initial[k]).abs().max()) for k in expected) > 1e-4  # weights did move
    _assert_same_weights(_weights(ray_cpu, two_ranks), expected)
    assert ray_cpu.get(two_ranks.actors[1].export_weights.remote(None)) == []

    # Checkpoint from the group (rank 0 writes it), restored into a fresh single-process trainer.
    two_ranks.save(str(tmp_path))
    assert os.listdir(tmp_path) == ["train_state.pt"]
    restored = TrainWorker(config, 10)
    restored.load(str(tmp_path))
    for name, tensor in expected.items():
        torch.testing.assert_close(restored.backend.model.state_dict()[name], tensor, atol=1e-5, rtol=0)
    assert restored.backend.optimizer_steps == single.backend.optimizer_steps == 2

    # Supervised warm-up: each rank a share of every batch, gradients and loss summed.
    expected_history = single.sft_warmup(str(SFT_FILE), **SFT)
    history = two_ranks.sft_warmup(str(SFT_FILE), **SFT)
    assert all(type(loss) is float for loss in history)  # plain numbers to the driver, not tensors
    assert history == pytest.approx(expected_history, abs=1e-5)
    assert expected_history[-1] < expected_history[0]
    _assert_same_weights(_weights(ray_cpu, two_ranks), single.backend.model.state_dict())


def test_a_dead_rank_raises_rank_died(ray_cpu, checkpoint, ref_checkpoint):
    from plugrl.core.loop import _death_message
    from plugrl.core.train_group import RankDiedError, TrainGroup, remote_actor_class
    from plugrl.core.train_worker import TrainWorker

    group = TrainGroup(remote_actor_class(TrainWorker), train_config(checkpoint, ref_checkpoint), 10,
                       [{"num_cpus": 1}] * 2)
    try:
        ray_cpu.kill(group.actors[1])
        started = time.monotonic()
        # Rank 0 starts training and blocks in a collective with the dead peer; the group reports
        # rank 1's death instead of waiting for it.
        with pytest.raises(RankDiedError) as info:
            group.train(0, train_data())
        assert time.monotonic() - started < 60
    finally:
        group.kill()
    assert info.value.rank == 1 and info.value.world_size == 2
    args = type("Args", (), {"save": None, "output_dir": "/tmp/run"})()
    message = _death_message(info.value, args)
    assert message.startswith("the train worker (rank 1 of 2) process died: ")
    assert "--save DIR" in message


def test_an_actor_failing_to_start_is_named_with_its_error(ray_cpu):
    """An error in an actor's constructor: Ray's text starts with the coloured constructor name and ends
    with the exception; the one-line message gives the exception, without colour codes."""
    from plugrl.core.loop import _death_message

    class RolloutManager:
        def __init__(self):
            raise ValueError("--sglang-host is computed by plugrl per engine.")

        def ready(self):
            return True

    actor = ray_cpu.remote(num_cpus=0)(RolloutManager).remote()
    with pytest.raises(ray_cpu.exceptions.RayActorError) as info:
        ray_cpu.get(actor.ready.remote(), timeout=60)
    args = type("Args", (), {"save": None, "output_dir": "/tmp/run"})()
    message = _death_message(info.value, args)
    assert message.startswith("the rollout manager (it owns the rollout engine) failed to start: ValueError: "
                              "--sglang-host is computed by plugrl per engine. Metrics so far are in "), message
    assert "\x1b" not in message

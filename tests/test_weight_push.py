"""Weight push trainer -> engine (the embedded pair, no Ray): after a push the engine's log-probs for
fixed sequences equal the trainer's, before and after an optimizer step; the same through shared memory
into a ``plugrl serve`` process (``update_weights_from_tensor``, ``flattened_bucket``); ``--save-hf``
round trip."""

import os
import sys

import pytest
import torch
from plugrl.core.config import parse_config
from plugrl.core.plugins import make_plugin_manager
from plugrl.core.rollout_manager import RolloutManager
from plugrl.core.train_worker import TrainWorker
from plugrl.plugins.backends.tiny_default import build_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def pair(checkpoint):
    args = parse_config(["--recipe", "tiny-default", "--hf-checkpoint", str(checkpoint), "--rollout-batch-size", "4",
                         "--n-samples-per-prompt", "4", "--global-batch-size", "16", "--lr", "1e-2"],
                        make_plugin_manager(entry_points=False))
    config = {**vars(args), "device": "cpu", "rollout_device": "cpu"}
    return TrainWorker(config, total_optimizer_steps=10), RolloutManager(config)


def max_abs_diff(a, b):
    return max(abs(x - y) for p, q in zip(a, b) for x, y in zip(p, q))


def test_engine_log_probs_equal_trainer_after_each_push(pair):
    trainer, rollout = pair
    rollout.update_weights(trainer.export_weights(None), 1)
    data, _ = rollout.generate(0)
    sequences, lengths = data["tokens"][:6], data["response_lengths"][:6]
    # The rollout log-probs recorded during generation are the trainer's too.
    assert max_abs_diff(trainer.log_probs(sequences, lengths), data["rollout_log_probs"][:6]) < 1e-4
    before = trainer.log_probs(sequences, lengths)
    data["rewards"] = [float(i % 3) - 1.0 for i in range(len(data["rewards"]))]  # a non-zero policy gradient
    trainer.train(0, data)
    after = trainer.log_probs(sequences, lengths)
    assert max_abs_diff(before, after) > 1e-4  # the step changed the policy
    assert max_abs_diff(rollout.engine_log_probs(sequences, lengths, 1.0), before) < 1e-4  # not pushed yet
    rollout.update_weights(trainer.export_weights(4096), 2)  # several small buckets
    assert max_abs_diff(rollout.engine_log_probs(sequences, lengths, 1.0), after) < 1e-4
    assert rollout.engine.weight_version == "2"


def _train_one_step(trainer, rollout, rollout_id: int) -> None:
    rollout.update_weights(trainer.export_weights(None), rollout_id + 100)
    data, _ = rollout.generate(rollout_id)
    data["rewards"] = [float(i % 3) - 1.0 for i in range(len(data["rewards"]))]  # a non-zero policy gradient
    trainer.train(rollout_id, data)


def test_served_engine_log_probs_equal_trainer_after_shared_memory_push(pair, checkpoint, tmp_path):
    pytest.importorskip("aiohttp")
    httpx = pytest.importorskip("httpx")
    from plugrl.plugins.backends.sglang import launch
    from plugrl.plugins.backends.sglang.weights import push_tensor

    trainer, rollout = pair
    _train_one_step(trainer, rollout, 1)  # the trainer now differs from the checkpoint the engine loads
    port = launch.free_port()
    child = launch.start("serve", [sys.executable, "-m", "plugrl.plugins.backends.sglang.server", "--model-path",
                                   str(checkpoint), "--port", str(port), "--device", "cpu"], log_dir=tmp_path)
    url = f"http://127.0.0.1:{port}"
    sequences = [[5, 17, 42, 9, 7, 8, 9], [3, 4, 5, 6, 11]]
    lengths = [3, 2]

    def served_log_probs(client):
        out = []
        for seq, n in zip(sequences, lengths):
            body = client.post("/generate", json={"input_ids": seq, "return_logprob": True,
                                                  "logprob_start_len": len(seq) - n - 1,  # SGLang's first is None
                                                  "sampling_params": {"max_new_tokens": 0}}).json()
            out.append([p[0] for p in body["meta_info"]["input_token_logprobs"][1:]])
        return out

    try:
        with httpx.Client(base_url=url, timeout=120, trust_env=False) as client:
            def up() -> bool:
                try:
                    return client.get("/health_generate").status_code == 200
                except httpx.HTTPError:  # still loading
                    return False

            launch.wait_until(up, timeout=120, interval=0.3, what="plugrl serve", child=child)
            expected = trainer.log_probs(sequences, lengths)
            assert max_abs_diff(served_log_probs(client), expected) > 1e-4  # still the checkpoint's weights
            buckets = [list(b.items()) for b in trainer.export_weights(4096)]  # several small buckets
            assert len(buckets) > 1
            push_tensor(client, [url], buckets, "3")
            assert max_abs_diff(served_log_probs(client), expected) < 1e-4
            assert client.get("/get_model_info").json()["weight_version"] == "3"
    finally:
        child.stop()
    # Engine and sender both let go of every bucket: no /dev/shm file of this process is left.
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"torch_{os.getpid()}_")]


def test_save_hf_loads_in_transformers(pair, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer, _ = pair
    trainer.save_hf(str(tmp_path / "hf"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    AutoTokenizer.from_pretrained(tmp_path / "hf")
    for name, tensor in trainer.backend.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor)

"""Weight push trainer -> engine (the embedded pair, no Ray): after a push the engine's log-probs for
fixed sequences equal the trainer's, before and after an optimizer step; ``--save-hf`` round trip."""

import pytest
import torch

from plugrl.core.config import parse_config
from plugrl.core.plugins import make_plugin_manager
from plugrl.core.rollout_manager import RolloutManager
from plugrl.core.train_worker import TrainWorker
from plugrl.plugins.backends.tiny_default import build_tiny_checkpoint


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    checkpoint = build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")
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


def test_save_hf_loads_in_transformers(pair, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer, _ = pair
    trainer.save_hf(str(tmp_path / "hf"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    AutoTokenizer.from_pretrained(tmp_path / "hf")
    for name, tensor in trainer.backend.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor)

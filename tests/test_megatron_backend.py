"""The megatron train backend on CPU (fp32, one process, real megatron-core 0.16 modules): packed THD
forward passes give the HF model's log-probs, and one GRPO step gives the torch backend's loss, grad
norm and updated weights on the same batch (the torch backend is the independent reference: HF
transformers model + torch AdamW). TP=2 runs in tests/test_megatron_backend_tp.py."""

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core not installed (plugrl[megatron])")

from plugrl.plugins.backends.tiny_default import build_tiny_checkpoint
from plugrl.plugins.backends.torch_trainer import TorchTrainBackend
from plugrl.plugins.estimators.grpo import GRPOEstimator

from .test_megatron_gpu import one_process_world  # noqa: F401  (autouse: tears the world of one down)
from .test_torch_trainer import _train_data, make_args, random_sequences

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny"))



def megatron_backend(args):
    """The backend built as core builds it: given its strict view of a whole parsed config (the test's
    values over the defaults), so a misspelled or foreign setting read on any CPU path fails here."""
    from plugrl.core.config import parse_config
    from plugrl.core.plugin_config import PluginConfig
    from plugrl.plugins.backends.megatron.backend import MegatronTrainBackend

    values = {**vars(parse_config(["--train-backend", "megatron"])), **vars(args)}
    view = PluginConfig.for_plugin(values, "train_backend", "megatron")
    return MegatronTrainBackend(view, estimator=GRPOEstimator(args))


def test_packed_log_probs_equal_hf(checkpoint):
    args = make_args(checkpoint)
    backend = megatron_backend(args)
    reference = TorchTrainBackend(args, estimator=GRPOEstimator(args))
    seqs, resp = random_sequences(count=6)
    with torch.no_grad():
        backend.model.eval()
        packed, entropy = backend._forward_response(backend.model, seqs, resp, with_entropy=True)
        expected, expected_entropy = reference._forward_response(reference.model, seqs, resp, with_entropy=True)
        alone = torch.cat([backend._forward_response(backend.model, [s], [r], with_entropy=False)[0]
                           for s, r in zip(seqs, resp)])
    torch.testing.assert_close(packed, expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(entropy, expected_entropy, atol=2e-5, rtol=0)
    torch.testing.assert_close(packed, alone, atol=2e-5, rtol=0)


def test_a_forward_without_the_packs_rope_tables_is_refused(checkpoint):
    """The backend's model takes RoPE from the pack (rotary.install): called directly, without the
    per-token tables, it must fail loudly instead of running with no position information."""
    from plugrl.plugins.backends.megatron.backend import pack_thd

    backend = megatron_backend(make_args(checkpoint))
    batch = pack_thd([[5, 6, 7], [8, 9]], "cpu")
    with torch.no_grad(), pytest.raises(ValueError, match="RoPE comes from the pack"):
        backend.model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=None,
                      packed_seq_params=batch.params)
    with torch.no_grad(), pytest.raises(ValueError, match="RoPE comes from the pack"):
        backend.model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=None)
    with torch.no_grad():
        assert backend.logits(backend.model, batch).shape[0] == 5


@pytest.mark.parametrize("micro", [{"micro_batch_size": 1}, {"use_dynamic_batch_size": True, "max_tokens_per_gpu": 24}])
def test_one_grpo_step_equals_the_torch_backend(checkpoint, micro):
    args = make_args(checkpoint, lr=1e-3, clip_grad=1e9, **micro)
    seqs, resp = random_sequences(seed=1, count=4)
    data = _train_data(seqs, resp, [1.0, -1.0, 0.5, -0.5])
    reference = TorchTrainBackend(args, estimator=GRPOEstimator(args))
    expected = reference.train(0, data)
    backend = megatron_backend(args)
    got = backend.train(0, data)
    for key in ("train/pg_loss", "train/pg_clipfrac", "train/entropy_loss", "train/grad_norm"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    exported = backend.export_weights(None)[0]
    for name, tensor in reference.model.state_dict().items():
        if name == "lm_head.weight" and name not in exported:  # tied embeddings travel once
            continue
        torch.testing.assert_close(exported[name].float(), tensor.float(), atol=2e-5, rtol=1e-4, msg=name)


def test_export_buckets_respect_the_size(checkpoint):
    backend = megatron_backend(make_args(checkpoint))
    whole = backend.export_weights(None)[0]
    buckets = backend.export_weights(64 * 1024)
    assert len(buckets) > 1
    merged = {k: v for bucket in buckets for k, v in bucket.items()}
    assert merged.keys() == whole.keys()
    for bucket in buckets:
        if len(bucket) > 1:
            assert sum(t.numel() * t.element_size() for t in bucket.values()) <= 64 * 1024


def test_save_load_resumes_bit_exact(checkpoint, tmp_path):
    args = make_args(checkpoint, lr=1e-3)
    seqs, resp = random_sequences(seed=3, count=4)
    data = _train_data(seqs, resp, [1.0, -1.0, 0.5, -0.5])
    first = megatron_backend(args)
    first.train(0, data)
    first.save(str(tmp_path))
    straight = first.train(1, data)
    resumed = megatron_backend(args)
    resumed.load(str(tmp_path))
    again = resumed.train(1, data)
    def values(metrics):  # without the wall-clock timers (perf/), which no two runs share
        return {k: v for k, v in metrics.items() if not k.startswith("perf/")}

    assert values(again) == pytest.approx(values(straight), rel=1e-6, abs=1e-9)
    for (name, a), (_, b) in zip(first.model.state_dict().items(), resumed.model.state_dict().items()):
        if not name.endswith("_extra_state"):
            torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_sft_warmup_lowers_the_loss_and_rl_optimizer_follows(checkpoint):
    args = make_args(checkpoint, lr=1e-3)
    backend = megatron_backend(args)
    seqs, resp = random_sequences(seed=2, count=4)
    history = backend.sft_warmup([(seqs, resp)] * 30, lr=3e-3)
    assert history[-1] < 0.5 * history[0]
    before = {k: v.clone() for k, v in backend.model.state_dict().items() if not k.endswith("_extra_state")}
    # lr 0 on the RL optimizer: a step must leave the warmed-up weights exactly where they are.
    backend.base_lr = 0.0
    backend.train(0, _train_data(seqs, resp, [1.0, -1.0, 0.5, -0.5]))
    for name, tensor in before.items():
        torch.testing.assert_close(backend.model.state_dict()[name], tensor, atol=0, rtol=0, msg=name)


def test_unsupported_parallelism_fails_before_building(checkpoint):
    from plugrl.plugins.backends.megatron.backend import check_megatron_args

    with pytest.raises(ValueError, match="--pipeline-model-parallel-size 2"):
        check_megatron_args(make_args(checkpoint, pipeline_model_parallel_size=2))


@pytest.mark.parametrize("chunk,compiled", [(3, False), (1024, False), (3, True)])
def test_vocab_parallel_log_probs_and_grads_equal_autograd_reference(monkeypatch, chunk, compiled):
    """``compiled``: the per-chunk passes torch.compile'd as on CUDA (here by inductor's CPU backend)."""
    from plugrl.plugins.backends.megatron import fused_ops, vocab_parallel

    monkeypatch.setattr(vocab_parallel, "CHUNK_ROWS", chunk)
    if compiled:
        monkeypatch.setattr(fused_ops, "fused", lambda fn, tensor, enabled: fused_ops.dispatcher(fn))
    torch.manual_seed(0)
    vocab, padded, temperature = 50, 56, 0.7
    logits = torch.randn(9, padded, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([0, 2, 3, 4, 5, 7, 8])
    targets = torch.randint(0, vocab, (7,))
    lp, ent = vocab_parallel.vocab_parallel_log_probs(logits, index, targets, temperature=temperature, vocab_start=0,
                                                      vocab_size=vocab, with_entropy=True)
    weights = torch.randn(2, 7, dtype=torch.float64)
    (lp * weights[0] + ent * weights[1]).sum().backward()
    got_grad = logits.grad.clone()
    # reference: plain autograd on the real-vocabulary columns
    ref_logits = logits.detach().clone().requires_grad_(True)
    log_softmax = torch.log_softmax(ref_logits[index, :vocab] / temperature, dim=-1)
    ref_lp = log_softmax.gather(-1, targets[:, None])[:, 0]
    ref_ent = -(log_softmax.exp() * log_softmax).sum(-1)
    (ref_lp * weights[0] + ref_ent * weights[1]).sum().backward()
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_grad, ref_logits.grad, atol=1e-5, rtol=0)
    assert got_grad[:, vocab:].abs().sum() == 0 and got_grad[[1, 6]].abs().sum() == 0


def test_driver_refuses_what_the_backend_cannot_run(capsys):
    """Validated by ``plugrl train`` before Ray or any GPU: the message names the flag."""
    from plugrl.core.train_cli import main

    code = main(["--train-backend", "megatron", "--pipeline-model-parallel-size", "2", "--actor-num-gpus-per-node",
                 "2", "--device", "cpu", "--dry-run"])
    assert code == 2
    assert "--pipeline-model-parallel-size 2: plugrl's megatron backend runs TP x DP only" in capsys.readouterr().err
    code = main(["--train-backend", "megatron", "--attention-backend", "fused", "--device", "cpu", "--dry-run"])
    assert code == 2 and "--attention-backend fused" in capsys.readouterr().err
    code = main(["--train-backend", "megatron", "--attention-backend", "flash", "--device", "cpu", "--dry-run"])
    assert code == 2 and "--attention-backend flash needs CUDA" in capsys.readouterr().err


def test_ref_load_and_load_take_a_converted_torch_dist_checkpoint(checkpoint, tmp_path):
    """slime's flow: convert the HF model to torch_dist, point --ref-load (or a --load without a
    plugrl checkpoint) at it: the backend starts from exactly the HF weights."""
    from plugrl.plugins.backends.megatron.convert import main as convert

    assert convert(["hf-to-megatron", "--hf-checkpoint", checkpoint, "--save", str(tmp_path / "mcore")]) == 0
    seqs, resp = random_sequences(seed=7, count=3)
    reference = megatron_backend(make_args(checkpoint))
    expected = reference.export_weights(None)[0]
    for flags in ({"ref_load": str(tmp_path / "mcore")}, {"load": str(tmp_path / "mcore")}):
        backend = megatron_backend(make_args(checkpoint, **flags))
        got = backend.export_weights(None)[0]
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(got[name], tensor, atol=0, rtol=0, msg=name)
        with torch.no_grad():
            lp, _ = backend._forward_response(backend.model, seqs, resp, with_entropy=False)
            ref_lp, _ = reference._forward_response(reference.model, seqs, resp, with_entropy=False)
        torch.testing.assert_close(lp, ref_lp, atol=0, rtol=0)
    with pytest.raises(ValueError, match="neither an HF checkpoint"):
        megatron_backend(make_args(checkpoint, ref_load=str(tmp_path)))


def test_megatron_passthrough_flags_set_transformer_config_fields(checkpoint):
    from plugrl.plugins.backends.megatron_options import passthrough_overrides

    args = make_args(checkpoint, megatron_passthrough={"hidden_dropout": "0.25", "apply_residual_connection_post_layernorm": True,
                                                       "init_method_std": "0.01"})
    assert passthrough_overrides(args) == {"hidden_dropout": 0.25, "apply_residual_connection_post_layernorm": True,
                                           "init_method_std": 0.01}
    backend = megatron_backend(make_args(checkpoint, megatron_passthrough={"hidden_dropout": "0.25"}))
    assert backend.model.config.hidden_dropout == 0.25
    with pytest.raises(ValueError, match="--megatron-no-such-field: not a megatron-core TransformerConfig field"):
        passthrough_overrides(make_args(checkpoint, megatron_passthrough={"no_such_field": "1"}))


def test_kl_shaped_step_with_a_dropped_rollout_equals_the_torch_backend(checkpoint):
    """--global-batch-size 3 over 4 rollouts: one step, one rollout dropped; with a KL in the reward
    (reinforce++) the old and reference log-probs of every sample, the dropped one included, feed the
    estimator. The torch backend on the same batch is the reference."""
    from plugrl.plugins.estimators.reinforce import ReinforcePlusPlusEstimator

    args = make_args(checkpoint, lr=1e-3, adam_eps=1e-6, clip_grad=1e9, global_batch_size=3, kl_coef=0.1,
                     kl_loss_type="k1", advantage_estimator="reinforce_plus_plus")
    seqs, resp = random_sequences(seed=8, count=4)
    data = _train_data(seqs, resp, [1.0, -1.0, 0.5, -0.5])
    reference = TorchTrainBackend(args, estimator=ReinforcePlusPlusEstimator(args))
    backend = megatron_backend(args)
    backend.estimator = ReinforcePlusPlusEstimator(args)
    # The first call moves the actor away from the reference model; the second one sees a non-zero KL.
    for rollout_id in (0, 1):
        expected = reference.train(rollout_id, data)
        got = backend.train(rollout_id, data)
    assert expected["train/ppo_kl"] == pytest.approx(0.0, abs=1e-6)  # old == current: one step, no drift yet
    for key in ("train/pg_loss", "train/grad_norm", "train/train_rollout_logprob_abs_diff"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    assert abs(expected["train/pg_loss"]) > 1e-4  # the KL-shaped advantages are not all zero


def test_save_hf_writes_a_transformers_checkpoint_of_the_trained_weights(checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    args = make_args(checkpoint, lr=1e-3)
    backend = megatron_backend(args)
    seqs, resp = random_sequences(seed=9, count=4)
    backend.train(0, _train_data(seqs, resp, [1.0, -1.0, 0.5, -0.5]))
    backend.save_hf(str(tmp_path / "hf"))
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    exported = backend.export_weights(None)[0]
    for name, tensor in saved.state_dict().items():
        if name == "lm_head.weight" and name not in exported:  # tied
            continue
        torch.testing.assert_close(tensor, exported[name].to(tensor.dtype), atol=0, rtol=0, msg=name)
    with torch.no_grad():
        lp, _ = backend._forward_response(backend.model, seqs, resp, with_entropy=False)
        logits = saved(input_ids=torch.tensor([seqs[0]])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[torch.arange(len(seqs[0]) - resp[0] - 1, len(seqs[0]) - 1),
                                              torch.tensor(seqs[0][len(seqs[0]) - resp[0]:])]
    torch.testing.assert_close(lp[:resp[0]], expected, atol=2e-5, rtol=0)


def test_data_pad_size_multiplier_pads_packs_without_changing_log_probs(checkpoint, monkeypatch):
    from plugrl.plugins.backends.megatron import backend as backend_module

    seqs, resp = random_sequences(seed=6, count=3)
    plain = megatron_backend(make_args(checkpoint))
    padded = megatron_backend(make_args(checkpoint, data_pad_size_multiplier=8, distributed_backend="gloo"))
    packed_lengths = []
    original = backend_module.pack_thd
    monkeypatch.setattr(backend_module, "pack_thd",
                        lambda *a, **k: packed_lengths.append(original(*a, **k)) or packed_lengths[-1])
    with torch.no_grad():
        expected, _ = plain._forward_response(plain.model, seqs, resp, with_entropy=False)
        got, _ = padded._forward_response(padded.model, seqs, resp, with_entropy=False)
    total = sum(len(s) for s in seqs)
    assert packed_lengths[0].input_ids.shape[1] == total and total % 8  # no padding by default ...
    assert packed_lengths[1].input_ids.shape[1] % 8 == 0 > packed_lengths[1].input_ids.shape[1] - total - 8
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)  # ... and padding changes nothing


def test_distributed_backend_is_checked_on_the_driver(capsys):
    from plugrl.core.train_cli import main

    assert main(["--train-backend", "megatron", "--device", "cpu", "--distributed-backend", "nccl", "--dry-run"]) == 2
    assert "--distributed-backend nccl needs CUDA" in capsys.readouterr().err

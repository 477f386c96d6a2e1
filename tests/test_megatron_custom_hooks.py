"""slime's Megatron escape hatches on the megatron backend (CPU, real megatron-core modules): each hook
is loaded from an import path in a module written here and called with slime's arguments at slime's
points; the model provider's model is the one trained; --megatron-config-path's actor overrides reach
the TransformerConfig (the command line wins); bad input is refused on the driver, naming the flag."""

import textwrap

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core not installed (plugrl[megatron])")

from plugrl.plugins.backends.tiny_default import build_tiny_checkpoint
from plugrl.plugins.estimators.grpo import GRPOEstimator

from .test_megatron_gpu import one_process_world  # noqa: F401  (autouse: tears the world of one down)
from .test_torch_trainer import _train_data, make_args, random_sequences

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")

HOOKS = '''
CALLS = []

def init(args):
    CALLS.append(("init", args.seed))

def before_log_prob(args, model, store_prefix):
    CALLS.append(("log_prob", store_prefix, type(model[0]).__name__))

def before_train_step(args, rollout_id, step_id, model, optimizer, opt_param_scheduler):
    CALLS.append(("train_step", rollout_id, step_id, len(model), hasattr(optimizer, "step"), opt_param_scheduler))

def provider(pre_process, post_process, config, layer_spec):
    from megatron.core.models.gpt.gpt_model import GPTModel
    CALLS.append(("provider", pre_process, post_process))
    model = GPTModel(config=config, transformer_layer_spec=layer_spec, vocab_size=PADDED_VOCAB,
                     max_sequence_length=4096, position_embedding_type="rope", rotary_base=ROPE_BASE,
                     share_embeddings_and_output_weights=TIED)
    model.provided_here = True
    return model
'''


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny"))


@pytest.fixture
def hooks(tmp_path, monkeypatch, checkpoint):
    from plugrl.plugins.backends.megatron.config_bridge import derive_model_config
    from transformers import AutoConfig

    cfg = derive_model_config(AutoConfig.from_pretrained(checkpoint))
    from plugrl.plugins.backends.megatron.config_bridge import gpt_model_kwargs

    kwargs = gpt_model_kwargs(cfg)
    module = tmp_path / "my_megatron_hooks.py"
    module.write_text(HOOKS + textwrap.dedent(f"""
        PADDED_VOCAB = {kwargs["vocab_size"]}
        ROPE_BASE = {kwargs["rotary_base"]}
        TIED = {kwargs["share_embeddings_and_output_weights"]}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    return importlib.import_module("my_megatron_hooks")


def backend_with(checkpoint, **flags):
    from plugrl.plugins.backends.megatron.backend import MegatronTrainBackend

    args = make_args(checkpoint, **flags)
    return MegatronTrainBackend(args, estimator=GRPOEstimator(args))


def test_hooks_are_called_with_slimes_arguments(checkpoint, hooks):
    hooks.CALLS.clear()
    backend = backend_with(
        checkpoint, lr=1e-3, kl_coef=0.1, use_kl_loss=True, global_batch_size=2, n_samples_per_prompt=2,
        custom_megatron_init_path="my_megatron_hooks.init",
        custom_megatron_before_log_prob_hook_path="my_megatron_hooks:before_log_prob",
        custom_megatron_before_train_step_hook_path="my_megatron_hooks.before_train_step")
    assert hooks.CALLS == [("init", 0)]
    seqs, resp = random_sequences(seed=1, count=4)
    backend.train(3, _train_data(seqs, resp, [1.0, -1.0, 0.5, -0.5]))
    calls = hooks.CALLS[1:]
    # two optimizer steps (4 samples, global batch 2) need the old log-probs; the KL loss the reference ones
    assert ("log_prob", "", "GPTModel") in calls and ("log_prob", "ref_", "GPTModel") in calls
    steps = [c for c in calls if c[0] == "train_step"]
    assert steps == [("train_step", 3, 0, 1, True, None), ("train_step", 3, 1, 1, True, None)]
    assert calls.index(("log_prob", "", "GPTModel")) < calls.index(steps[0])


def test_the_model_provider_builds_the_trained_model(checkpoint, hooks):
    hooks.CALLS.clear()
    provided = backend_with(checkpoint, custom_model_provider_path="my_megatron_hooks.provider")
    reference = backend_with(checkpoint)
    assert getattr(provided.model, "provided_here", False) and hooks.CALLS == [("provider", True, True)]
    seqs, resp = random_sequences(seed=2, count=3)
    with torch.no_grad():
        got, _ = provided._forward_response(provided.model, seqs, resp, with_entropy=False)
        expected, _ = reference._forward_response(reference.model, seqs, resp, with_entropy=False)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)  # same weights loaded, same packed forward


def test_a_provider_without_the_packed_attention_is_refused(checkpoint, tmp_path, monkeypatch):
    module = tmp_path / "local_spec_provider.py"
    module.write_text(textwrap.dedent("""
        def provider(pre_process, post_process, config):
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
            from megatron.core.models.gpt.gpt_model import GPTModel
            return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(qk_layernorm=True),
                            vocab_size=512, max_sequence_length=128)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="--custom-model-provider-path local_spec_provider.provider: the model has no "
                                         "plugrl packed core attention"):
        backend_with(checkpoint, custom_model_provider_path="local_spec_provider.provider")


def test_megatron_config_path_sets_actor_overrides_and_the_command_line_wins(checkpoint, tmp_path):
    path = tmp_path / "megatron.yaml"
    path.write_text("megatron:\n  - name: policy\n    role: actor\n    overrides:\n"
                    "      init_method_std: 0.01\n      attention_softmax_in_fp32: true\n")
    backend = backend_with(checkpoint, megatron_config_path=str(path),
                           megatron_passthrough={"init_method_std": "0.03"})
    assert backend.model.config.attention_softmax_in_fp32 is True
    assert backend.model.config.init_method_std == pytest.approx(0.03)


@pytest.mark.parametrize("text, message", [
    ("megatron:\n  - role: critic\n    overrides: {hidden_dropout: 0.0}\n", "role 'critic': plugrl trains no critic"),
    ("megatron:\n  - role: actor\n    overrides: {no_such_field: 1}\n", "overrides ['no_such_field'] are not"),
    ("policy: {}\n", "expected a top-level 'megatron:' list"),
])
def test_a_bad_megatron_config_file_is_refused_on_the_driver(tmp_path, capsys, text, message):
    from plugrl.core.train_cli import main

    path = tmp_path / "megatron.yaml"
    path.write_text(text)
    code = main(["--train-backend", "megatron", "--device", "cpu", "--megatron-config-path", str(path), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and f"--megatron-config-path {path}" in err and message in err


def test_a_hook_flag_that_is_not_an_import_path_is_refused_on_the_driver(capsys):
    from plugrl.core.train_cli import main

    code = main(["--train-backend", "megatron", "--device", "cpu", "--custom-megatron-init-path", "myinit",
                 "--dry-run"])
    assert code == 2 and "--custom-megatron-init-path myinit: write it as module.attr" in capsys.readouterr().err


def test_no_save_optim_on_the_megatron_backend(checkpoint, tmp_path):
    """--no-save-optim (a core flag the megatron backend honours too): no optimizer files; a resume
    loads the weights and starts Adam fresh."""
    import os

    seqs, resp = random_sequences(seed=4, count=4)
    trained = backend_with(checkpoint, lr=1e-3, no_save_optim=True)
    trained.train(0, _train_data(seqs, resp, [1.0, -1.0, 0.5, -0.5]))
    trained.save(str(tmp_path))
    assert not [n for n in os.listdir(tmp_path / "megatron") if n.startswith("optimizer")]
    resumed = backend_with(checkpoint, lr=1e-3, no_save_optim=True)
    resumed.load(str(tmp_path))
    assert not resumed.optimizer.optimizer.state and resumed.optimizer_steps == 1
    for p, q in zip(trained.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)

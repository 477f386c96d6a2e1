"""The mapping against a REAL megatron-core GPTModel (local spec) built on CPU: state-dict names and
shapes must equal ours, and the Megatron forward pass on the mapped weights must reproduce the HF
model's logits (single process; gloo group + model-parallel state set up by a fixture)."""

import socket

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core not installed (plugrl[megatron])")

from plugrl.plugins.backends.megatron.config_bridge import (
    build_gpt_model,
    derive_model_config,
)
from plugrl.plugins.backends.megatron.weights import (
    hf_to_megatron,
    megatron_shard_shapes,
)

TINY = {
    "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "vocab_size": 317,
    "max_position_embeddings": 128, "hidden_act": "silu",
}
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
CASES = [("qwen3", False), ("qwen3", True), ("qwen2", False), ("llama", True)]


@pytest.fixture(scope="module")
def megatron_cpu():
    """A one-process gloo world with TP=PP=1, as megatron-core needs to construct a model."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.fixture
def cpu_forward(monkeypatch, megatron_cpu):
    """megatron-core 0.16 cannot run forward on CPU as shipped: RoPE moves inv_freq to
    torch.cuda.current_device() and attention dropout forks the CUDA RNG tracker. Point the former
    at the CPU and use the inference tracker (dropout is off in eval anyway)."""
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    yield
    initialize_rng_tracker(force_reset=True)


def hf_model(model_type: str, tied: bool):
    """A random HF model whose norm weights are random too (HF initialises them to ones, which would
    hide a swapped q_norm/k_norm or input/post-attention norm)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, tie_word_embeddings=tied, **TINY)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.copy_(1 + 0.2 * torch.randn_like(param) if "norm" in name else torch.randn_like(param))
    return config, model


def megatron_model(cfg):
    return build_gpt_model(cfg, use_cpu_initialization=True).eval()


@pytest.mark.parametrize("model_type, tied", CASES)
def test_names_and_shapes_equal_a_real_gptmodel(megatron_cpu, model_type, tied):
    config, model = hf_model(model_type, tied)
    cfg = derive_model_config(config)
    real = {k: tuple(v.shape) for k, v in megatron_model(cfg).state_dict().items() if not k.endswith("_extra_state")}
    ours = {k: tuple(v.shape) for k, v in hf_to_megatron(model.state_dict(), cfg).items()}
    assert ours == real
    assert megatron_shard_shapes(cfg, 1) == real
    assert ("output_layer.weight" in real) == (not tied)


def megatron_logits(cfg, state, input_ids):
    model = megatron_model(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(key.endswith("_extra_state") for key in missing)
    seq = input_ids.shape[1]
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]  # True = masked
    with torch.no_grad():
        logits = model(input_ids=input_ids, position_ids=torch.arange(seq)[None], attention_mask=causal)
    return logits[..., : cfg.vocab_size]


@pytest.mark.parametrize("model_type, tied", CASES)
def test_megatron_forward_reproduces_hf_logits(cpu_forward, model_type, tied):
    config, model = hf_model(model_type, tied)
    cfg = derive_model_config(config)
    input_ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    got = megatron_logits(cfg, hf_to_megatron(model.state_dict(), cfg), input_ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_forward_comparison_detects_a_wrong_qkv_layout(cpu_forward):
    """Negative control: plain [q; k; v] concatenation (no per-group interleave) must not match."""
    config, model = hf_model("qwen3", False)
    cfg = derive_model_config(config)
    state = hf_to_megatron(model.state_dict(), cfg)
    hf_state = model.state_dict()
    for layer in range(cfg.num_layers):
        parts = [hf_state[f"model.layers.{layer}.self_attn.{p}_proj.weight"] for p in "qkv"]
        state[f"decoder.layers.{layer}.self_attention.linear_qkv.weight"] = torch.cat(parts)
    input_ids = torch.randint(0, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    assert not torch.allclose(megatron_logits(cfg, state, input_ids), expected, rtol=1e-4, atol=1e-4)

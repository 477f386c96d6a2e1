"""Block-wise FP8 rollout weights (``plugins/backends/sglang/fp8.py``): error bounds, exact round trips,
names/shapes/dtypes for a Qwen3-like state dict, ignored modules and config detection. CPU only."""

import pytest
import torch
from plugrl.plugins.backends.sglang.fp8 import (
    FP8_MAX,
    dequantize_block_fp8,
    fp8_named_tensors,
    fp8_quantization_config,
    quantize_block_fp8,
)

QWEN3_FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
# e4m3 keeps 3 mantissa bits: round-to-nearest errs by at most half a step, 2^-4 of the value, for
# normal numbers; below 2^-6 (subnormals) the step is 2^-9, so at most 2^-10 in scaled units. The
# top binade [256, 448] has step 32, hence per block |dequant - w| <= 16 * s = amax / 28.
REL, SUBNORMAL_ABS = 2.0 ** -4, 2.0 ** -10


def _per_element(scale, shape, block=(128, 128)):
    return scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: shape[0], : shape[1]]


@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (5, 7)])
def test_error_bound_and_tightness(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[0]).unsqueeze(1)  # rows of very different size
    q, scale = quantize_block_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    err = (dequantize_block_fp8(q, scale) - w).abs()
    s = _per_element(scale, shape)
    assert torch.all(err <= REL * w.abs() + SUBNORMAL_ABS * s * (1 + 1e-6))
    assert torch.all(err <= s * 16 * (1 + 1e-6))  # amax / 28 per block
    # Tight: in units of the block's scale the worst error reaches past an eighth of the bound.
    assert (err / s).max() > 16 / 8
    # Scale is the block amax / 448 (slime's s), so each block's largest |q| is exactly 448.
    per_block_qmax = torch.nn.functional.pad(q.float().abs(), (0, (-shape[1]) % 128, 0, (-shape[0]) % 128))
    qmax = per_block_qmax.view(scale.shape[0], 128, scale.shape[1], 128).amax(dim=(1, 3))
    assert torch.all(qmax == FP8_MAX)


def test_values_on_the_grid_round_trip_exactly():
    torch.manual_seed(1)
    codes = torch.randint(0, 256, (256, 256), dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0  # drop the NaN encodings
    q = codes.view(torch.float8_e4m3fn).clone()
    q[0, 0] = q[0, 128] = q[128, 0] = q[128, 128] = FP8_MAX  # every block reaches the top code
    scale = torch.tensor([[2.0 ** -7, 2.0 ** -3], [1.0, 2.0 ** 4]])  # powers of two: s*448 is exact
    w = dequantize_block_fp8(q, scale)
    q2, scale2 = quantize_block_fp8(w)
    assert torch.equal(scale2, scale)
    # Distinct fp8 codes are distinct floats (but for +-0), so this compares the codes.
    assert torch.equal(q2.float(), q.float())
    assert torch.equal(dequantize_block_fp8(q2, scale2), w)


def test_zero_blocks_and_bf16_input():
    w = torch.zeros(130, 260, dtype=torch.bfloat16)
    w[129, 259] = 3.0  # only the last (partial) block is non-zero
    q, scale = quantize_block_fp8(w)
    assert torch.all(scale[:, :2] > 0) and torch.all(q[:128].float() == 0)
    assert scale[1, 2] == 3.0 / FP8_MAX
    assert torch.equal(dequantize_block_fp8(q, scale), w.float())


@pytest.fixture(scope="module")
def tiny_state(tmp_path_factory):
    from plugrl.plugins.backends.tiny_default import build_tiny_checkpoint
    from transformers import AutoModelForCausalLM

    path = build_tiny_checkpoint(tmp_path_factory.mktemp("fp8") / "tiny", hidden_size=160, intermediate_size=200,
                                 num_hidden_layers=1, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_qwen3_state_dict_names_shapes_dtypes(tiny_state):
    out = dict(fp8_named_tensors(tiny_state.items(), QWEN3_FP8))
    linears = [n for n in tiny_state if n.rpartition(".")[0].rpartition(".")[2] in
               ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")]
    assert len(linears) == 7
    for name in linears:
        rows, cols = tiny_state[name].shape
        assert out[name].dtype == torch.float8_e4m3fn and out[name].shape == (rows, cols)
        scale = out[name.removesuffix("weight") + "weight_scale_inv"]
        assert scale.dtype == torch.float32 and scale.shape == (-(-rows // 128), -(-cols // 128))
    kept = set(tiny_state) - set(linears)
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
            "model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.q_norm.weight"} <= kept
    for name in kept:
        assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], tiny_state[name].to(torch.bfloat16))
    assert len(out) == len(tiny_state) + len(linears)


def test_ignored_layers_stay_bf16(tiny_state):
    config = {**QWEN3_FP8, "ignored_layers": ["model.layers.0.self_attn.qkv_proj"],
              "modules_to_not_convert": ["mlp.down_proj"]}
    out = dict(fp8_named_tensors(tiny_state.items(), config))
    for leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"):
        assert out[f"model.layers.0.{leaf}.weight"].dtype == torch.bfloat16
        assert f"model.layers.0.{leaf}.weight_scale_inv" not in out
    for leaf in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"):
        assert out[f"model.layers.0.{leaf}.weight"].dtype == torch.float8_e4m3fn


def test_config_detection():
    from transformers import Qwen3Config

    assert fp8_quantization_config({"quantization_config": QWEN3_FP8}) == QWEN3_FP8
    assert fp8_quantization_config(Qwen3Config(quantization_config=QWEN3_FP8)) == QWEN3_FP8
    assert fp8_quantization_config(Qwen3Config()) is None
    assert fp8_quantization_config({"model_type": "qwen3"}) is None
    assert fp8_quantization_config({"quantization_config": {"quant_method": "awq", "bits": 4}}) is None
    with pytest.raises(ValueError, match="weight_block_size"):  # per-tensor fp8: not reproduced here
        fp8_quantization_config({"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}})
    with pytest.raises(ValueError, match="activation_scheme"):
        fp8_quantization_config({"quantization_config": {**QWEN3_FP8, "activation_scheme": "static"}})


def test_checkpoint_config_from_a_local_directory(tmp_path):
    import json

    from plugrl.plugins.backends.sglang.fp8 import checkpoint_fp8_config

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "quantization_config": QWEN3_FP8}))
    assert checkpoint_fp8_config(str(tmp_path)) == QWEN3_FP8
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    assert checkpoint_fp8_config(str(tmp_path)) is None
    assert checkpoint_fp8_config(str(tmp_path / "missing")) is None

"""A small Qwen3-shaped checkpoint with random bf16 weights (norm weights randomised too, so a norm that
ignores or swaps its weight shows), shared by the GPU tests that compare a train backend to transformers."""

import torch

SHAPE = {"num_hidden_layers": 4, "hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8,
         "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 4000, "rms_norm_eps": 1e-6,
         "rope_theta": 1_000_000.0, "max_position_embeddings": 4096, "tie_word_embeddings": True}


def build_checkpoint(path, **overrides) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3", **{**SHAPE, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    with torch.no_grad():  # random norm weights: a swapped norm would show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
    model.save_pretrained(path)
    return str(path)

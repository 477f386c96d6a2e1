"""Named recipes for ``plugrl train --recipe NAME``: slime's Qwen3-4B runs on one node of 8 H100s.

Each function returns a fresh dict of flag values (dests), registered by import path in
``plugrl.core.config.RECIPES``; the command line and ``--config`` override any of them.

Values come from slime's ``scripts/run-qwen3-4B.sh`` (HEAD 624b824a) and its guide
``docs/en/examples/qwen3-4B.md`` (decoupled, async, dynamic sampling, partial rollout), and
``scripts/low_precision/run-qwen3-4b-fp8.sh`` for FP8 rollout. Differences from the script:

* no Megatron model flags (``scripts/models/qwen3-4B.sh``): the megatron backend derives them from
  ``--hf-checkpoint``'s config.json, so pointing the recipe at another Qwen3 size just works;
* the paths are the guide's (``/root/...``): they name the user's copies, which ``plugrl train``
  checks before any GPU work (the error names the flag to pass instead);
* the environment variables of the script's Ray job (``CUDA_DEVICE_MAX_CONNECTIONS=1``,
  ``NCCL_NVLS_ENABLE``) are the megatron backend's business, not flags.
"""

from __future__ import annotations

# The guide's download locations (docs/qwen3-4b-guide.md shows how to fill them).
HF_CHECKPOINT = "/root/Qwen3-4B"
HF_CHECKPOINT_FP8 = "/root/Qwen3-4B-FP8"
MEGATRON_CHECKPOINT = "/root/Qwen3-4B_torch_dist"  # `plugrl convert hf-to-megatron --save` target
RUN_CHECKPOINTS = "/root/Qwen3-4B_slime/"
PROMPT_DATA = "/root/dapo-math-17k/dapo-math-17k.jsonl"
EVAL_DATA = "/root/aime-2024/aime-2024.jsonl"


def qwen3_4b_8xh100() -> dict:
    """``scripts/run-qwen3-4B.sh``: GRPO on DAPO-Math-17k, Megatron TP 2 and SGLang engines of 2 GPUs
    sharing the same 8 GPUs (colocated, both sides offloaded while the other works)."""
    return {
        # cluster: 1 node x 8 GPUs, training and rollout colocated
        "actor_num_nodes": 1,
        "actor_num_gpus_per_node": 8,
        "colocate": True,
        "train_backend": "megatron",
        "rollout_backend": "sglang",
        # CKPT_ARGS
        "hf_checkpoint": HF_CHECKPOINT,
        "ref_load": MEGATRON_CHECKPOINT,
        "load": RUN_CHECKPOINTS,
        "save": RUN_CHECKPOINTS,
        "save_interval": 20,
        # ROLLOUT_ARGS
        "prompt_data": PROMPT_DATA,
        "input_key": "prompt",
        "label_key": "label",
        "apply_chat_template": True,
        "rollout_shuffle": True,
        "rm_type": "deepscaler",
        "num_rollout": 3000,
        "rollout_batch_size": 32,
        "n_samples_per_prompt": 8,
        "rollout_max_response_len": 8192,
        "rollout_temperature": 1.0,
        "global_batch_size": 256,
        "balance_data": True,
        # EVAL_ARGS
        "eval_interval": 20,
        "eval_prompt_data": ["aime", EVAL_DATA],
        "n_samples_per_eval_prompt": 16,
        "eval_max_response_len": 16384,
        "eval_top_p": 1.0,
        # PERF_ARGS (Megatron parallelism; --micro-batch-size is ignored under dynamic batch size)
        "tensor_model_parallel_size": 2,
        "sequence_parallel": True,
        "pipeline_model_parallel_size": 1,
        "context_parallel_size": 1,
        "expert_model_parallel_size": 1,
        "expert_tensor_parallel_size": 1,
        "recompute_granularity": "full",
        "recompute_method": "uniform",
        "recompute_num_layers": 1,
        "use_dynamic_batch_size": True,
        "max_tokens_per_gpu": 9216,
        # GRPO_ARGS (the KL term is computed and logged but weighted 0)
        "advantage_estimator": "grpo",
        "use_kl_loss": True,
        "kl_loss_coef": 0.0,
        "kl_loss_type": "low_var_kl",
        "entropy_coef": 0.0,
        "eps_clip": 0.2,
        "eps_clip_high": 0.28,
        # OPTIMIZER_ARGS
        "optimizer": "adam",
        "lr": 1e-6,
        "lr_decay_style": "constant",
        "weight_decay": 0.1,
        "adam_beta1": 0.9,
        "adam_beta2": 0.98,
        # SGLANG_ARGS
        "rollout_num_gpus_per_engine": 2,
        "sglang_mem_fraction_static": 0.7,
        # MISC_ARGS
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "accumulate_allreduce_grads_in_fp32": True,
        "attention_softmax_in_fp32": True,
        "attention_backend": "flash",
    }


def qwen3_4b_8xh100_decoupled() -> dict:
    """The guide's "Decoupled Training and Inference": 2 train GPUs, 6 rollout GPUs (3 engines)."""
    return {**qwen3_4b_8xh100(), "colocate": False, "actor_num_gpus_per_node": 2, "rollout_num_gpus": 6}


def qwen3_4b_8xh100_async() -> dict:
    """The guide's "Asynchronous Training" (slime's ``train_async.py``): decoupled, and rollout k+1 is
    generated while training on rollout k."""
    return {**qwen3_4b_8xh100_decoupled(), "async_train": True}


def qwen3_4b_8xh100_dynamic_sampling() -> dict:
    """The guide's "Dynamic Sampling" + "Partial Rollout": 64 prompts per sampling round, groups whose
    rewards all agree are dropped, aborted groups are kept in the buffer and continued next rollout."""
    return {
        **qwen3_4b_8xh100(),
        "over_sampling_batch_size": 64,
        "dynamic_sampling_filter": "nonzero_std",  # slime's check_reward_nonzero_std
        "partial_rollout": True,
    }


def qwen3_4b_8xh100_fp8() -> dict:
    """``scripts/low_precision/run-qwen3-4b-fp8.sh``: SGLang serves the FP8 checkpoint and every weight
    push quantizes the BF16 Megatron weights block-wise (the sglang backend reads the checkpoint's
    ``quantization_config``); training stays BF16 from the converted BF16 checkpoint."""
    return {
        **qwen3_4b_8xh100(),
        "hf_checkpoint": HF_CHECKPOINT_FP8,
        # slime's script keeps FP8 runs apart from BF16 ones; one directory so that --load resumes --save
        "load": "/root/Qwen3-4B_slime_fp8/",
        "save": "/root/Qwen3-4B_slime_fp8/",
    }


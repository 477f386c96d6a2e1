"""Registers the train and rollout backends as lazy factories: nothing heavy is imported here, so
``plugrl plugins list`` works without torch, megatron-core or sglang and says what is missing."""

from plugrl.core import hookimpl


@hookimpl
def plugrl_register_train_backends(register):
    register("torch", "plugrl.plugins.backends.torch_trainer:TorchTrainBackend",
             requires=("torch", "transformers"), extra="train",
             description="embedded trainer: HF AutoModelForCausalLM + AdamW, CPU or one GPU")
    register("megatron", "plugrl.plugins.backends.megatron.backend:MegatronTrainBackend",
             requires=("torch", "megatron.core"), extra="megatron",
             description="megatron-core GPTModel with TP/PP/CP, distributed optimizer")


@hookimpl
def plugrl_register_rollout_backends(register):
    register("hf", "plugrl.plugins.backends.hf_engine:HFRolloutEngine",
             requires=("torch", "transformers"), extra="train",
             description="embedded engine: transformers generation in-process, CPU or one GPU")
    register("sglang", "plugrl.plugins.backends.sglang.engine:SGLangRolloutBackend",
             requires=("sglang_router", "httpx"), extra="sglang",
             description="SGLang servers behind the sglang_router")

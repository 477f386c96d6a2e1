"""Registers the train and rollout backends as lazy factories: nothing heavy is imported here, so
``plugrl plugins list`` works without torch, megatron-core or sglang and says what is missing.

Each registration also declares what core needs to know about the backend (its config check, memory
model, how its engines start, the embedded default run); ``plugrl.core.plugin_traits`` lists the traits.
"""

from plugrl.core import hookimpl

from . import megatron_options, sglang_options
from .hf import options as hf_options
from .torch import options as torch_options

TINY = "plugrl.plugins.backends.torch.tiny_default"


@hookimpl
def plugrl_register_train_backends(register):
    register("torch", "plugrl.plugins.backends.torch.trainer:TorchTrainBackend",
             requires=("torch", "transformers"), extra="train",
             description="embedded trainer: HF AutoModelForCausalLM + AdamW, CPU or one GPU",
             check=torch_options.backend_problems,
             default_data=f"{TINY}:default_data", default_checkpoint=f"{TINY}:default_checkpoint")
    register("megatron", "plugrl.plugins.backends.megatron.backend:MegatronTrainBackend",
             requires=("torch", "megatron.core"), extra="megatron",
             description="megatron-core GPTModel with TP/PP/CP, distributed optimizer",
             check=megatron_options.backend_problems, machine_check=megatron_options.machine_problems,
             memory_model="megatron", gpu_bf16_only=True,
             parallel_sizes=megatron_options.parallel_sizes,
             full_dp_steps=True, commands={"convert": "plugrl.plugins.backends.megatron.convert:main"})


@hookimpl
def plugrl_register_rollout_backends(register):
    register("hf", "plugrl.plugins.backends.hf.engine:HFRolloutEngine",
             requires=("torch", "transformers"), extra="train",
             description="embedded engine: transformers generation in-process, CPU or one GPU",
             check=hf_options.backend_problems, engine_pool="actors", drops_released_weights=True)
    register("sglang", "plugrl.plugins.backends.sglang.engine:SGLangRolloutBackend",
             requires=("sglang_router", "httpx"), extra="sglang",
             description="SGLang servers behind the sglang_router",
             check=sglang_options.backend_problems, machine_check=sglang_options.machine_problems,
             drops_released_weights=sglang_options.drops_released_weights,
             engine_pool=sglang_options.engine_pool,
             external_engines=sglang_options.external_engines,
             commands={"serve": "plugrl.plugins.backends.sglang.server:main"})

"""The bundled plugins, one folder per kind: rewards, estimators, filters (dynamic sampling), buffers
(partial-rollout buffer policies), placements, backends (one folder per backend: hf, torch, megatron,
sglang).

Modules that moved in the layout change keep their old import paths: ``import
plugrl.plugins.backends.hf_engine`` yields the module now at ``plugrl.plugins.backends.hf.engine``
(the same module object, so patching either name patches both).

``BUILTIN_MODULES`` is the manifest of built-in plugin modules, in registration order. plugrl's own
distribution declares it as its ``plugrl_builtins`` entry point (pyproject.toml), which is how
``plugrl.core.plugins`` finds it: core imports no plugin module by name.
"""

import importlib
import importlib.abc
import importlib.util
import sys

BUILTIN_MODULES = (
    "plugrl.plugins.rewards.deepscaler",
    "plugrl.plugins.rewards.math_answer",
    "plugrl.plugins.rewards.dapo",
    "plugrl.plugins.rewards.remote_rm",
    "plugrl.plugins.rewards.math_verify_reward",
    "plugrl.plugins.estimators.grpo",
    "plugrl.plugins.estimators.gspo",
    "plugrl.plugins.estimators.reinforce",
    "plugrl.plugins.estimators.rloo",
    "plugrl.plugins.estimators.ppo",
    "plugrl.plugins.estimators.cispo",
    "plugrl.plugins.estimators.dr_grpo",
    "plugrl.plugins.filters.nonzero_std",
    "plugrl.plugins.buffers.fifo",
    "plugrl.plugins.filters.overlong",
    "plugrl.plugins.placements.placement",
    "plugrl.plugins.backends.registrations",
    "plugrl.plugins.backends.torch.options",
    "plugrl.plugins.backends.hf.options",
    "plugrl.plugins.backends.megatron.options",
    "plugrl.plugins.backends.megatron.bridge",
    "plugrl.plugins.backends.sglang.options",
)

MOVED = {
    "plugrl.plugins.backends.hf_batch": "plugrl.plugins.backends.hf.batch",
    "plugrl.plugins.backends.hf_engine": "plugrl.plugins.backends.hf.engine",
    "plugrl.plugins.backends.hf_packed_attention": "plugrl.plugins.backends.hf.packed_attention",
    "plugrl.plugins.backends.hf_pool": "plugrl.plugins.backends.hf.pool",
    "plugrl.plugins.backends.hf_sampling": "plugrl.plugins.backends.hf.sampling",
    "plugrl.plugins.backends.hf_scheduler": "plugrl.plugins.backends.hf.scheduler",
    "plugrl.plugins.backends.hf_weights": "plugrl.plugins.backends.hf.weights",
    "plugrl.plugins.backends.torch_trainer": "plugrl.plugins.backends.torch.trainer",
    "plugrl.plugins.backends.tiny_default": "plugrl.plugins.backends.torch.tiny_default",
    "plugrl.plugins.backends.megatron_options": "plugrl.plugins.backends.megatron.options",
    "plugrl.plugins.backends.sglang_options": "plugrl.plugins.backends.sglang.options",
    "plugrl.plugins.backends.placement": "plugrl.plugins.placements.placement",
    "plugrl.plugins.filters.fifo": "plugrl.plugins.buffers.fifo",
}


class _MovedModuleLoader(importlib.abc.Loader):
    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name])  # the module at its new path, imported once
        self._own_spec = module.__spec__
        return module

    def exec_module(self, module):
        # already executed under its new name; the import system has just set the old name's spec on
        # it: give it back its own, so the module stays the one at its new path in every respect
        module.__spec__ = self._own_spec


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Resolves the old paths in ``MOVED`` (looked up only for those names)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, _MovedModuleLoader())
        return None


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())

"""plugrl: plugin-extensible RL post-training of LLMs. The public face for plugin authors
(docs/plugin-guide.md): the hook marker, the types plugins receive and return, and the base class
or protocol of each plugin kind. Importing it never imports torch."""

from plugrl.core import (  # absolute: pytest imports this file as the rootdir package too
    DuplicatePluginError,
    FilterDecision,
    Group,
    PluginError,
    Sample,
    Status,
    UnknownPluginError,
    hookimpl,
)
from plugrl.core.hookspecs import Register
from plugrl.core.plugin_options import OptionsError, OptionsEstimator
from plugrl.core.protocols import (
    AdvantageEstimator,
    AdvantageInputs,
    BufferPolicy,
    PlacementPlan,
    PlacementRequest,
    RolloutEngine,
    TrainBackend,
)

__version__ = "0.1.0"
__all__ = [
    "hookimpl",
    "Register",
    "Sample",
    "Status",
    "Group",
    "FilterDecision",
    "AdvantageEstimator",
    "OptionsEstimator",
    "OptionsError",
    "AdvantageInputs",
    "BufferPolicy",
    "PlacementPlan",
    "PlacementRequest",
    "RolloutEngine",
    "TrainBackend",
    "PluginError",
    "UnknownPluginError",
    "DuplicatePluginError",
]

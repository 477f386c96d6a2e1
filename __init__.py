"""plugrl: plugin-extensible RL post-training of LLMs. The public face for plugin authors."""

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

__version__ = "0.1.0"
__all__ = [
    "hookimpl",
    "Sample",
    "Status",
    "Group",
    "FilterDecision",
    "PluginError",
    "UnknownPluginError",
    "DuplicatePluginError",
]

"""plugrl core: contracts, plugin loading and the loop. Plugins import from here (or from ``plugrl``)."""

from .hookimpl import PROJECT, hookimpl
from .registry import (
    DuplicatePluginError,
    PluginError,
    UnavailablePluginError,
    UnknownPluginError,
    import_object,
)
from .types import FilterDecision, Group, Sample, Status

__all__ = [
    "PROJECT",
    "hookimpl",
    "Sample",
    "Status",
    "Group",
    "FilterDecision",
    "PluginError",
    "UnknownPluginError",
    "DuplicatePluginError",
    "UnavailablePluginError",
    "import_object",
]

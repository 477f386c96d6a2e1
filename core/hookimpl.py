"""The marker third-party plugins decorate their hook functions with."""

import pluggy

PROJECT = "plugrl"  # pluggy project name == entry-point group == marker name
hookimpl = pluggy.HookimplMarker(PROJECT)

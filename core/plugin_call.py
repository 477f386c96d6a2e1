"""Calls into a plugin that runs inside the rollout manager (a filter, a reward post-processor, the
estimator's reward shaping): an exception there stops the run with one line naming the plugin and
what it raised, instead of Ray's traceback of the actor (``plugrl train`` prints it, exit 1)."""

from __future__ import annotations

import contextlib


class PluginCallError(RuntimeError):
    """A plugin raised while the rollout manager called it; the message names the plugin and the error."""


@contextlib.contextmanager
def calling(what: str):
    """Run the body; turn an exception into ``PluginCallError("<what> raised <Type>: <message>")``."""
    try:
        yield
    except PluginCallError:
        raise
    except Exception as exc:
        raise PluginCallError(f"{what} raised {type(exc).__name__}: {exc}") from exc

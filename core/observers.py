"""The observer hooks (``plugrl_on_rollout_end``, ``plugrl_on_train_step_end``, ``plugrl_on_eval_end``),
called on the driver by the loop, one plugin at a time.

An observer watches the run (a logger, a dashboard); it must not be able to end it or to rewrite it. So
a plugin whose hook raises, returns something other than a dict of numbers, or returns a key the step's
metrics already hold (core's, or an earlier observer's) gets one warning line naming it and what was
wrong, and the run goes on with core's metrics as they were: the rollout just trained is still logged
and checkpointed.
"""

from __future__ import annotations

import numbers
import sys


def observe(hook, rollout_id: int, metrics: dict) -> None:
    """Call every implementation of ``hook`` (in pluggy's order) with a copy of ``metrics``; merge the
    new numeric keys each returns into ``metrics``; warn about, and skip, anything else."""
    for impl in reversed(hook.get_hookimpls()):  # pluggy calls the last registered first
        given = {"rollout_id": rollout_id, "metrics": dict(metrics)}
        where = f"plugin '{impl.plugin_name}' {hook.name} (rollout {rollout_id})"
        try:
            returned = impl.function(**{name: given[name] for name in impl.argnames})
        except Exception as exc:  # an observer's failure is its own: the run's metrics and checkpoints go on
            _warn(f"{where} raised {type(exc).__name__}: {exc}; its metrics are left out of this line")
            continue
        if returned is None:
            continue
        if not isinstance(returned, dict):
            _warn(f"{where} returned a {type(returned).__name__}; an observer returns a dict of metrics or None")
            continue
        for key, value in returned.items():
            if key in metrics:
                _warn(f"{where} returned '{key}', which the step's metrics already hold; kept the existing value "
                      "(name your metrics '<yourplugin>/<name>')")
            elif not isinstance(value, numbers.Real):
                _warn(f"{where} returned '{key}': {value!r} is not a number; left out")
            else:
                metrics[key] = value


def _warn(message: str) -> None:
    print(f"plugrl train: warning: {message}", file=sys.stderr, flush=True)

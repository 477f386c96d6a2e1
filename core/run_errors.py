"""One line for an exception an actor method raised during a run (Ray's ``RayTaskError``), instead of
Ray's traceback of the actor; the full traceback goes to ``{--output-dir}/error.log``.

Runs on the driver, in ``plugrl train`` (``core/train_cli.py``), after the loop has stopped the actors
and closed the metrics file (so every metrics line and checkpoint written so far is kept).
"""

from __future__ import annotations

import os
import re
import traceback

ERROR_LOG = "error.log"

# what the user knows each actor as (the class names are plugrl's, not theirs)
ACTOR_NAMES = {"RolloutManager": "the rollout manager", "TrainWorker": "a train worker"}

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the actor's name in its error text
_TASK_NAME = re.compile(r"ray::(?:(?P<actor>\w+)\.)?(?P<method>\w+)\(\)")


def plain_text(exc: BaseException) -> str:
    """``str(exc)`` without Ray's colour codes."""
    return _ANSI_ESCAPE.sub("", str(exc))


def failed_call(exc: BaseException) -> str:
    """Which actor method raised, in the user's words ("the rollout manager's generate"), from the
    ``ray::Class.method()`` header of Ray's error text (the dual exception class hides ``function_name``)."""
    match = _TASK_NAME.search(plain_text(exc))
    if match is None:
        return "an actor"
    actor, method = match.group("actor"), match.group("method")
    if actor is None:
        return f"the task {method}"
    return f"{ACTOR_NAMES.get(actor, f'the {actor} actor')}'s {method}"


def task_error_line(exc: BaseException) -> str:
    """``<actor>'s <method> raised <Type>: <message>``: the original exception (``exc.cause``), not
    Ray's wrapper text (which holds the whole remote traceback)."""
    cause = getattr(exc, "cause", None)
    if not isinstance(cause, BaseException):
        cause = exc
    message = str(cause).strip().splitlines()
    detail = f"{type(cause).__name__}: {message[0]}" if message else type(cause).__name__
    return f"{failed_call(exc)} raised {detail}"


def write_error_log(output_dir: str, exc: BaseException) -> str | None:
    """Append the remote traceback (Ray's text) and the driver's to ``{output_dir}/error.log``; its path,
    or None when it cannot be written (the one-line message is still printed)."""
    path = os.path.join(output_dir, ERROR_LOG)
    driver = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{plain_text(exc).rstrip()}\n\n--- on the driver ---\n{_ANSI_ESCAPE.sub('', driver)}\n")
    except OSError:
        return None
    return path

"""Checkpoint directories: ``{save}/rollout_{id:06d}/`` plus a ``latest`` pointer, written atomically.

A checkpoint is written into a temporary sibling directory and renamed into place only when
complete, then ``latest`` is replaced atomically; a crash mid-save leaves the last good one intact.
Runs on the driver (the train actor writes its files into the directory it is given).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable

LATEST = "latest"


def checkpoint_dir(root: str, rollout_id: int) -> str:
    return os.path.join(root, f"rollout_{rollout_id:06d}")


def write_checkpoint_atomically(root: str, rollout_id: int, write: Callable[[str], None]) -> str:
    os.makedirs(root, exist_ok=True)
    final = checkpoint_dir(root, rollout_id)
    tmp = tempfile.mkdtemp(prefix=f".rollout_{rollout_id:06d}.", dir=root)
    try:
        write(tmp)
        old = None
        if os.path.exists(final):  # move aside first: at every instant one complete copy exists
            old = tempfile.mkdtemp(prefix=f".old_rollout_{rollout_id:06d}.", dir=root)
            os.rename(final, os.path.join(old, "checkpoint"))
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer_tmp = os.path.join(root, f".{LATEST}.tmp")
    with open(pointer_tmp, "w") as f:
        f.write(os.path.basename(final) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, os.path.join(root, LATEST))
    return final


def find_latest_checkpoint(root: str) -> str | None:
    """The directory named by ``latest`` (or the highest complete ``rollout_*``), else None."""
    if not root or not os.path.isdir(root):
        return None
    pointer = os.path.join(root, LATEST)
    if os.path.exists(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    names = sorted(n for n in os.listdir(root) if n.startswith("rollout_") and os.path.isdir(os.path.join(root, n)))
    return os.path.join(root, names[-1]) if names else None

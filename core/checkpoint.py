"""Checkpoint directories: ``{save}/rollout_{id:06d}/`` plus a ``latest`` pointer, written atomically.

A checkpoint is written into a temporary sibling directory and renamed into place only when
complete, then ``latest`` is replaced atomically; a crash mid-save leaves the last good one intact.
Runs on the driver (the train actor writes its files into the directory it is given). A kill during a
save leaves temp folders that ``clean_interrupted_writes`` removes at the next start.
"""

from __future__ import annotations

import json
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


def find_latest_checkpoint(root: str, *, with_moved_aside: bool = False) -> str | None:
    """The directory named by ``latest`` (or the highest complete ``rollout_*``), else None.
    ``with_moved_aside``: as it will be once ``clean_interrupted_writes`` has put moved-aside copies
    back (``--dry-run`` previews a resume without changing the directory)."""
    if not root or not os.path.isdir(root):
        return None
    found = {n: os.path.join(root, n) for n in os.listdir(root)
             if n.startswith("rollout_") and os.path.isdir(os.path.join(root, n))}
    if with_moved_aside:
        found = {**_moved_aside_copies(root), **found}
    pointer = os.path.join(root, LATEST)
    if os.path.exists(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        if name in found:
            return found[name]
    return found[max(found)] if found else None


def checkpoint_name(path: str) -> str:
    """``rollout_N`` of a checkpoint directory, also of a moved-aside copy (``.old_rollout_N.*/checkpoint``)."""
    if os.path.basename(path) == "checkpoint" and os.path.basename(os.path.dirname(path)).startswith(".old_rollout_"):
        return os.path.basename(os.path.dirname(path))[len(".old_"):].split(".", 1)[0]
    return os.path.basename(path)


def _moved_aside_copies(root: str) -> dict[str, str]:
    """``rollout_N`` -> the copy moved aside while it was being rewritten (``.old_rollout_N.*/checkpoint``),
    for each ``rollout_N`` that is missing: a kill fell between the two renames."""
    copies = {}
    for name in sorted(os.listdir(root)):
        kept = os.path.join(root, name, "checkpoint")
        final = name[len(".old_"):].split(".", 1)[0]
        if name.startswith(".old_rollout_") and os.path.isdir(kept) and not os.path.exists(os.path.join(root, final)):
            copies[final] = kept
    return copies


def stopped_run_hint(output_dir: str, save: str | None) -> str:
    """What a stopped run (killed actor, Ctrl-C) leaves and how it goes on: its metrics file, the last
    checkpoint in ``--save`` and the ``--load`` that resumes after it (checkpoints are written atomically,
    so a cut save leaves the one before)."""
    kept = f"Metrics so far are in {output_dir}/metrics.jsonl"
    latest = find_latest_checkpoint(save) if save else None
    if latest:
        # the same --output-dir keeps one metrics history (its later lines are set aside on resume)
        return (f"{kept}; the last checkpoint is {latest} (after rollout {checkpoint_rollout_id(latest)}): "
                f"resume with --load {save} --output-dir {output_dir}.")
    if save:
        return f"{kept}; no checkpoint had been written to {save} yet."
    return f"{kept}; no checkpoints: pass --save DIR --save-interval N to be able to resume."


def clean_interrupted_writes(root: str) -> list[str]:
    """Tidy ``root`` after a kill during a save (call at start, before anything writes there): temp
    folders of unfinished checkpoints (``.rollout_*``, ``.train_rollout_*``) and the pointer's temp
    file are removed; a moved-aside old copy (``.old_rollout_N.*``) is put back when ``rollout_N`` is
    missing (the kill fell between the two renames), else removed. Returns what it changed."""
    if not root or not os.path.isdir(root):
        return []
    changed = []
    for final, kept in _moved_aside_copies(root).items():
        os.rename(kept, os.path.join(root, final))
        changed.append(f"restored {final} from {os.path.basename(os.path.dirname(kept))}")
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.startswith(".old_rollout_") and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            changed.append(f"removed {name}")
        elif name.startswith((".rollout_", ".train_rollout_")) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            changed.append(f"removed {name}")
        elif name == f".{LATEST}.tmp":
            os.unlink(path)
            changed.append(f"removed {name}")
    return changed


def delete_checkpoints(root: str) -> list[str]:
    """``--overwrite-save``: remove every finished checkpoint and the ``latest`` pointer from ``root``."""
    if not root or not os.path.isdir(root):
        return []
    removed = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.startswith("rollout_") and os.path.isdir(path):
            shutil.rmtree(path)
            removed.append(name)
        elif name == LATEST:
            os.unlink(path)
            removed.append(name)
    return removed


def checkpoint_damage(path: str) -> str | None:
    """What is wrong with a finished checkpoint directory, or None when it looks whole: ``meta.json`` and
    ``rollout_state.json`` must parse, and every ``*.pt`` must be a complete torch zip archive (its central
    directory is written last, so a cut file has none). Checked on the driver before a resume; cheap
    (reads no tensor). Our own writes are atomic, so damage means the files were changed afterwards."""
    import zipfile

    if checkpoint_rollout_id(path) is None:
        return "its meta.json is missing or unreadable"
    try:
        with open(os.path.join(path, "rollout_state.json")) as f:
            json.load(f)
    except (OSError, ValueError):
        return "its rollout_state.json is missing or unreadable"
    for folder, _dirs, names in sorted(os.walk(path)):  # a backend may write into sub-folders (megatron/)
        for name in sorted(names):
            file = os.path.join(folder, name)
            shown = os.path.relpath(file, path)
            if name.endswith(".pt") and not zipfile.is_zipfile(file):
                return f"its {shown} is cut short or damaged (not a complete torch archive)"
            if name.endswith(".json") and folder != path:
                try:
                    with open(file) as f:
                        json.load(f)
                except (OSError, ValueError):
                    return f"its {shown} is unreadable"
    return None


def newest_whole_checkpoint(root: str) -> str | None:
    """The highest ``rollout_*`` of ``root`` without ``checkpoint_damage``, else None."""
    names = sorted((n for n in os.listdir(root) if n.startswith("rollout_") and os.path.isdir(os.path.join(root, n))),
                   reverse=True) if root and os.path.isdir(root) else []
    return next((os.path.join(root, n) for n in names if checkpoint_damage(os.path.join(root, n)) is None), None)


def checkpoint_rollout_id(path: str) -> int | None:
    """The rollout id a checkpoint directory was saved after (its ``meta.json``), None if unreadable."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            return int(json.load(f)["rollout_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


LOCK_NAME = ".plugrl-run.lock"


class SaveDirLock:
    """Held by the driver for a whole run so that two runs never write checkpoints into one ``--save``
    (their ``rollout_*`` folders would interleave, and the second one's start-up tidying would delete the
    first one's checkpoint in progress). An OS file lock (``flock``): it goes away with the process, so a
    killed run leaves nothing to clean up. On a filesystem without locks the run goes on unguarded."""

    def __init__(self, root: str):
        self.path = os.path.join(root, LOCK_NAME)
        self._file = None

    def holder(self) -> str | None:
        """Who holds the lock now (without taking it), or None."""
        import fcntl

        try:
            f = open(self.path)  # noqa: SIM115
        except OSError:  # no lock file, or unreadable: nobody to name
            return None
        with f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return f.read().strip() or "another process"
            except OSError:
                return None
            return None

    def acquire(self, owner: str) -> str | None:
        """Take the lock; None when taken (or when this filesystem cannot lock or be written: the run goes on
        unguarded, and the save itself reports an unwritable directory), else who holds it."""
        import fcntl

        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            f = open(self.path, "a+")  # noqa: SIM115 (held open for the run)
        except OSError:
            return None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            return holder
        except OSError:  # no locking on this filesystem (some network mounts)
            f.close()
            return None
        f.seek(0)
        f.truncate()
        f.write(owner + "\n")
        f.flush()
        self._file = f
        return None

    @property
    def held(self) -> bool:
        return self._file is not None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None


def lock_run_dirs(load: str | None, save: str | None, owner: str) -> tuple[list[SaveDirLock], str | None]:
    """Lock ``--save`` for this run. ``--load`` is not locked: it may be a shared first-weights directory many
    runs start from, or read-only; a run still writing checkpoints into it holds it as its own ``--save``, so
    a resume from it while that run lives is refused here too (``load``, when it holds checkpoints). Returns
    the locks taken and, when another run holds one, the problem."""
    locks: list[SaveDirLock] = []
    if save:
        lock = SaveDirLock(save)
        holder = lock.acquire(owner)
        if holder is not None:
            return [], (f"--save {save} is in use by another run ({holder}): two runs would mix their checkpoints; "
                        "wait for it to end, or give this run another --save")
        if lock.held:
            locks.append(lock)
    from .preflight import same_dir

    if load and not (save and same_dir(load, save)) and find_latest_checkpoint(load) is not None:
        probe = SaveDirLock(load)
        holder = probe.holder()
        if holder is not None:
            for taken in locks:
                taken.release()
            return [], (f"--load {load} is the --save of a run still writing checkpoints there ({holder}); wait "
                        "for it to end, or resume from it afterwards")
    return locks, None

"""Driver checks of the checkpoint a ``--load`` run resumes from, before anything in the run's directories
changes (``prepare_dirs`` renames metrics files and tidies ``--save`` only after these pass).

Checkpoints are written atomically, so a damaged one was changed afterwards (a disk fault, a copy cut
short, a file deleted by hand): resuming from it would fail in the train actor after Ray and the model
started, or, without its ``meta.json``, silently start the run over. The prompt data must also still hold
the data cursor the checkpoint saved (a smaller file would fail in the rollout manager).
"""

from __future__ import annotations

import json
import os


def resume_problems(args) -> list[str]:
    """Problems of the checkpoint ``--load`` resumes from: damaged, or saved past the end of today's data."""
    load = getattr(args, "load", None)
    if not load or not os.path.isdir(load):
        return []
    from .checkpoint import checkpoint_damage, checkpoint_name, find_latest_checkpoint

    latest = find_latest_checkpoint(load, with_moved_aside=True)
    if latest is None:
        return []
    damage = checkpoint_damage(latest)
    if damage:
        return [damaged_checkpoint_problem(load, latest, damage)]
    cursor = _saved_cursor(latest)
    if cursor is None or not getattr(args, "prompt_data", None):
        return []
    offset, saved_size = cursor
    prompts = _row_count(args)
    if prompts is None or offset <= prompts:
        return []
    # (rows as parsed, before --rollout-max-prompt-len: tokenizing a large file on every resume costs too much,
    # and a cursor past the parsed rows is past the filtered ones too)
    return [f"--load {load}: {checkpoint_name(latest)} was saved {offset} prompts into an epoch of {saved_size} "
            f"prompts, but --prompt-data {args.prompt_data} now has {prompts}; resume with the prompt data it was "
            "saved with, or start a new run (another --save, no --load)"]


def _row_count(args) -> int | None:
    """Prompts ``--prompt-data`` parses to (no tokenizer: before any length filter); None when unreadable (the
    data checks report that)."""
    from .data import load_prompt_dataset

    try:
        return len(load_prompt_dataset(args.prompt_data, input_key=args.input_key, label_key=args.label_key,
                                       skip_bad_rows=bool(getattr(args, "skip_bad_rows", False))))
    except Exception:  # noqa: BLE001 - DataError, OSError, parquet errors: data_problems names them
        return None


def damaged_checkpoint_problem(load: str, latest: str, damage: str) -> str:
    """What to do about a damaged newest checkpoint: move it aside to resume from the newest whole one."""
    from .checkpoint import checkpoint_name, newest_whole_checkpoint

    name = checkpoint_name(latest)
    whole = newest_whole_checkpoint(load)
    move = f"move it out of the way (mv {latest} {os.path.join(load, 'damaged_' + name)})"
    then = (f" to resume from {checkpoint_name(whole)}, the newest whole checkpoint there" if whole and whole != latest
            else "; no whole checkpoint is left there, so the run would start over (or restore the files)")
    return f"--load {load}: the checkpoint to resume from, {name}, is damaged: {damage}; {move}{then}"


def _saved_cursor(path: str) -> tuple[int, int | None] | None:
    """(offset, dataset size) of the data cursor saved in a checkpoint, None when it holds none."""
    try:
        with open(os.path.join(path, "rollout_state.json")) as f:
            source = json.load(f).get("data_source") or {}
        return int(source["offset"]), source.get("dataset_size")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None

"""Checkpoint directories (``plugrl.core.checkpoint``): atomic writes, the ``latest`` pointer and its
fallback. Fast, no Ray: the writer callback stands in for the train actor and the rollout manager."""

import os

import pytest

from plugrl.core.checkpoint import (
    LATEST,
    checkpoint_dir,
    find_latest_checkpoint,
    write_checkpoint_atomically,
)


def writer(**files):
    """A ``write(tmp_dir)`` callback that writes ``{name: text}`` files."""

    def write(tmp_dir):
        for name, text in files.items():
            with open(os.path.join(tmp_dir, name), "w") as f:
                f.write(text)

    return write


def read_tree(path):
    return {name: open(os.path.join(path, name)).read() for name in sorted(os.listdir(path))}


def pointer(root):
    return open(os.path.join(root, LATEST)).read().strip()


def hidden_leftovers(root):
    """Temp dirs / pointer temp files a finished (or failed) write must not leave behind."""
    return sorted(n for n in os.listdir(root) if n.startswith("."))


class Boom(RuntimeError):
    pass


# ---- writing --------------------------------------------------------------------------------------


def test_write_creates_dir_and_points_latest(tmp_path):
    root = str(tmp_path / "ckpt")  # does not exist yet
    path = write_checkpoint_atomically(root, 7, writer(**{"train_state.pt": "w7", "meta.json": "{}"}))
    assert path == checkpoint_dir(root, 7) == os.path.join(root, "rollout_000007")
    assert read_tree(path) == {"meta.json": "{}", "train_state.pt": "w7"}
    assert pointer(root) == "rollout_000007"
    assert find_latest_checkpoint(root) == path
    assert hidden_leftovers(root) == []


def test_later_checkpoint_moves_latest_and_keeps_earlier(tmp_path):
    root = str(tmp_path)
    first = write_checkpoint_atomically(root, 1, writer(a="1"))
    second = write_checkpoint_atomically(root, 3, writer(a="3"))
    assert pointer(root) == "rollout_000003"
    assert find_latest_checkpoint(root) == second
    assert read_tree(first) == {"a": "1"} and read_tree(second) == {"a": "3"}


@pytest.mark.parametrize("exc", [Boom("disk full"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_failing_writer_leaves_previous_checkpoint_and_latest_intact(tmp_path, exc):
    root = str(tmp_path)
    good = write_checkpoint_atomically(root, 3, writer(**{"train_state.pt": "good", "meta.json": "m3"}))
    seen = {}

    def half_write(tmp_dir):
        seen["tmp"] = tmp_dir
        with open(os.path.join(tmp_dir, "train_state.pt"), "w") as f:
            f.write("partial")
        # mid-way: the temp dir is not visible as a checkpoint
        assert find_latest_checkpoint(root) == good
        assert not os.path.basename(tmp_dir).startswith("rollout_")
        raise exc

    with pytest.raises(type(exc)):
        write_checkpoint_atomically(root, 5, half_write)
    assert not os.path.exists(checkpoint_dir(root, 5)), "a partial checkpoint became visible"
    assert not os.path.exists(seen["tmp"]), "the temp dir was not cleaned up"
    assert hidden_leftovers(root) == []
    assert pointer(root) == "rollout_000003"
    assert find_latest_checkpoint(root) == good
    assert read_tree(good) == {"meta.json": "m3", "train_state.pt": "good"}
    assert sorted(os.listdir(root)) == [LATEST, "rollout_000003"]


def test_failing_first_write_leaves_nothing(tmp_path):
    root = str(tmp_path / "ckpt")

    def fail(tmp_dir):
        raise Boom("no")

    with pytest.raises(Boom):
        write_checkpoint_atomically(root, 0, fail)
    assert os.listdir(root) == []
    assert find_latest_checkpoint(root) is None


def test_overwriting_the_same_rollout_id_replaces_it_entirely(tmp_path):
    root = str(tmp_path)
    write_checkpoint_atomically(root, 4, writer(**{"train_state.pt": "old", "stale.txt": "x"}))
    path = write_checkpoint_atomically(root, 4, writer(**{"train_state.pt": "new"}))
    assert path == checkpoint_dir(root, 4)
    assert read_tree(path) == {"train_state.pt": "new"}, "files of the old checkpoint survived the overwrite"
    assert pointer(root) == "rollout_000004"
    assert hidden_leftovers(root) == []


def test_failed_overwrite_keeps_the_old_same_id_checkpoint(tmp_path):
    root = str(tmp_path)
    write_checkpoint_atomically(root, 4, writer(**{"train_state.pt": "old"}))

    def fail(tmp_dir):
        writer(**{"train_state.pt": "new-partial"})(tmp_dir)
        raise Boom("crash while overwriting")

    with pytest.raises(Boom):
        write_checkpoint_atomically(root, 4, fail)
    assert read_tree(checkpoint_dir(root, 4)) == {"train_state.pt": "old"}
    assert pointer(root) == "rollout_000004"
    assert hidden_leftovers(root) == []


def test_overwriting_an_older_id_points_latest_back_to_it(tmp_path):
    # A run resumed from an older checkpoint re-saves that id: `latest` follows the newest write.
    root = str(tmp_path)
    write_checkpoint_atomically(root, 2, writer(a="2"))
    write_checkpoint_atomically(root, 4, writer(a="4"))
    path = write_checkpoint_atomically(root, 2, writer(a="2b"))
    assert pointer(root) == "rollout_000002"
    assert find_latest_checkpoint(root) == path
    assert read_tree(path) == {"a": "2b"}


# ---- finding ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("root", [None, ""])
def test_find_latest_without_a_root(root):
    assert find_latest_checkpoint(root) is None


def test_find_latest_missing_or_empty_dir(tmp_path):
    assert find_latest_checkpoint(str(tmp_path / "nope")) is None
    assert find_latest_checkpoint(str(tmp_path)) is None


def test_find_latest_follows_the_pointer_not_the_highest_id(tmp_path):
    root = tmp_path
    for rid in (1, 5, 9):
        (root / f"rollout_{rid:06d}").mkdir()
    (root / LATEST).write_text("rollout_000005\n")
    assert find_latest_checkpoint(str(root)) == str(root / "rollout_000005")


def test_find_latest_pointer_tolerates_surrounding_whitespace(tmp_path):
    (tmp_path / "rollout_000002").mkdir()
    (tmp_path / LATEST).write_text("  rollout_000002 \n\n")
    assert find_latest_checkpoint(str(tmp_path)) == str(tmp_path / "rollout_000002")


def test_find_latest_without_pointer_takes_highest_rollout_dir(tmp_path):
    for rid in (3, 12, 7):
        (tmp_path / f"rollout_{rid:06d}").mkdir()
    (tmp_path / ".rollout_000099.abc").mkdir()  # a temp dir of an interrupted write
    (tmp_path / "rollout_000050").write_text("a file, not a checkpoint")
    (tmp_path / "other").mkdir()
    assert find_latest_checkpoint(str(tmp_path)) == str(tmp_path / "rollout_000012")


def test_find_latest_dangling_pointer_falls_back_to_highest(tmp_path):
    (tmp_path / "rollout_000004").mkdir()
    (tmp_path / "rollout_000006").mkdir()
    (tmp_path / LATEST).write_text("rollout_000010\n")  # deleted by hand, say
    assert find_latest_checkpoint(str(tmp_path)) == str(tmp_path / "rollout_000006")


def test_find_latest_dangling_pointer_and_no_dirs(tmp_path):
    (tmp_path / LATEST).write_text("rollout_000010\n")
    assert find_latest_checkpoint(str(tmp_path)) is None


def test_find_latest_ignores_temp_dirs_only(tmp_path):
    (tmp_path / ".rollout_000001.xyz").mkdir()
    assert find_latest_checkpoint(str(tmp_path)) is None


def test_checkpoint_dir_names_sort_numerically(tmp_path):
    names = [os.path.basename(checkpoint_dir(str(tmp_path), rid)) for rid in (2, 10, 100, 999999)]
    assert names == sorted(names)
    assert names[0] == "rollout_000002"


def test_colocated_save_moves_the_staged_train_state_into_the_checkpoint(tmp_path, monkeypatch):
    """Colocated GPU runs write the trainer's files right after training (before it offloads) and
    complete the checkpoint after the metrics line: the staged files end up in it, nothing hidden
    is left, and the checkpoint is invisible until then."""
    import types

    import ray
    from plugrl.core import loop

    class Train:
        def __init__(self):
            self.weights = "step-3 weights"

        def save(self, path):
            with open(os.path.join(path, "train_state.pt"), "w") as f:
                f.write(self.weights)

    rollout_state = types.SimpleNamespace(remote=lambda before_rollout: {"next_rollout": before_rollout})
    cluster = types.SimpleNamespace(train=Train(), rollout=types.SimpleNamespace(state_dict=rollout_state))
    monkeypatch.setattr(ray, "get", lambda value: value)  # the fake rollout manager answers directly
    args = types.SimpleNamespace(save=str(tmp_path / "ckpt"), seed=1)
    staged = loop._stage_train_state(cluster, args, 3)
    cluster.train.weights = "offloaded (never read again)"
    assert find_latest_checkpoint(args.save) is None  # staged, not visible
    loop._save(cluster, args, 3, staged)
    path = find_latest_checkpoint(args.save)
    assert path == checkpoint_dir(args.save, 3)
    assert read_tree(path)["train_state.pt"] == "step-3 weights"
    assert set(read_tree(path)) == {"train_state.pt", "rollout_state.json", "meta.json"}
    assert '"next_rollout": 4' in read_tree(path)["rollout_state.json"]
    assert hidden_leftovers(args.save) == []

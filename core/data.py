"""Prompt datasets (``--prompt-data``, ``--eval-prompt-data``) and the data source that turns them into groups.

Everything here runs in the **rollout manager process** (a CPU Ray actor): it loads the prompt file
once at start-up, and the rollout loop asks ``PromptDataSource.next_groups(k)`` for the next ``k``
prompt groups every rollout. Semantics follow slime's ``slime/utils/data.py::Dataset`` and
``slime/rollout/data_source.py::RolloutDataSource`` (reference §2.1, §2.2, §2.10), with one deliberate
difference: a malformed row is a loud ``DataError`` naming the file and line (slime prints and skips
undecodable lines and raises a bare ``KeyError`` for missing keys); ``skip_bad_rows=True``
(``--skip-bad-rows``) restores skipping, with the skipped rows counted per reason.

Supported inputs: ``.jsonl`` (one JSON object per non-empty line), ``.parquet`` (pyarrow), and a
HuggingFace ``datasets`` directory written by ``save_to_disk`` (``dir`` or ``dir:split``). Any of them may
carry a row slice ``path@[start:end]`` (Python slice semantics; either bound optional, negatives allowed).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from .types import Sample

logger = logging.getLogger(__name__)

SUPPORTED_FORMATS = ".jsonl, .parquet, or a directory written by datasets' save_to_disk (dir or dir:split)"
SKIP_HINT = "or pass --skip-bad-rows to skip such rows"

# slime's default --rollout-seed
DEFAULT_SEED = 42


class DataError(ValueError):
    """A prompt file (or one of its rows) cannot be used; the message names the file, the row and the fix.

    ``path``, ``line`` (1-based line for jsonl, row for parquet/datasets; None for file-level problems)
    and ``reason`` (the key used in ``PromptDataset.skipped``) are kept for programmatic use.
    """

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None, reason: str | None = None):
        super().__init__(message)
        self.path = path
        self.line = line
        self.reason = reason


# ---------------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------------


class PromptDataset:
    """The prompts of one file, as ``Sample(prompt, label, metadata)`` in file order (after slicing/filtering).

    ``samples`` is the current order (file order until ``shuffle`` is called); ``original_samples``
    keeps the file order, so every epoch's order is a permutation of the same base (as in slime).
    ``skipped`` counts rows skipped with ``--skip-bad-rows`` per reason; ``dropped_too_long`` counts rows
    dropped by ``max_prompt_len``.
    """

    def __init__(
        self,
        samples: list[Sample],
        *,
        path: str,
        skipped: dict[str, int] | None = None,
        dropped_too_long: int = 0,
        source_lines: list[int] | None = None,
    ):
        self.path = path
        # the file line (jsonl) or row (parquet, datasets) of each of ``original_samples``, for messages
        self.source_lines: tuple[int, ...] = tuple(source_lines or ())
        self.original_samples: tuple[Sample, ...] = tuple(samples)
        self.samples: list[Sample] = list(samples)
        self.skipped: dict[str, int] = dict(skipped or {})
        self.dropped_too_long = dropped_too_long

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __repr__(self) -> str:
        return f"PromptDataset({self.path!r}, {len(self)} prompts)"

    def permutation(self, epoch: int, seed: int = DEFAULT_SEED) -> list[int]:
        """Indices into ``original_samples`` for ``epoch``: slime's ``random.seed(seed + epoch)`` then
        ``random.shuffle`` of ``range(n)``. A local ``Random`` gives the same sequence as the global
        generator seeded with the same int, without disturbing anyone else's global random state."""
        order = list(range(len(self.original_samples)))
        random.Random(seed + epoch).shuffle(order)
        return order

    def shuffle(self, epoch: int, seed: int = DEFAULT_SEED) -> None:
        """Reorder ``samples`` to epoch ``epoch``'s order (always from the file order, so it is
        idempotent and independent of earlier calls)."""
        self.samples = [self.original_samples[i] for i in self.permutation(epoch, seed)]


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------

_SLICE_RE = re.compile(r"^(?P<path>.*)@\[(?P<start>[^:\]]*):(?P<end>[^:\]]*)\]$")


def parse_spec(spec: str) -> tuple[str, int | None, int | None]:
    """Split ``path@[start:end]`` into ``(path, start, end)``; bounds are ints or None."""
    spec = str(spec)
    if "@[" not in spec:
        return spec, None, None
    m = _SLICE_RE.match(spec)
    if m is None:
        raise DataError(
            f"cannot parse the row slice in {spec!r}; write it as path@[start:end] "
            f"(either bound optional, e.g. data.jsonl@[0:100] or data.jsonl@[-50:])",
            path=spec,
        )

    def bound(text: str) -> int | None:
        text = text.strip()
        if not text:
            return None
        try:
            return int(text)
        except ValueError:
            raise DataError(f"slice bound {text!r} in {spec!r} is not an integer", path=spec) from None

    return m.group("path"), bound(m.group("start")), bound(m.group("end"))


def _slice(rows: Iterable, start: int | None, end: int | None) -> Iterable:
    """Python slice over a row stream. Non-negative bounds stream (and stop early); a negative bound
    needs the row count, so the stream is materialised first (as slime does)."""
    if (start is None or start >= 0) and (end is None or end >= 0):
        return itertools.islice(rows, start or 0, end)
    return list(rows)[start:end]


def _jsonl_rows(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) for every non-empty line. Decoding happens after slicing, so a
    bad line outside the requested slice never matters, and the caller decides between raise and skip."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield lineno, raw


def _decode_jsonl_line(raw: bytes) -> tuple[Any, str | None]:
    try:
        text = raw.decode("utf-8").strip()  # without the newline, a JSON error's column is on this line
    except UnicodeDecodeError as e:
        return None, f"line is not valid UTF-8 ({e.reason} at byte {e.start})"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at column {e.colno})"


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq  # only when a parquet file is used

    rownum = 0
    for batch in pq.ParquetFile(path).iter_batches():  # streamed: large files never load whole
        for row in batch.to_pylist():
            rownum += 1
            yield rownum, row


def _load_hf_dataset(path: Path, split: str | None, display: str):
    import datasets  # only when a saved datasets directory is used

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise DataError(f"{display}: cannot load it with datasets.load_from_disk: {e}", path=display) from e
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds.keys())
        if split is None:
            if splits == ["train"]:
                return ds["train"]
            raise DataError(
                f"{display} holds a DatasetDict with splits {splits}; name one as {path}:SPLIT "
                f"(e.g. {path}:{splits[0] if splits else 'train'})",
                path=display,
            )
        if split not in ds:
            raise DataError(f"{display}: no split {split!r}; available splits: {splits}", path=display)
        return ds[split]
    if split is not None:
        raise DataError(f"{display} is a single Dataset, not a DatasetDict; drop the ':{split}' suffix", path=display)
    return ds


def _hf_rows(ds) -> Iterator[tuple[int, dict]]:
    for i, row in enumerate(ds):
        yield i + 1, row


def _resolve(path_text: str) -> tuple[str, Path, str | None]:
    """(format, path, split). ``dir:split`` names a split of a saved DatasetDict."""
    path = Path(path_text)
    split = None
    if not path.exists() and ":" in path_text:
        head, _, tail = path_text.rpartition(":")
        if head and Path(head).is_dir():
            path, split = Path(head), tail
    if path.is_dir():
        return "datasets", path, split
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".parquet"):
        raise DataError(
            f"unsupported prompt data file {path_text!r} (suffix {suffix or 'none'!r}); supported: {SUPPORTED_FORMATS}",
            path=path_text,
        )
    if not path.is_file():
        raise DataError(f"prompt data file not found: {path_text}", path=path_text)
    return suffix[1:], path, split


def _is_messages(prompt: Any) -> bool:
    return (
        isinstance(prompt, list)
        and len(prompt) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)
    )


def _keys_hint(row: dict) -> str:
    keys = list(row.keys())
    shown = ", ".join(repr(k) for k in keys[:10]) + (", ..." if len(keys) > 10 else "")
    return f"the row has keys [{shown}]"


def load_prompt_dataset(
    spec: str,
    *,
    input_key: str = "input",
    label_key: str | None = None,
    metadata_key: str = "metadata",
    tool_key: str = "tools",
    apply_chat_template: bool = False,
    tokenizer: Any = None,
    apply_chat_template_kwargs: dict | None = None,
    max_prompt_len: int | None = None,
    skip_bad_rows: bool = False,
) -> PromptDataset:
    """Read ``spec`` (``path[@[start:end]]``) into a ``PromptDataset``. Runs once in the rollout manager
    at start-up (and for each eval dataset).

    Per row (slime §2.1): ``prompt = row[input_key]``; with ``apply_chat_template`` a string prompt becomes
    one user message and the messages are rendered with ``tokenizer.apply_chat_template(..., tools=...,
    tokenize=False, add_generation_prompt=True, **apply_chat_template_kwargs)``; ``label = row[label_key]``
    when ``label_key`` is given; ``metadata = row.get(metadata_key) or {}`` (a dict); tools (a list, or a JSON
    string of one) go to ``metadata["tools"]`` and to the chat template. ``max_prompt_len`` drops string
    prompts longer than that many tokens (``add_special_tokens=False``), keeping order.
    """
    path_text, start, end = parse_spec(spec)
    if (apply_chat_template or max_prompt_len is not None) and tokenizer is None:
        what = "--apply-chat-template" if apply_chat_template else "--rollout-max-prompt-len"
        raise ValueError(f"{what} needs a tokenizer (pass --hf-checkpoint) to load {spec!r}")
    template_kwargs = dict(apply_chat_template_kwargs or {})
    fmt, path, split = _resolve(path_text)
    display = path_text  # the name the user typed, so the message matches their command line
    unit = "line" if fmt == "jsonl" else "row"

    if fmt == "jsonl":
        raw_rows: Iterable = _jsonl_rows(path)
    elif fmt == "parquet":
        raw_rows = _parquet_rows(path)
    else:
        raw_rows = _hf_rows(_load_hf_dataset(path, split, display))

    skipped: Counter[str] = Counter()
    samples: list[Sample] = []
    lines: list[int] = []  # the line of each sample
    rows_read = 0

    lineno = 0

    def bad(reason: str, problem: str, fix: str) -> None:
        """Count the current row as skipped, or raise naming the file, the row and the fix."""
        if skip_bad_rows:
            skipped[reason] += 1
            return
        raise DataError(
            f"{display}, {unit} {lineno}: {problem}; {fix}, {SKIP_HINT}", path=display, line=lineno, reason=reason
        )

    for lineno, row in _slice(raw_rows, start, end):
        rows_read += 1

        if fmt == "jsonl":
            row, err = _decode_jsonl_line(row)
            if err is not None:
                bad("invalid_json", err, "fix or remove the line")
                continue
        if not isinstance(row, dict):
            bad(
                "not_an_object",
                f"expected a JSON object, got {type(row).__name__}",
                f'each {unit} must be one object such as {{"{input_key}": "..."}}',
            )
            continue
        if input_key not in row:
            bad("missing_input_key", f"no key {input_key!r} ({_keys_hint(row)})", "pass --input-key to name the prompt field")
            continue
        if label_key is not None and label_key not in row:
            bad(
                "missing_label_key",
                f"no key {label_key!r} ({_keys_hint(row)})",
                "pass --label-key to name the label field (or leave it unset if the reward needs no label)",
            )
            continue
        prompt = row[input_key]
        if not isinstance(prompt, str) and not _is_messages(prompt):
            bad(
                "bad_prompt_type",
                f"{input_key!r} must be a string or a non-empty list of {{'role', 'content'}} messages, "
                f"got {type(prompt).__name__}",
                "fix the data or pass --input-key to name another field",
            )
            continue
        metadata = row.get(metadata_key) or {}
        if not isinstance(metadata, dict):
            bad(
                "bad_metadata_type",
                f"{metadata_key!r} must be an object (dict), got {type(metadata).__name__}",
                "fix the data or pass --metadata-key to name another field",
            )
            continue
        metadata = dict(metadata)  # never alias the row (or a datasets cache) into the sample
        tools = row.get(tool_key)
        if tools is not None:
            if isinstance(tools, str):
                try:
                    tools = json.loads(tools)
                except json.JSONDecodeError as e:
                    bad("bad_tools", f"{tool_key!r} is a string but not valid JSON ({e.msg})", "fix the data")
                    continue
            if not isinstance(tools, list):
                bad("bad_tools", f"{tool_key!r} must be a list of tool specs, got {type(tools).__name__}", "fix the data")
                continue
            metadata["tools"] = tools

        if apply_chat_template:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            try:
                prompt = tokenizer.apply_chat_template(
                    messages, tools=tools, tokenize=False, add_generation_prompt=True, **template_kwargs
                )
            except Exception as e:  # noqa: BLE001 - a template error is the row's problem; name the row
                bad("chat_template_error", f"the chat template failed: {type(e).__name__}: {e}", "fix the row or the template")
                continue
        label = row[label_key] if label_key is not None else None
        samples.append(Sample(prompt=prompt, label=label, metadata=metadata))
        lines.append(lineno)

    dropped = 0
    if max_prompt_len is not None:
        line_of = {id(s): line for s, line in zip(samples, lines)}
        samples, dropped = _drop_long_prompts(samples, tokenizer, max_prompt_len)
        lines = [line_of[id(s)] for s in samples]

    if skipped:
        logger.warning("%s: skipped %d bad rows %s", display, sum(skipped.values()), dict(skipped))
    if dropped:
        logger.info("%s: dropped %d prompts longer than %d tokens", display, dropped, max_prompt_len)
    if not samples:
        parts = [f"{rows_read} {unit}s read"]
        if skipped:
            parts.append(f"skipped as bad: {dict(skipped)}")
        if dropped:
            parts.append(f"{dropped} longer than --rollout-max-prompt-len {max_prompt_len}")
        raise DataError(f"{display}: no prompts left ({'; '.join(parts)})", path=display)
    return PromptDataset(samples, path=display, skipped=dict(skipped), dropped_too_long=dropped, source_lines=lines)


def chat_prompt_ids(tokenizer: Any, messages: list) -> list[int]:
    """A message prompt's token ids through the tokenizer's chat template, with the generation prompt.
    transformers 5 returns a ``BatchEncoding`` (a Mapping, not a dict) where 4.x returned the ids."""
    from collections.abc import Mapping

    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)


def string_prompt_lengths(tokenizer: Any, texts: list[str], chunk: int = 1024) -> list[int]:
    """Token counts of string prompts (no special tokens, as they are generated from), tokenized in chunks:
    batched calls are much faster than one per row, and only the counts are kept."""
    lengths: list[int] = []
    for lo in range(0, len(texts), chunk):
        lengths += [len(ids) for ids in tokenizer(texts[lo : lo + chunk], add_special_tokens=False)["input_ids"]]
    return lengths


def _drop_long_prompts(samples: list[Sample], tokenizer: Any, max_len: int, chunk: int = 1024) -> tuple[list[Sample], int]:
    """Drop string prompts with more than ``max_len`` tokens (slime's ``filter_long_prompt``; message
    prompts are kept). Tokenised in chunks: batched calls are much faster than one call per row."""
    string_rows = [i for i, s in enumerate(samples) if isinstance(s.prompt, str)]
    lengths = string_prompt_lengths(tokenizer, [samples[i].prompt for i in string_rows], chunk)
    too_long = {i for i, n in zip(string_rows, lengths) if n > max_len}
    return [s for i, s in enumerate(samples) if i not in too_long], len(too_long)


def load_eval_datasets(pairs: list[str] | None, **kwargs: Any) -> dict[str, PromptDataset]:
    """``--eval-prompt-data NAME PATH [NAME PATH ...]`` -> ``{name: dataset}`` (rollout manager, start-up).

    A single PATH is named ``aime``, as slime does. ``kwargs`` go to ``load_prompt_dataset`` (the caller
    resolves eval-specific keys such as ``--eval-input-key`` before calling).
    """
    pairs = list(pairs or [])
    if not pairs:
        return {}
    if len(pairs) == 1:
        pairs = ["aime", pairs[0]]
    if len(pairs) % 2:
        raise ValueError(
            f"--eval-prompt-data takes NAME PATH pairs (or one PATH), got {len(pairs)} values: {pairs}"
        )
    out: dict[str, PromptDataset] = {}
    for name, spec in zip(pairs[0::2], pairs[1::2]):
        if name in out:
            raise ValueError(f"--eval-prompt-data names {name!r} twice; give each eval dataset its own name")
        out[name] = load_prompt_dataset(spec, **kwargs)
    return out


# ---------------------------------------------------------------------------------------------------
# The data source
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Cursor:
    epoch: int = 0
    offset: int = 0
    group_index: int = 0  # the next group's group_index
    sample_index: int = 0  # the next sample's index


class PromptDataSource:
    """The rollout manager's cursor over a ``PromptDataset`` (slime's ``RolloutDataSource``).

    ``next_groups(k)`` returns the next ``k`` prompts of the current epoch's order, each as a group of
    ``n_samples_per_prompt`` deep copies numbered with ever-increasing ``group_index`` / ``index``. At the
    end of an epoch it takes the tail, moves to the next epoch (reshuffled with ``seed + epoch`` when
    ``shuffle``) and continues from its head. ``state_dict()`` / ``load_state_dict()`` checkpoint the cursor
    so a resumed run sees exactly the prompts an uninterrupted run would have seen.

    ``dataset=None`` (``--disable-rollout-global-dataset`` or no ``--prompt-data``) yields empty
    ``Sample()``s, as slime does, for custom rollout functions that make their own prompts.
    """

    def __init__(
        self,
        dataset: PromptDataset | None,
        n_samples_per_prompt: int,
        *,
        shuffle: bool = False,
        seed: int = DEFAULT_SEED,
    ):
        if n_samples_per_prompt < 1:
            raise ValueError(f"--n-samples-per-prompt must be >= 1, got {n_samples_per_prompt}")
        self.dataset = dataset
        self.n_samples_per_prompt = n_samples_per_prompt
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self._cursor = _Cursor()
        self._order: list[int] = []
        self._reorder()

    # slime's names for the cursor, read by loggers and the rollout manager
    @property
    def epoch(self) -> int:
        return self._cursor.epoch

    @property
    def offset(self) -> int:
        return self._cursor.offset

    def _reorder(self) -> None:
        """The current epoch's order: a fresh permutation when shuffling, else file order. Shuffle is
        applied from epoch 0 on (slime shuffles at init too)."""
        if self.dataset is None:
            self._order = []
        elif self.shuffle:
            self._order = self.dataset.permutation(self._cursor.epoch, self.seed)
        else:
            self._order = list(range(len(self.dataset)))

    def _next_prompts(self, k: int) -> list[Sample]:
        if self.dataset is None:
            return [Sample() for _ in range(k)]
        base = self.dataset.original_samples
        n = len(base)
        out: list[Sample] = []
        c = self._cursor
        while len(out) < k:
            # The wrap is lazy (checked before taking, as slime does): a batch that ends exactly at the
            # end of an epoch leaves offset == n, and the next call moves to the next epoch.
            if c.offset >= n:
                c.epoch += 1
                c.offset = 0
                self._reorder()
            take = min(k - len(out), n - c.offset)
            out.extend(base[i] for i in self._order[c.offset : c.offset + take])
            c.offset += take
        return out

    def next_groups(self, k: int) -> list[list[Sample]]:
        """The next ``k`` groups of ``n_samples_per_prompt`` independent copies (called once per rollout,
        and again by dynamic sampling when filtered groups must be replaced)."""
        if k < 0:
            raise ValueError(f"cannot take {k} groups")
        groups = []
        c = self._cursor
        for prompt in self._next_prompts(k):
            group = []
            for _ in range(self.n_samples_per_prompt):
                # deep copies: each sample's response, reward and metadata are written independently
                s = copy.deepcopy(prompt)
                s.group_index = c.group_index
                s.index = c.sample_index
                c.sample_index += 1
                group.append(s)
            c.group_index += 1
            groups.append(group)
        return groups

    def num_rollout_per_epoch(self, rollout_batch_size: int) -> int:
        """How many rollouts of ``rollout_batch_size`` prompts make one pass over the data (for ``--num-epoch``)."""
        size = 0 if self.dataset is None else len(self.dataset)
        if rollout_batch_size < 1:
            raise ValueError(f"--rollout-batch-size must be >= 1, got {rollout_batch_size}")
        count = size // rollout_batch_size
        if count == 0:
            raise ValueError(
                f"--rollout-batch-size {rollout_batch_size} is larger than the prompt dataset "
                f"({size} prompts): not one rollout per epoch; lower --rollout-batch-size or add prompts"
            )
        return count

    # ---- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-serialisable cursor; the rollout manager stores it with each checkpoint."""
        c = self._cursor
        return {
            "epoch": c.epoch,
            "offset": c.offset,
            "group_index": c.group_index,
            "sample_index": c.sample_index,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "dataset_size": None if self.dataset is None else len(self.dataset),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a cursor saved by ``state_dict`` and reshuffle to its epoch. The saved seed and shuffle
        flag win: the point of resuming is to continue the same prompt sequence."""
        size = None if self.dataset is None else len(self.dataset)
        saved_size = state.get("dataset_size")
        offset = int(state["offset"])
        if size is not None and offset > size:
            raise ValueError(
                f"cannot resume the data source: saved offset {offset} is beyond the dataset "
                f"({size} prompts in {self.dataset.path}); was the prompt data changed?"
            )
        if saved_size is not None and size is not None and saved_size != size:
            warnings.warn(
                f"resuming a data source saved with {saved_size} prompts on {size} prompts "
                f"({self.dataset.path}); the prompt order will differ from the original run",
                stacklevel=2,
            )
        self.seed = int(state.get("seed", self.seed))
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self._cursor = _Cursor(
            epoch=int(state["epoch"]),
            offset=offset,
            group_index=int(state["group_index"]),
            sample_index=int(state["sample_index"]),
        )
        self._reorder()

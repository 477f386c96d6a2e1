"""Prompt lengths, checked on the driver before Ray starts (``core/preflight.py`` calls it, so both
``plugrl train`` and ``--dry-run`` report it): prompts, after the chat template, that the model's context
cannot hold, and a ``--rollout-max-prompt-len`` that would drop every prompt. Without this a too-long row
stops the run when the engine meets it, possibly many rollouts in.

Also the number of prompts a run trains on (after that filter), which ``--num-epoch`` turns into a
number of rollouts here, so the start line, the dry run and the LR schedule know it.

Bounded work: the first ``SCAN_ROWS`` rows of a file are templated and tokenized; the full file only
when ``--num-epoch`` needs the count of a filtered dataset (the rollout manager tokenizes all of it
at start then anyway).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SCAN_ROWS = 5_000


@dataclass
class PromptScan:
    """Token counts of one prompt file's rows (the first ``SCAN_ROWS``, or all when ``complete``)."""

    spec: str
    complete: bool
    lengths: list[int] = field(default_factory=list)  # tokens of each row's prompt (after the chat template)
    lines: list[int] = field(default_factory=list)  # its line (jsonl) or row
    filterable: list[bool] = field(default_factory=list)  # a string prompt (--rollout-max-prompt-len drops only these)

    def dropped(self, limit: int | None) -> list[int]:
        """Indices of the rows ``--rollout-max-prompt-len limit`` drops at load (slime: string prompts only)."""
        if limit is None:
            return []
        return [i for i, (n, s) in enumerate(zip(self.lengths, self.filterable)) if s and n > limit]

    def kept(self, limit: int | None) -> list[int]:
        gone = set(self.dropped(limit))
        return [i for i in range(len(self.lengths)) if i not in gone]


def model_context_length(hf_checkpoint: str | None) -> int | None:
    """The context the engine gives the model: ``max_position_embeddings`` of its config.json (of
    ``text_config`` for a multimodal model), as the hf engine and SGLang take it; None if unknown."""
    if not hf_checkpoint:
        return None
    try:
        config = json.loads((Path(hf_checkpoint) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    text = config.get("text_config") if isinstance(config, dict) else None
    for source in (text, config):
        value = source.get("max_position_embeddings") if isinstance(source, dict) else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_tokenizer(hf_checkpoint: str):
    """The model's tokenizer on the driver (transformers, no torch model), or None when it cannot load
    (``model_problems`` reports a broken folder; the check is skipped then)."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(hf_checkpoint)
    except Exception:  # noqa: BLE001 - any failure here is reported by the model checks or at start
        return None


def bounded_spec(spec: str, rows: int | None) -> tuple[str, bool]:
    """``spec`` limited to its first ``rows`` rows, and whether that is still the whole of it (a slice
    with a negative bound is left whole: it needs the row count anyway)."""
    from .data import parse_spec

    path, start, end = parse_spec(spec)
    if rows is None or (start is not None and start < 0) or (end is not None and end < 0):
        return spec, True
    first = start or 0
    stop = first + rows if end is None else min(end, first + rows)
    return f"{path}@[{first}:{stop}]", end is not None and stop == end


def scan_prompts(spec: str, tokenizer, data_kwargs: dict, rows: int | None = SCAN_ROWS) -> PromptScan:
    """Template and tokenize the prompts of ``spec`` as the rollout manager does (``load_prompt_dataset``
    with the chat template; ``SampleGenerator.prompt_ids``: no special tokens, message prompts through the
    tokenizer's chat template). Raises what ``load_prompt_dataset`` raises."""
    from .data import DataError, chat_prompt_ids, load_prompt_dataset, string_prompt_lengths

    limited, whole = bounded_spec(spec, rows)
    dataset = load_prompt_dataset(limited, tokenizer=tokenizer, **data_kwargs)
    complete = whole or len(dataset) + sum(dataset.skipped.values()) < (rows or 0)
    scan = PromptScan(spec, complete, lines=list(dataset.source_lines))
    texts = [s.prompt for s in dataset.original_samples]
    scan.filterable = [isinstance(t, str) for t in texts]
    counts = iter(string_prompt_lengths(tokenizer, [t for t in texts if isinstance(t, str)]))
    for row, text in enumerate(texts):
        if isinstance(text, str):
            scan.lengths.append(next(counts))
            continue
        try:
            scan.lengths.append(len(chat_prompt_ids(tokenizer, text)))
        except Exception as exc:  # noqa: BLE001 - the tokenizer's template (jinja) may raise anything
            line = scan.lines[row] if row < len(scan.lines) else row + 1
            raise DataError(f"{spec}, line {line}: the tokenizer's chat template fails on this message prompt "
                            f"({type(exc).__name__}: {exc}); give the model a chat template that takes these "
                            "messages, or plain-text prompts", path=spec) from exc
    return scan


def prompt_limit_flag(args) -> str:
    """The flag that set ``--rollout-max-prompt-len`` as the user typed it (``--rollout-max-context-len``
    sets it to one less when it is not given)."""
    limit = args.rollout_max_prompt_len
    context = getattr(args, "rollout_max_context_len", None)
    sources = getattr(args, "_sources", None) or {}
    if context is not None and limit == context - 1 and "--rollout-max-prompt-len" not in sources:
        return f"--rollout-max-context-len {context}"
    return f"--rollout-max-prompt-len {limit}"


def all_dropped_problem(flag: str, scan: PromptScan, args) -> str | None:
    """Every prompt of a fully scanned file is over the prompt limit: the run would have no data."""
    limit = getattr(args, "rollout_max_prompt_len", None)
    if limit is None or not scan.complete or not scan.lengths or scan.kept(limit):
        return None
    shortest = min(scan.lengths)
    return (f"{flag} {scan.spec}: no prompts left: {prompt_limit_flag(args)} keeps prompts of at most {limit} tokens "
            f"and all {len(scan.lengths)} are longer (the shortest has {shortest} tokens after the chat template); "
            "raise the limit or check --input-key and --apply-chat-template")


def over_context_problem(flag: str, scan: PromptScan, args, context: int, *, filtered: bool) -> str | None:
    """Prompts the run keeps that do not fit the model's context (the engine refuses a prompt of
    ``context`` tokens or more, mid-run): name the first one and the fix."""
    limit = getattr(args, "rollout_max_prompt_len", None) if filtered else None
    over = [i for i in scan.kept(limit) if scan.lengths[i] >= context]
    if not over:
        return None
    first = over[0]
    where = f"{flag} {scan.spec}, line {scan.lines[first]}" if scan.lines else f"{flag} {scan.spec}"
    checked = f"{len(scan.lengths)} prompts" + ("" if scan.complete else f" checked (the first {SCAN_ROWS} rows)")
    count = "1 of the" if len(over) == 1 else f"{len(over)} of the"
    head = (f"{where}: the prompt has {scan.lengths[first]} tokens after the chat template, and the model's context "
            f"is {context} (max_position_embeddings in --hf-checkpoint {args.hf_checkpoint}/config.json; a prompt "
            f"must be shorter); {count} {checked} {'is' if len(over) == 1 else 'are'} that long")
    if not filtered:
        return (f"{head}: shorten or remove them, or use a model with a longer context "
                "(eval prompts are not filtered by --rollout-max-prompt-len)")
    if limit is None:
        return (f"{head}: pass --rollout-max-prompt-len {context - 1} to drop them at load, or use a model with a "
                "longer context")
    return (f"{head}, and {prompt_limit_flag(args)} keeps them: lower it to {context - 1} or less, or use a model "
            "with a longer context")


def prompt_length_problems(args, flag: str, spec: str, data_kwargs: dict, tokenizer, *, filtered: bool) -> list[str]:
    """``--prompt-data`` (``filtered``: ``--rollout-max-prompt-len`` applies) or an ``--eval-prompt-data``
    file: every prompt dropped, or kept prompts too long for the model. Records the training file's scan
    on ``args._prompt_scan`` for ``--num-epoch``."""
    from .data import DataError

    try:
        scan = scan_prompts(spec, tokenizer, data_kwargs)
    except DataError as exc:  # the file parsed without the template (length_problems' files): the template failed
        return [f"{flag}: {exc}"]
    if filtered:
        args._prompt_scan = scan
    problems = [all_dropped_problem(flag, scan, args) if filtered else None]
    context = model_context_length(args.hf_checkpoint)
    if context is not None and not problems[0]:
        problems.append(over_context_problem(flag, scan, args, context, filtered=filtered))
    return [p for p in problems if p]


# ---- run length ---------------------------------------------------------------------------------------
def run_length_problems(args) -> list[str]:
    """How long to train must be known on the driver (slime requires --num-rollout or --num-epoch):
    without --prompt-data only --num-rollout can say it (an epoch is a pass over --prompt-data)."""
    if getattr(args, "prompt_data", None) or getattr(args, "num_rollout", None) is not None:
        return []
    if getattr(args, "num_epoch", None) is not None:
        return [f"--num-epoch {args.num_epoch} counts passes over --prompt-data, which is not given; give "
                "--prompt-data, or --num-rollout N for N rollouts"]
    return ["--num-rollout is required without --prompt-data (how many rollouts to train); --num-epoch counts "
            "passes over --prompt-data instead"]


def training_prompt_count(args) -> int:
    """Prompts the rollout manager will load from --prompt-data: rows that parse, less those over
    ``--rollout-max-prompt-len`` (then every row is tokenized, as the rollout manager does at start)."""
    from .data import load_prompt_dataset

    common = {"input_key": args.input_key, "label_key": args.label_key,
              "metadata_key": getattr(args, "metadata_key", "metadata") or "metadata",
              "tool_key": getattr(args, "tool_key", "tools") or "tools",
              "skip_bad_rows": bool(getattr(args, "skip_bad_rows", False))}
    limit = getattr(args, "rollout_max_prompt_len", None)
    if limit is None:
        return len(load_prompt_dataset(args.prompt_data, **common))
    scan = getattr(args, "_prompt_scan", None)
    if scan is None or not scan.complete:
        common.update(apply_chat_template=bool(getattr(args, "apply_chat_template", False)),
                      apply_chat_template_kwargs=getattr(args, "apply_chat_template_kwargs", None) or None)
        scan = scan_prompts(args.prompt_data, load_tokenizer(args.hf_checkpoint), common, rows=None)
    return len(scan.kept(limit))


def resolve_num_rollout(args) -> str | None:
    """``--num-epoch E`` without ``--num-rollout`` (on the driver, after the checks): sets ``num_rollout =
    (prompts // --rollout-batch-size) * E`` as slime does, and ``_rollouts_per_epoch``. Returns a problem
    when an epoch is shorter than one rollout, else None."""
    if args.num_rollout is not None or args.num_epoch is None or not args.prompt_data:
        return None
    try:
        prompts = training_prompt_count(args)
    except (ValueError, OSError) as exc:  # e.g. no tokenizer to apply --rollout-max-prompt-len with
        return (f"--num-epoch {args.num_epoch}: cannot count the prompts of --prompt-data {args.prompt_data} "
                f"({exc}); give --num-rollout N instead")
    per_epoch = prompts // int(args.rollout_batch_size)
    if per_epoch < 1:
        return (f"--num-epoch {args.num_epoch}: --prompt-data {args.prompt_data} has {prompts} prompts"
                f"{' after --rollout-max-prompt-len' if getattr(args, 'rollout_max_prompt_len', None) else ''}, "
                f"fewer than one rollout of --rollout-batch-size {args.rollout_batch_size}; lower "
                "--rollout-batch-size or give --num-rollout")
    args.num_rollout = per_epoch * int(args.num_epoch)
    args._rollouts_per_epoch, args._epoch_prompts = per_epoch, prompts
    return None

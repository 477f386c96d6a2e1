"""Checks of a run's inputs on the driver, before Ray starts: each problem is one line naming the flag,
the file (and line) and what to do.

``value_problems`` (the values alone: the same on every machine) feeds ``config_problems``;
``machine_problems`` (files and imports this machine must have) feeds ``environment_problems``, so both
``plugrl train --dry-run`` and the start of ``plugrl train`` report them. Nothing here imports torch
or Ray; transformers only for the model's tokenizer, to measure the prompts after the chat template
(``core/prompt_check.py``).
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
from pathlib import Path

# slime's ``--*-path`` flags: dest -> (positional arguments plugrl passes, keywords it passes, signature)
PATH_SIGNATURES = {
    "dynamic_sampling_filter_path": (2, (), "fn(args, samples, **kwargs)"),
    "buffer_filter_path": (4, (), "fn(args, rollout_id, buffer, num_samples)"),
    "custom_generate_function_path": (3, (), "async fn(args, sample, sampling_params)"),
    "custom_reward_post_process_path": (2, (), "fn(args, samples)"),
    "custom_advantage_function_path": (2, (), "fn(args, rollout_data)"),
    "custom_pg_loss_reducer_function_path": (4, (), "fn(total_lengths, response_lengths, loss_masks, "
                                                    "calculate_per_token_loss)"),
    "rollout_sample_hook_path": (2, ("rollout_id", "evaluation"), "fn(args, sample, *, rollout_id, evaluation)"),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json",
                   "tf_model.h5", "flax_model.msgpack")
CHECKPOINT_MARKERS = ("latest",)


# ---- values -------------------------------------------------------------------------------------------
def value_problems(args) -> list[str]:
    """Reward limits: ``--reward-timeout`` > 0 and ``--reward-error-threshold`` in (0, 1]; a run length;
    the debug modes (``core/debug_modes.py``)."""
    problems = []
    timeout = getattr(args, "reward_timeout", None)
    if timeout is not None and not timeout > 0:
        problems.append(f"--reward-timeout must be > 0 seconds, got {timeout:g} (leave it unset for the default 60)")
    threshold = getattr(args, "reward_error_threshold", None)
    if threshold is not None and not 0 < threshold <= 1:
        problems.append(f"--reward-error-threshold is a fraction of a rollout's samples in (0, 1], got {threshold:g}")
    from .debug_modes import debug_mode_problems
    from .prompt_check import run_length_problems
    from .ray_connect import ray_address_problems

    problems += ray_address_problems(args)
    problems += run_length_problems(args)
    problems += debug_mode_problems(args)
    return problems


# ---- this machine ------------------------------------------------------------------------------------
def machine_problems(args, plugin_set=None) -> list[str]:
    """Everything this machine must offer the run: writable --save, an existing --load, a complete model
    folder, importable ``--*-path`` functions with the right signature, readable and parseable data files, a
    Ray cluster at ``--ray-address``."""
    problems = []
    problems += save_problems(args)
    problems += load_problems(args)
    from .resume_check import resume_problems

    problems += resume_problems(args)  # a damaged checkpoint, data smaller than its cursor: before anything moves
    problems += model_problems(args)
    problems += _response_length_problems(args)
    problems += import_problems(args)
    problems += data_problems(args)
    from .ray_connect import ray_reachability_problems

    problems += ray_reachability_problems(args)  # a cluster that is not there: before the run writes anything
    return problems


def _writable_dir_problem(flag: str, path: Path) -> str | None:
    """Why ``path`` cannot be (made) a writable directory, else None; writes a probe file to be sure
    (``os.access`` says yes to root on a read-only mount)."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == path else f"is under {probe}, which is a file"
        return f"{flag} {path} {where}, not a directory; choose a directory path"
    try:
        fd, name = tempfile.mkstemp(prefix=".plugrl-write-check.", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        return f"{flag} {path}: cannot write in {probe} ({exc.strerror or exc}); choose a writable directory"
    return None


def existing_checkpoints(root: str | os.PathLike) -> list[str]:
    """Names of the finished checkpoints (``rollout_*`` directories) and the ``latest`` pointer in ``root``."""
    root = Path(root)
    if not root.is_dir():
        return []
    names = sorted(p.name for p in root.iterdir() if p.name.startswith("rollout_") and p.is_dir())
    return names + [n for n in CHECKPOINT_MARKERS if (root / n).exists()]


def same_dir(a, b) -> bool:
    try:
        return bool(a) and bool(b) and os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def save_problems(args) -> list[str]:
    """``--save``, ``--output-dir`` and ``--save-hf`` writable; ``--save`` holding another run's
    checkpoints is refused unless ``--load`` resumes from it or ``--overwrite-save`` is given."""
    problems = []
    for flag, value in (("--save", getattr(args, "save", None)), ("--output-dir", getattr(args, "output_dir", None))):
        problem = value and _writable_dir_problem(flag, Path(value))
        if problem:
            problems.append(problem)
    problems += save_hf_problems(getattr(args, "save_hf", None))
    save = getattr(args, "save", None)
    if save and not problems and not getattr(args, "overwrite_save", False):
        found = existing_checkpoints(save)
        if found and not same_dir(getattr(args, "load", None), save):
            named = [n for n in found if n not in CHECKPOINT_MARKERS] or found  # the pointer is not one more
            shown = ", ".join(named[:3]) + (f" and {len(named) - 3} more" if len(named) > 3 else "")
            problems.append(f"--save {save} already holds checkpoints of another run ({shown}); resume it with "
                            f"--load {save}, pass --overwrite-save to delete them, or choose another --save")
    return problems


def save_hf_problems(pattern: str | None) -> list[str]:
    """``--save-hf``: a path whose only placeholder is ``{rollout_id}``, in a writable place (it is
    written at each checkpoint and at the end, long after start)."""
    if not pattern:
        return []
    try:
        path = pattern.format(rollout_id=0)
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:  # {x}, {0}, {rollout_id.x}, {rollout_id[0]}
        return [f"--save-hf {pattern}: only {{rollout_id}} may appear in braces ({type(exc).__name__}: {exc}); "
                "e.g. --save-hf out/hf_{rollout_id}"]
    problem = _writable_dir_problem("--save-hf", Path(path))
    return [problem] if problem else []


def load_problems(args) -> list[str]:
    """``--load`` names an existing directory, unless it is also ``--save``: slime's ``--load DIR --save
    DIR`` finds nothing the first time and starts fresh, then resumes. A recipe's ``--load`` is that
    pattern's too (nobody typed it). Any other missing ``--load`` is a mistyped path, which would
    silently start a long run over."""
    from .config import _from_recipe

    load = getattr(args, "load", None)
    if not load or same_dir(load, getattr(args, "save", None)) or _from_recipe(args, "--load"):
        return []
    fix = ("to resume a run, give the directory its --save wrote (it holds `latest` and rollout_* folders); to "
           "start fresh, drop --load, or give --load and --save the same directory (the first run then starts "
           "fresh and later runs resume)")
    if not Path(load).exists():
        return [f"--load {load} does not exist; {fix}"]
    if not Path(load).is_dir():
        return [f"--load {load} is a file, not a directory; {fix}"]
    from .checkpoint import find_latest_checkpoint

    if find_latest_checkpoint(load, with_moved_aside=True):
        return []
    path = Path(load)
    if path.name.startswith("rollout_") and path.is_dir():
        return [f"--load {load} is one checkpoint, not a --save directory: give its parent, --load {path.parent} "
                f"(it resumes from the checkpoint that directory's `latest` names)"]
    if _holds_model_weights(path):
        return []  # slime's first weights (an HF or torch_dist directory), which a train backend may start from
    what = ("a run's output directory (config.yaml, metrics.jsonl), not a --save directory"
            if (path / "metrics.jsonl").exists() else "a directory with no checkpoint and no model weights in it")
    return [f"--load {load} is {what}, so the run would start over; {fix}"]


def _holds_model_weights(path: Path) -> bool:
    """An HF folder (``*.safetensors``) or a megatron torch_dist checkpoint (``metadata.json``, or a save
    root's ``latest_checkpointed_iteration.txt``)."""
    if not path.is_dir():
        return False
    names = os.listdir(path)
    return any(n.endswith(".safetensors") for n in names) or bool(
        {"metadata.json", "latest_checkpointed_iteration.txt"} & set(names))


def _resume_point(args) -> tuple[str | None, int | None]:
    """The checkpoint ``--load`` resumes from (as after the start's tidy-up) and its rollout id."""
    from .checkpoint import checkpoint_rollout_id, find_latest_checkpoint

    latest = find_latest_checkpoint(args.load, with_moved_aside=True) if getattr(args, "load", None) else None
    return latest, (checkpoint_rollout_id(latest) if latest else None)


def finished_run(args) -> str | None:
    """Why a run with ``--load`` has nothing to train (its checkpoint is after the last rollout of
    ``--num-rollout``), or None. ``plugrl train`` then says so and stops before starting Ray."""
    return _finished_message(args, *_resume_point(args))


def _finished_message(args, latest: str | None, done: int | None) -> str | None:
    total = getattr(args, "num_rollout", None)
    if done is None or total is None or done + 1 < total:
        return None
    from .checkpoint import checkpoint_name

    return (f"--load {args.load}: the run already trained rollouts 0-{done} ({checkpoint_name(latest)}), and "
            f"--num-rollout is {args.num_rollout}: nothing left to train; raise --num-rollout to go on")


def start_point(args) -> str | None:
    """Where a run with ``--load`` starts: printed by ``plugrl train`` at start and in the dry run's plan."""
    load = getattr(args, "load", None)
    if not load:
        return None
    latest, done = _resume_point(args)
    finished = _finished_message(args, latest, done)
    if finished:
        return finished
    if latest:
        from .checkpoint import checkpoint_name

        return f"--load {load}: resumes after rollout {done} ({checkpoint_name(latest)})"
    return f"--load {load}: no checkpoint there (no `latest` file or rollout_* folder), so the run starts at rollout 0"


def model_problems(args) -> list[str]:
    """``--hf-checkpoint`` complete: config.json valid JSON, tokenizer files, weights (and the shards an
    index names), a chat template when ``--apply-chat-template``. A missing folder or config.json is
    ``config._check_paths``'s to report."""
    spec = getattr(args, "hf_checkpoint", None)
    path = Path(spec) if spec else None
    if path is None or not (path / "config.json").is_file():
        return []
    flag = f"--hf-checkpoint {path}"
    problems = []
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            problems.append(f"{flag}: config.json holds a {type(config).__name__}, not a JSON object; "
                            "restore the model's config.json")
    except (ValueError, OSError) as exc:
        where = f" (line {exc.lineno}, column {exc.colno}: {exc.msg})" if isinstance(exc, json.JSONDecodeError) else ""
        problems.append(f"{flag}: config.json is not valid JSON{where or f' ({exc})'}; restore the model's config.json")
    names = {p.name for p in path.iterdir()}
    if not names & set(TOKENIZER_FILES):
        problems.append(f"{flag} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the tokenizer files "
                        "of the model it came from (tokenizer.save_pretrained)")
    elif getattr(args, "apply_chat_template", False) and not _has_chat_template(path, names):
        problems.append(f"{flag}: --apply-chat-template is set but the tokenizer has no chat template "
                        "(tokenizer_config.json 'chat_template', chat_template.jinja); add one or drop the flag")
    weights = [p for pattern in WEIGHT_PATTERNS for p in path.glob(pattern)]
    if not weights:
        problems.append(f"{flag} has no weights (*.safetensors or pytorch_model*.bin); save the model there with "
                        "model.save_pretrained")
    problems += _missing_shards(path, flag)
    return problems


def _response_length_problems(args) -> list[str]:
    """A response limit the model's context cannot hold even after an empty prompt: the engine would cut every
    response short of it without a word (hf) or refuse the requests (SGLang). Not a fault of the model folder,
    so it stays out of ``model_problems`` (whose result also gates the prompt-length scan)."""
    from .prompt_check import model_context_length

    flag = f"--hf-checkpoint {getattr(args, 'hf_checkpoint', None)}"
    context = model_context_length(getattr(args, "hf_checkpoint", None))
    problems = []
    given = getattr(args, "_sources", None) or {}
    eval_on = bool(getattr(args, "eval_prompt_data", None)) and bool(getattr(args, "eval_interval", None))
    for dest in ("rollout_max_response_len", "eval_max_response_len"):
        if dest == "eval_max_response_len" and (not eval_on or "--eval-max-response-len" not in given):
            continue  # no eval, or derived from --rollout-max-response-len: reported there once
        value = getattr(args, dest, None)
        if context is not None and isinstance(value, int) and value >= context:
            problems.append(f"--{dest.replace('_', '-')} {value}: the model's context is {context} tokens "
                            f"(max_position_embeddings in {flag}/config.json) and must hold the prompt too; give "
                            f"at most {context - 1} (less the longest prompt)")
    return problems


def _has_chat_template(path: Path, names: set[str]) -> bool:
    if {"chat_template.jinja", "chat_template.json"} & names:
        return True
    try:
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("chat_template"))


def _missing_shards(path: Path, flag: str) -> list[str]:
    problems = []
    for index in path.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            problems.append(f"{flag}: {index.name} is not a valid weight index ({type(exc).__name__}: {exc})")
            continue
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            problems.append(f"{flag}: {index.name} names {len(missing)} missing weight file(s): {', '.join(missing[:3])}")
    return problems


def import_problems(args) -> list[str]:
    """Each ``--custom-rm-path`` and slime ``--*-path`` function importable here and callable the way
    plugrl calls it."""
    from .slime_compat import missing_slime_path

    problems = []
    paths = [("custom_rm_path", getattr(args, "custom_rm_path", None))]
    for dest in PATH_SIGNATURES:
        values = getattr(args, dest, None)
        paths += [(dest, v) for v in (values if isinstance(values, list) else [values])]
    for dest, value in paths:
        if not value or not ("." in value or ":" in value):
            continue  # unset, or malformed (config.import_path_problems says so)
        if missing_slime_path(value):
            continue  # config.slime_path_problems says what plugrl uses instead
        problem = import_path_problem(dest, value)
        if problem:
            problems.append(problem)
    return problems


def import_path_problem(dest: str, value: str, calls: tuple[int, tuple[str, ...], str] | None = None) -> str | None:
    """Why the function at import path ``value`` (the value of flag ``--<dest>``) cannot be called as plugrl
    calls it, else None. ``calls``: (positional count, keywords, shown signature) for a flag outside
    ``PATH_SIGNATURES`` (a plugin's own ``--*-path`` flags; only the user's module is imported)."""
    from .registry import import_object

    flag = f"--{dest.replace('_', '-')} {value}"
    try:
        fn = import_object(value)
    except SystemExit as exc:  # a script-style module that exits when imported would end plugrl silently
        return (f"{flag}: importing it called sys.exit({exc.code!r}); move the module's script code under "
                "`if __name__ == \"__main__\":`")
    except Exception as exc:  # noqa: BLE001 - the user's module may raise anything at import
        return (f"{flag}: cannot import it ({type(exc).__name__}: {exc}); check the module is on PYTHONPATH and "
                "the name is spelled right")
    if not callable(fn):
        return f"{flag} is not callable (a {type(fn).__name__}: {repr(fn)[:60]}); point it at a function"
    problem = _signature_problem(dest, fn, calls)
    return f"{flag}: {problem}" if problem else None


def _signature_problem(dest: str, fn, calls: tuple[int, tuple[str, ...], str] | None = None) -> str | None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # builtins without a signature: cannot tell
    if calls is not None:
        count, keywords, expected = calls
    elif dest == "custom_rm_path":
        params = list(signature.parameters)
        slime = bool(params) and params[0] == "args"
        count, keywords = (2, ()) if slime else (1, ())
        expected = "async fn(args, sample) (slime) or fn(sample, **options) (plugrl)"
    else:
        count, keywords, expected = PATH_SIGNATURES[dest]
    try:
        signature.bind(*([None] * count), **{k: None for k in keywords})
    except TypeError as exc:
        return f"takes {signature}, but plugrl calls {expected} ({exc})"
    return None


def data_problems(args) -> list[str]:
    """Prompt, eval and SFT files read and parsed here, so a bad row is reported as ``file, line N: ...``
    before any actor starts; then the prompts' lengths after the chat template (``length_problems``)."""
    from .data import DataError, load_prompt_dataset

    problems = []
    common = {"metadata_key": getattr(args, "metadata_key", "metadata") or "metadata",
              "tool_key": getattr(args, "tool_key", "tools") or "tools",
              "skip_bad_rows": bool(getattr(args, "skip_bad_rows", False))}
    specs = []
    if getattr(args, "prompt_data", None):
        specs.append(("--prompt-data", args.prompt_data, args.input_key, args.label_key))
    pairs = list(getattr(args, "eval_prompt_data", None) or [])
    eval_paths = pairs[-1:] if len(pairs) == 1 else pairs[1::2] if len(pairs) % 2 == 0 else []
    for spec in eval_paths:
        specs.append(("--eval-prompt-data", spec, getattr(args, "eval_input_key", None) or args.input_key,
                      getattr(args, "eval_label_key", None) or args.label_key))
    readable = []
    for flag, spec, input_key, label_key in specs:
        if not _exists(spec):
            continue  # config._check_paths names it
        try:
            load_prompt_dataset(spec, input_key=input_key, label_key=label_key, **common)
            readable.append((flag, spec, input_key, label_key))
        except DataError as exc:
            problems.append(f"{flag}: {exc}")
        except Exception as exc:  # noqa: BLE001 - unreadable file, parquet error, ...
            problems.append(f"{flag} {spec}: cannot read it ({type(exc).__name__}: {exc})")
    problems += length_problems(args, readable, common)
    sft = getattr(args, "sft_warmup_data", None)
    if sft and getattr(args, "sft_warmup_steps", 0) and _exists(sft):
        problems += sft_data_problems(sft)
    return problems


def length_problems(args, specs: list[tuple[str, str, str, str | None]], common: dict) -> list[str]:
    """The parsed prompt files, templated and tokenized with the model's tokenizer (``core/prompt_check.py``):
    prompts the model's context cannot hold, a ``--rollout-max-prompt-len`` that drops every prompt.
    Skipped when the model folder has no usable tokenizer (``model_problems`` says why)."""
    if not specs or model_problems(args) or not getattr(args, "hf_checkpoint", None):
        return []
    from .prompt_check import load_tokenizer, prompt_length_problems

    tokenizer = load_tokenizer(args.hf_checkpoint)
    if tokenizer is None:
        return []
    problems = []
    for flag, spec, input_key, label_key in specs:
        data_kwargs = {**common, "input_key": input_key, "label_key": label_key,
                       "apply_chat_template": bool(getattr(args, "apply_chat_template", False)),
                       "apply_chat_template_kwargs": getattr(args, "apply_chat_template_kwargs", None) or None}
        problems += prompt_length_problems(args, flag, spec, data_kwargs, tokenizer, filtered=flag == "--prompt-data")
    return problems


def _exists(spec: str) -> bool:
    path = str(spec).split("@[", 1)[0]
    head, sep, _ = path.rpartition(":")
    return Path(path).exists() or bool(sep and head and Path(head).is_dir())


def sft_data_problems(path: str) -> list[str]:
    """``--sft-warmup-data``: JSONL objects with string ``prompt`` and ``response`` (first bad line only)."""
    rows = 0
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, ValueError) as exc:
                    return [f"--sft-warmup-data: {path}, line {lineno}: not valid JSON ({exc}); fix or remove the line"]
                missing = [k for k in ("prompt", "response") if not isinstance(row, dict) or k not in row]
                if missing:
                    return [f"--sft-warmup-data: {path}, line {lineno}: no {' or '.join(repr(k) for k in missing)} "
                            "(each line is {\"prompt\": ..., \"response\": ...})"]
                rows += 1
    except OSError as exc:
        return [f"--sft-warmup-data {path}: cannot read it ({exc.strerror or exc})"]
    return [] if rows else [f"--sft-warmup-data: {path} has no rows; give a JSONL of prompt/response objects"]

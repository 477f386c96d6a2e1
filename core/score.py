"""``plugrl score``: score the rows of a JSONL file with a reward plugin, outside any training run.

Runs on the driver machine, in one process: async rewards run concurrently on one event loop, sync
ones in threads (their CPU-heavy graders use guarded worker processes, see ``timeouts.py``); every call is
bounded by ``--reward-timeout``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from .types import Sample, Status

if TYPE_CHECKING:
    from .reward_call import Reward

# reward_call (asyncio, ssl) is imported when rows are scored, not for --help or a usage error:
# start-up is most of a small grading run (benchmarks/cli_startup.py).

DESCRIPTION = """\
Score each row of a JSONL file with a reward plugin and print count, mean and errors.

Each row is a JSON object with a response and a label: both keys (--response-key, default
"response"; --label-key, default "label") are required in every row, and a row missing either is
reported and left out (write "label": null for a reward that needs none). Optional "prompt" and
"metadata" keys are passed on; each row becomes a Sample as a finished rollout sample would be: its
status is "completed" unless the row has a "status" (completed, truncated, aborted, failed), and its
response_length is the row's "response_length", else the response's token count under the tokenizer of
--hf-checkpoint, else 0 (a reward that reads lengths needs one of the two). With --output, every scored row is
written there with a "reward" field added (dict rewards are written as dicts; a reward of None,
"not applicable", scores 0 as in training). Ctrl-C writes the rows scored so far to --output (exit 130). Rows that are malformed or whose
reward raised are reported on stderr as FILE:LINE: reason and left out; the others are still scored.

exit status: 0 every row was scored; 1 some row was malformed or failed; 2 usage error (unknown
reward name, unreadable input, bad --custom-rm-path).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plugrl score", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rm-type", help="registered reward name (see `plugrl plugins list --kind reward`)")
    parser.add_argument("--custom-rm-path", help="module:attr or module.attr of a reward function: slime's "
                        "`async def rm(args, sample, **kw)` (first parameter named args) or `fn(sample, **options)`")
    parser.add_argument("--rm-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="reward option, repeatable; VALUE is parsed as JSON when it can be (timeout=5 -> 5)")
    parser.add_argument("--input", required=True, help="JSONL file of rows to score")
    parser.add_argument("--output", help="write the scored rows here (JSONL, with a reward field)")
    parser.add_argument("--response-key", default="response", help="key of the response; required in every row")
    parser.add_argument("--label-key", default="label",
                        help="key of the label (ground truth); required in every row, null allowed")
    parser.add_argument("--reward-key", help="key of the scalar in dict rewards (e.g. score for dapo)")
    parser.add_argument("--hf-checkpoint", metavar="DIR",
                        help="a model folder whose tokenizer counts each response's tokens (Sample.response_length) "
                             "for rows without a response_length")
    parser.add_argument("--concurrency", type=int, default=64, help="rows scored at once (default 64)")
    parser.add_argument("--reward-timeout", type=float, metavar="SECONDS",
                        help="seconds one reward call may take (default 60); a row past it is reported as failed")
    return parser


def parse_options(pairs: list[str]) -> dict[str, Any]:
    options = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--rm-opt expects KEY=VALUE, got '{pair}'")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        options[key.strip()] = value
    return options


# --------------------------------------------------------------------------------------------------
# Reading rows and scoring them
# --------------------------------------------------------------------------------------------------


def read_rows(path: str, response_key: str, label_key: str, errors: list,
              count_tokens=None) -> list[tuple[int, dict, Sample]]:
    """(line number, row, sample) for each usable line; (line number, message) in ``errors`` for the others.
    ``count_tokens(text) -> int`` gives the response length of rows without a ``response_length``."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.append((lineno, f"invalid JSON: {exc.msg} (column {exc.colno})"))
                continue
            if not isinstance(row, dict):
                errors.append((lineno, f"expected a JSON object, got {type(row).__name__}"))
                continue
            missing = [key for key in (response_key, label_key) if key not in row]
            if missing:
                errors.append((lineno, f"missing key {', '.join(repr(k) for k in missing)}"))
                continue
            if not isinstance(row[response_key], str):
                errors.append((lineno, f"{response_key!r} must be a string, got {type(row[response_key]).__name__}"))
                continue
            metadata = row.get("metadata") or {}
            if not isinstance(metadata, dict):
                errors.append((lineno, f"metadata must be an object, got {type(metadata).__name__}"))
                continue
            status = row.get("status", Status.COMPLETED.value)
            if status not in {s.value for s in Status} - {Status.PENDING.value}:
                errors.append((lineno, f"status {status!r} is not one of completed, truncated, aborted, failed"))
                continue
            length = row.get("response_length")
            if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 0):
                errors.append((lineno, f"response_length must be a whole number >= 0, got {length!r}"))
                continue
            if length is None:
                response = row[response_key]
                length = count_tokens(response) if count_tokens is not None else 0
            sample = Sample(prompt=row.get("prompt", ""), response=row[response_key], label=row[label_key],
                            metadata=metadata, status=Status(status), response_length=length)
            rows.append((lineno, row, sample))
    return rows


def _check_reward(value: Any) -> Any:
    if value is None:  # "not applicable": scored 0, as training scores it (rollout.scalar_reward)
        return 0.0
    if isinstance(value, dict) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    if isinstance(value, bool):
        return int(value)
    raise TypeError(f"a reward must be a number or a dict, got {type(value).__name__}: {value!r}")


async def score_rows(reward: "Reward", rows, concurrency: int, errors: list, results: list | None = None) -> list:
    """The reward of each row (None where it failed or ran past ``reward.timeout``; the failure is
    added to ``errors``), filled into ``results`` as they come (kept when the caller is interrupted)."""
    import asyncio

    from .reward_call import describe_failure
    results = results if results is not None else [None] * len(rows)
    reward.concurrency = max(1, concurrency)
    try:
        if reward.batched:
            try:
                values = await reward.call_one([sample for _, _, sample in rows])
                if len(values) != len(rows):
                    raise ValueError(f"batched reward returned {len(values)} values for {len(rows)} rows")
            except Exception as exc:
                errors.append((0, f"batched reward failed: {describe_failure(exc)}"))
                return results
            for i, value in enumerate(values):
                try:
                    results[i] = _check_reward(value)
                except TypeError as exc:
                    errors.append((rows[i][0], str(exc)))
            return results

        gate = asyncio.Semaphore(max(1, concurrency))

        async def one(i: int) -> None:
            lineno, _, sample = rows[i]
            async with gate:
                try:
                    results[i] = _check_reward(await reward.call_one(sample))
                except Exception as exc:
                    errors.append((lineno, f"reward failed: {describe_failure(exc)}"))

        await asyncio.gather(*(one(i) for i in range(len(rows))))
        return results
    finally:
        await reward.close()


def _scalar(value: Any, reward_key: str | None) -> float | None:
    if isinstance(value, dict):
        if reward_key is None:
            return None
        return float(value[reward_key])
    return float(value)


def _output_problem(output: str | None, input_path: str) -> str | None:
    """Why ``--output`` cannot be written once the rows are scored (checked before scoring them)."""
    import os

    if not output:
        return None
    if os.path.isdir(output):
        return f"--output {output} is a directory; give a file path"
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        return f"--output {output}: its folder {parent} does not exist"
    if os.path.exists(input_path) and os.path.exists(output) and os.path.samefile(output, input_path):
        return f"--output {output} is the --input file; it would be replaced by the scored rows only: write elsewhere"
    if not os.access(parent, os.W_OK) or (os.path.exists(output) and not os.access(output, os.W_OK)):
        return f"--output {output} is not writable"
    return None


def _write_scored(path: str, rows, rewards) -> None:
    """The scored rows (those with a reward), each with its ``reward`` added, as JSONL."""
    with open(path, "w", encoding="utf-8") as out:
        for (_, row, _), value in zip(rows, rewards):
            if value is not None:
                out.write(json.dumps({**row, "reward": value}, ensure_ascii=False) + "\n")


def _token_counter(model_dir: str):
    """``text -> token count`` under the tokenizer of ``model_dir`` (no special tokens: a response's own)."""
    from transformers import AutoTokenizer  # only when asked for: it is most of the start-up

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.rm_type and not args.custom_rm_path:
        parser.print_usage(sys.stderr)
        print("plugrl score: give --rm-type NAME or --custom-rm-path module:attr", file=sys.stderr)
        return 2
    if args.concurrency < 1:
        print(f"plugrl score: --concurrency must be at least 1 (rows scored at once), got {args.concurrency}",
              file=sys.stderr)
        return 2
    if args.hf_checkpoint and not os.path.isdir(args.hf_checkpoint):  # else transformers reads it as a hub repo id
        print(f"plugrl score: --hf-checkpoint {args.hf_checkpoint} is not a directory; give the model folder whose "
              "tokenizer counts the response tokens (no model hub is used)", file=sys.stderr)
        return 2
    if args.reward_timeout is not None and not args.reward_timeout > 0:
        print(f"plugrl score: --reward-timeout must be > 0 seconds, got {args.reward_timeout:g}", file=sys.stderr)
        return 2
    try:
        options = parse_options(args.rm_opt)
    except ValueError as exc:
        print(f"plugrl score: {exc}", file=sys.stderr)
        return 2

    import asyncio
    import math

    from .registry import PluginError
    from .reward_call import resolve_reward

    try:
        reward = resolve_reward(args, options)
    except (PluginError, ImportError, ValueError) as exc:
        print(f"plugrl score: {exc}", file=sys.stderr)
        return 2

    count_tokens = None
    if args.hf_checkpoint:
        try:
            count_tokens = _token_counter(args.hf_checkpoint)
        except (OSError, ValueError) as exc:
            print(f"plugrl score: --hf-checkpoint {args.hf_checkpoint}: cannot load its tokenizer: {exc}",
                  file=sys.stderr)
            return 2
    problem = _output_problem(args.output, args.input)
    if problem:
        print(f"plugrl score: {problem}", file=sys.stderr)
        return 2
    errors: list[tuple[int, str]] = []  # (line number or 0, message)
    try:
        rows = read_rows(args.input, args.response_key, args.label_key, errors, count_tokens)
    except OSError as exc:
        print(f"plugrl score: cannot read {args.input}: {exc}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as exc:
        print(f"plugrl score: cannot read {args.input}: not UTF-8 text (byte {exc.start}: {exc.reason}); give a "
              "JSONL file", file=sys.stderr)
        return 2

    rewards: list = [None] * len(rows)
    try:
        asyncio.run(score_rows(reward, rows, args.concurrency, errors, rewards))
    except KeyboardInterrupt:  # keep what was scored: a remote reward's calls cost time or money
        done = sum(value is not None for value in rewards)
        if args.output:
            _write_scored(args.output, rows, rewards)
        where = f"; wrote the {done} scored rows to {args.output}" if args.output else ""
        print(f"\nplugrl score: interrupted after {done} of {len(rows)} rows{where}", file=sys.stderr)
        return 130

    scalars = []
    dict_without_key = False
    for (lineno, _, _), value in zip(rows, rewards):
        if value is None:
            continue
        try:
            scalar = _scalar(value, args.reward_key)
        except (KeyError, TypeError, ValueError) as exc:
            errors.append((lineno, f"reward {value!r} has no usable --reward-key {args.reward_key!r}: "
                                   f"{type(exc).__name__}: {exc}"))
            continue
        if scalar is None:
            dict_without_key = True
        else:
            scalars.append(scalar)

    if args.output:
        _write_scored(args.output, rows, rewards)

    for lineno, message in sorted(errors, key=lambda e: e[0]):
        where = f"{args.input}:{lineno}" if lineno else args.input
        print(f"{where}: {message}", file=sys.stderr)
    scored = sum(value is not None for value in rewards)
    print(f"count: {scored}")
    if dict_without_key:
        print("mean: n/a (dict rewards: pass --reward-key to choose the scalar)")
    else:
        print(f"mean: {math.fsum(scalars) / len(scalars):.6g}" if scalars else "mean: n/a (no rows scored)")
    print(f"errors: {len(errors)}")
    timeouts_module = sys.modules.get(f"{__package__}.timeouts")
    if timeouts_module is not None:
        stats = timeouts_module.grader_stats()
        if stats["calls"]:
            print(f"grader timeouts: {stats['timeouts']} of {stats['calls']} guarded grades")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

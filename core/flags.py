"""The flags of ``plugrl train``: the parser class plugins add their groups to, value types, and every
core flag, grouped as ``plugrl train --help`` prints them.

Runs on the driver only, while the run config is built (before any GPU is touched). Flag names and
defaults are slime's (reference §9, §10); ``plugrl.core.config`` layers recipes, YAML and the command
line on top and resolves the derived defaults (``None`` here usually means "resolved later").

Also here: how recipe and YAML values reach the flags (``read_layer`` coerces them to each flag's type,
so ``--config`` behaves like the command line) and how passthrough words are collected.

Plugins add flags through ``plugrl_add_options(parser)`` with ``parser.add_plugin_group(...)``, which
records which plugin owns the flags (an owned flag implies its plugin, e.g. ``--tensor-model-parallel-size``
selects ``--train-backend megatron``), and ``parser.add_passthrough(...)``, which collects any
``--<prefix><flag> [value]`` into a dict for an external program (``--sglang-*`` → ``sglang.launch_server``).
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_BUFFER_POLICY = "fifo"  # slime's: the buffer hands out groups in the order they were aborted

SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-zA-Z]*)\s*$")


# --------------------------------------------------------------------------------------------------
# Value types
# --------------------------------------------------------------------------------------------------


def below_minimum(args: Any, dests, minimum: int = 1) -> list[str]:
    """``--flag must be >= minimum, got V`` for each of ``dests`` (attribute names) set below ``minimum``;
    unset (None or absent) flags are not checked. Shared by ``plugrl train``'s config check and the
    plugin commands (``plugrl convert``, ``plugrl serve``)."""
    return [f"--{dest.replace('_', '-')} must be >= {minimum}, got {value}" for dest in dests
            if (value := getattr(args, dest, None)) is not None and value < minimum]


def parse_size(text: Any) -> int:
    """Bytes from ``512MiB``, ``1GB``, ``1.5GiB`` or a plain integer (KB/MB/GB are powers of 1000,
    KiB/MiB/GiB powers of 1024)."""
    if isinstance(text, bool):
        raise argparse.ArgumentTypeError(f"expected a size such as 512MiB, got {text!r}")
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    unit = m.group("unit").lower() if m else None
    if m is None or unit not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 512MiB, 1GB or a number of bytes, got {text!r}")
    return int(float(m.group("num")) * SIZE_UNITS[unit])


def json_object(text: Any) -> dict:
    """A JSON object given as text (``'{"enable_thinking": false}'``); a dict passes through (YAML)."""
    if isinstance(text, dict):
        return dict(text)
    try:
        value = json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def option_value(raw: str) -> Any:
    """A ``KEY=VALUE`` value: JSON when it parses (numbers, true/false, lists), else the text."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = str(text).partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), option_value(raw)


class KeyValueAction(argparse.Action):
    """Repeatable ``--x-opt KEY=VALUE`` into a dict; command-line keys override YAML/recipe keys."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = dict(getattr(namespace, self.dest, None) or {})
        key, value = values
        current[key] = value
        setattr(namespace, self.dest, current)


class ReplaceAppendAction(argparse.Action):
    """Like ``append``, except that the first occurrence on the command line replaces a list that came
    from YAML or a recipe (the command line overrides, it does not extend)."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        items = [] if current is None or current is self.default else list(current)
        items.append(values)
        setattr(namespace, self.dest, items)


# --------------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Passthrough:
    """``--<prefix><flag> [value ...]`` words that no flag claims go into ``args.<dest>[flag_with_underscores]``
    (``True`` for a bare switch, a string for one value, a list for several); ``reserved`` flags (without
    the prefix, dashed) are refused with the reason given."""

    prefix: str
    dest: str
    kind: str | None = None
    name: str | None = None
    target: str = ""
    reserved: dict = field(default_factory=dict)


class HelpFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` for flags whose default is a real value (not None/False/empty) and short
    metavars (N, X, TEXT) instead of upper-cased dests."""

    def _get_default_metavar_for_optional(self, action):
        return {int: "N", float: "X"}.get(action.type, "TEXT")

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default in (None, False, argparse.SUPPRESS) or default == [] or default == {}:
            return text
        if not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class PlugrlArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` (abbreviations off) that knows which plugin owns which flag."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._group_owners: dict[int, tuple[str, str]] = {}
        self.passthroughs: list[Passthrough] = []

    def add_plugin_group(
        self, title: str, description: str | None = None, *, kind: str | None = None, name: str | None = None
    ):
        """An argument group whose flags belong to plugin ``name`` of ``kind`` (e.g. ``train_backend``,
        ``megatron``): giving one of them selects that plugin, and selecting another one is an error."""
        group = self.add_argument_group(title, description)
        if kind and name:
            self._group_owners[id(group)] = (kind, name)
        return group

    def add_passthrough(
        self,
        prefix: str,
        dest: str,
        *,
        kind: str | None = None,
        name: str | None = None,
        target: str = "",
        reserved: dict | None = None,
    ) -> None:
        """Collect any unclaimed ``prefix``-ed flag into ``args.<dest>`` (a dict); see ``Passthrough``."""
        if not prefix.startswith("--") or not prefix.endswith("-"):
            raise ValueError(f"passthrough prefix must look like '--name-', got {prefix!r}")
        self.passthroughs.append(Passthrough(prefix, dest, kind, name, target, dict(reserved or {})))
        self.set_defaults(**{dest: None})

    def owned_actions(self) -> dict[argparse.Action, tuple[str, str]]:
        owned = {}
        for group in self._action_groups:
            owner = self._group_owners.get(id(group))
            if owner:
                for action in group._group_actions:
                    owned[action] = owner
        return owned

    def flag_actions(self) -> list[argparse.Action]:
        """Every action that has option strings, except ``--help``."""
        return [a for a in self._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]

    def action_for_option(self, option: str) -> argparse.Action | None:
        return self._option_string_actions.get(option)

    def action_for_key(self, key: str) -> argparse.Action | None:
        """The action a YAML/recipe key names: ``rollout-batch-size``, ``rollout_batch_size``,
        ``--rollout-batch-size`` or a dest such as ``async_train``."""
        bare = key.lstrip("-")
        action = self._option_string_actions.get("--" + bare.replace("_", "-"))
        if action is not None and not isinstance(action, argparse._HelpAction):
            return action
        dest = bare.replace("-", "_")
        for action in self.flag_actions():
            if action.dest == dest and action.default is not argparse.SUPPRESS:
                return action
        return None

    def passthrough_for(self, option: str) -> Passthrough | None:
        for spec in sorted(self.passthroughs, key=lambda s: -len(s.prefix)):
            if option.startswith(spec.prefix) and len(option) > len(spec.prefix):
                return spec
        return None

    def all_flag_names(self) -> list[str]:
        return sorted({s for a in self.flag_actions() for s in a.option_strings if s.startswith("--")})


def canonical_flag(action: argparse.Action) -> str:
    """The name a flag is reported by: its first long option string."""
    return next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])


# --------------------------------------------------------------------------------------------------
# Core flags
# --------------------------------------------------------------------------------------------------


def _run_and_cluster(p: PlugrlArgumentParser) -> None:
    g = p.add_argument_group("run and cluster")
    g.add_argument(
        "--config", metavar="RUN.YAML", help="YAML of flag values (keys = flag names); the command line overrides it"
    )
    g.add_argument("--recipe", metavar="NAME", help="named preset of flag values, under --config and the command line")
    g.add_argument("--output-dir", help="where metrics, logs and the resolved config go (default: runs/<timestamp>)")
    g.add_argument("--seed", type=int, default=1234, help="global seed")
    g.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
    g.add_argument("--actor-num-nodes", type=int, default=1, help="nodes of the train group")
    g.add_argument("--actor-num-gpus-per-node", type=int, help="train GPUs per node (default: 1)")
    g.add_argument("--rollout-num-gpus", type=int, help="GPUs for rollout engines (colocated default: the train GPUs)")
    g.add_argument("--rollout-num-gpus-per-engine", type=int, default=1, help="GPUs per rollout engine (SGLang TP)")
    g.add_argument(
        "--num-gpus-per-node", type=int, default=8, help="GPUs of one node (engines wider than this span nodes)"
    )
    g.add_argument("--colocate", action="store_true", help="train and rollout share GPUs; offloads both by default")
    g.add_argument(
        "--placement",
        metavar="NAME",
        help="placement plugin (default: colocate; decoupled when --rollout-num-gpus is given without --colocate)",
    )
    g.add_argument(
        "--placement-opt",
        action=KeyValueAction,
        type=key_value,
        metavar="KEY=VALUE",
        help="option for the placement (repeatable; a field of its declared options, in request.options)",
    )
    g.add_argument("--offload", action="store_true", help="same as --offload-train --offload-rollout")
    g.add_argument(
        "--offload-train",
        action=argparse.BooleanOptionalAction,
        help="free the trainer's GPU memory while generating (default: on with --colocate)",
    )
    g.add_argument(
        "--offload-rollout",
        action=argparse.BooleanOptionalAction,
        help="free the engines' GPU memory while training (default: on with --colocate)",
    )
    g.add_argument("--device", default="auto", metavar="{auto,cpu,cuda}", help="device of the embedded backends")
    g.add_argument(
        "--dry-run", action="store_true", help="validate, print the resolved config and placement, then exit"
    )
    g.add_argument(
        "--async",
        dest="async_train",
        action="store_true",
        help="async loop: generate the next rollouts while training (not with --colocate); "
             "--max-staleness bounds how far ahead",
    )
    g.add_argument("--max-staleness", type=int, metavar="K",
                   help="with --async: rollout r may be generated with weights up to K optimizer steps older than "
                        "the step that trains it (default 1: one step off, slime's train_async.py); buffered partial "
                        "groups begun with older weights are handled by --stale-partial-rollout")
    g.add_argument("--stale-partial-rollout", choices=("regenerate", "drop"),
                   help="with --max-staleness: a partial-rollout group older than K is regenerated from its prompt "
                        "(default) or dropped; counted in rollout/stale_*_groups")
    g.add_argument("--debug-train-only", action="store_true", help="train only (no rollout engines)")
    g.add_argument("--debug-rollout-only", action="store_true", help="generate only (no training)")


def _plugins(p: PlugrlArgumentParser) -> None:
    g = p.add_argument_group("plugins", "Names are checked against the registries (`plugrl plugins list`).")
    g.add_argument(
        "--train-backend", metavar="NAME", help="train backend (default: torch; megatron when Megatron flags are given)"
    )
    g.add_argument(
        "--rollout-backend",
        metavar="NAME",
        help="rollout backend (default: hf; sglang when --sglang-* flags are given)",
    )
    g.add_argument("--rm-type", metavar="NAME", help="reward plugin")
    g.add_argument(
        "--rm-opt",
        action=KeyValueAction,
        type=key_value,
        metavar="KEY=VALUE",
        help="option for the reward (repeatable; values parsed as JSON when possible)",
    )
    g.add_argument("--rm-url", help="slime's remote_rm URL (same as --rm-opt url=URL)")
    g.add_argument(
        "--custom-rm-path", metavar="MODULE.ATTR", help="slime-signature reward function (overrides --rm-type)"
    )
    g.add_argument("--reward-key", help="key of a dict reward used for training")
    g.add_argument("--eval-reward-key", help="key of a dict reward used for eval (default: --reward-key)")
    g.add_argument("--group-rm", action="store_true", help="score each group once, after all its samples finish")
    g.add_argument("--advantage-estimator", default="grpo", metavar="NAME", help="advantage estimator plugin")
    g.add_argument(
        "--adv-opt",
        action=KeyValueAction,
        type=key_value,
        metavar="KEY=VALUE",
        help="option for the advantage estimator (repeatable; a field of its declared options)",
    )
    g.add_argument(
        "--dynamic-sampling-filter", metavar="NAME", help="dynamic-sampling filter plugin (default: keep all)"
    )
    g.add_argument(
        "--dynamic-sampling-filter-path", metavar="MODULE.ATTR", help="slime-signature dynamic-sampling filter"
    )
    g.add_argument(
        "--filter-opt",
        action=KeyValueAction,
        type=key_value,
        metavar="KEY=VALUE",
        help="option for the dynamic-sampling filter (repeatable)",
    )
    g.add_argument("--buffer-filter", default=DEFAULT_BUFFER_POLICY, metavar="NAME",
                   help="partial-rollout buffer policy plugin (needs --partial-rollout)")
    g.add_argument(
        "--buffer-opt",
        action=KeyValueAction,
        type=key_value,
        metavar="KEY=VALUE",
        help="option for the buffer policy (repeatable; a field of its declared options)",
    )
    g.add_argument(
        "--buffer-filter-path", metavar="MODULE.ATTR", help="slime-signature buffer filter (overrides --buffer-filter)"
    )
    g.add_argument(
        "--reward-post-process",
        action=ReplaceAppendAction,
        metavar="NAME",
        help="reward post-processor plugin, applied in order (repeatable)",
    )
    g.add_argument(
        "--reward-error",
        default="zero",
        metavar="{zero,raise}",
        help="a reward that raises or times out: score it 0 and count it, or stop the run",
    )
    g.add_argument("--reward-timeout", type=float, metavar="SECONDS",
                   help="seconds one reward call may take (default 60); a call past it scores 0 and is counted")
    g.add_argument("--reward-error-threshold", type=float, default=0.5, metavar="FRACTION",
                   help="stop the run when more than this fraction of a rollout's rewards fail (default 0.5)")


def _checkpoints(p: PlugrlArgumentParser) -> None:
    g = p.add_argument_group("checkpoints")
    g.add_argument(
        "--hf-checkpoint", metavar="DIR", help="Hugging Face model directory (architecture, tokenizer, initial weights)"
    )
    g.add_argument("--ref-load", metavar="DIR", help="reference model checkpoint (KL)")
    g.add_argument("--load", metavar="DIR", help="resume from this checkpoint directory")
    g.add_argument("--save", metavar="DIR", help="save checkpoints here: every --save-interval rollouts, or after the last one when no interval is given")
    g.add_argument("--overwrite-save", action="store_true",
                   help="let --save name a directory holding another run's checkpoints (they are deleted)")
    g.add_argument("--save-interval", type=int, metavar="N", help="save every N rollouts (and after the last)")
    g.add_argument("--save-hf", metavar="PATTERN",
                   help="also export HF weights with each checkpoint and at the end, to this path with "
                        "{rollout_id} filled in, e.g. out/hf_{rollout_id}")
    g.add_argument("--no-save-optim", action="store_true", help="do not save optimizer state")


def _data(p: PlugrlArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--prompt-data", metavar="PATH[@[START:END]]", help="prompt file (.jsonl, .parquet or a saved dataset)"
    )
    g.add_argument("--input-key", default="input", help="row key of the prompt")
    g.add_argument("--label-key", help="row key of the label")
    g.add_argument("--metadata-key", default="metadata", help="row key of per-row metadata")
    g.add_argument("--tool-key", default="tools", help="row key of tool definitions")
    g.add_argument(
        "--apply-chat-template", action="store_true", help="render prompts with the tokenizer's chat template"
    )
    g.add_argument(
        "--apply-chat-template-kwargs", type=json_object, metavar="JSON", help="extra chat-template arguments"
    )
    g.add_argument("--rollout-shuffle", action="store_true", help="shuffle prompts each epoch")
    g.add_argument("--rollout-seed", type=int, default=42, help="seed of the prompt shuffle")
    g.add_argument("--num-rollout", type=int, metavar="N", help="number of rollouts (train steps of the loop)")
    g.add_argument(
        "--num-epoch", type=int, metavar="N", help="epochs over --prompt-data (when --num-rollout is not given)"
    )
    g.add_argument(
        "--rollout-max-prompt-len",
        type=int,
        metavar="TOKENS",
        help="drop longer prompts (default: --rollout-max-context-len - 1)",
    )
    g.add_argument("--skip-bad-rows", action="store_true", help="skip malformed rows instead of stopping")


def _rollout(p: PlugrlArgumentParser) -> None:
    g = p.add_argument_group("rollout")
    g.add_argument("--rollout-batch-size", type=int, metavar="PROMPTS", help="prompts (groups) per rollout; required")
    g.add_argument("--n-samples-per-prompt", type=int, default=1, help="samples per prompt (group size)")
    g.add_argument(
        "--over-sampling-batch-size",
        type=int,
        help="prompts submitted per sampling round (default: --rollout-batch-size)",
    )
    g.add_argument("--rollout-max-response-len", type=int, metavar="TOKENS", help="max new tokens per response")
    g.add_argument("--rollout-max-context-len", type=int, metavar="TOKENS", help="max prompt + response tokens")
    g.add_argument("--rollout-temperature", type=float, default=1.0)
    g.add_argument("--rollout-top-p", type=float, default=1.0)
    g.add_argument("--rollout-top-k", type=int, default=-1)
    g.add_argument("--rollout-stop", nargs="*", metavar="TEXT", help="stop strings")
    g.add_argument("--rollout-stop-token-ids", nargs="*", type=int, metavar="ID", help="stop token ids")
    g.add_argument("--rollout-skip-special-tokens", action="store_true")
    g.add_argument(
        "--partial-rollout",
        action="store_true",
        help="keep aborted groups in the buffer and continue them next rollout",
    )
    g.add_argument(
        "--mask-offpolicy-in-partial-rollout", action="store_true", help="do not train on tokens of older policies"
    )
    g.add_argument("--update-weights-interval", type=int, default=1, help="push weights every N rollouts (async loop)")
    g.add_argument(
        "--update-weight-buffer-size",
        type=parse_size,
        default=512 * 1024**2,
        metavar="SIZE",
        help="bucket size of the weight push: 512MiB, 1GB or bytes",
    )
    g.add_argument(
        "--weight-transport",
        choices=["auto", "cuda_ipc", "broadcast", "object_store"],
        default="auto",
        help="how weights reach the engines: auto picks from where they are (cuda_ipc when colocated on one GPU, "
        "broadcast when the engines are on other GPUs, object_store otherwise); object_store is the fallback "
        "that works everywhere",
    )
    g.add_argument(
        "--rollout-concurrency",
        type=int,
        default=512,
        help="in-flight samples per engine (--sglang-server-concurrency is its sglang spelling)",
    )
    g.add_argument("--use-fault-tolerance", action="store_true", help="restart engines that fail health checks (not implemented yet: refused)")
    g.add_argument(
        "--overlong-buffer-len",
        type=int,
        metavar="TOKENS",
        help="DAPO overlong buffer (with --reward-post-process overlong_penalty)",
    )
    g.add_argument("--overlong-penalty-factor", type=float, default=1.0)
    g.add_argument("--disable-rewards-normalization", action="store_true", help="no group normalisation of rewards")
    g.add_argument(
        "--disable-grpo-std-normalization", action="store_true", help="center only, no std division (Dr.GRPO)"
    )


def _eval(p: PlugrlArgumentParser) -> None:
    g = p.add_argument_group("eval")
    g.add_argument("--eval-interval", type=int, metavar="N", help="evaluate before training and every N rollouts (0: never)")
    g.add_argument(
        "--eval-prompt-data", nargs="+", metavar="NAME PATH", help="NAME PATH pairs (a single PATH is named aime)"
    )
    g.add_argument("--n-samples-per-eval-prompt", type=int, default=1)
    g.add_argument("--eval-max-response-len", type=int, help="(default: --rollout-max-response-len)")
    g.add_argument("--eval-temperature", type=float, help="(default: --rollout-temperature)")
    g.add_argument("--eval-top-p", type=float, help="(default: --rollout-top-p)")
    g.add_argument("--eval-top-k", type=int, help="(default: --rollout-top-k)")
    g.add_argument("--eval-input-key", help="(default: --input-key)")
    g.add_argument("--eval-label-key", help="(default: --label-key)")


def _algorithm(p: PlugrlArgumentParser) -> None:
    g = p.add_argument_group("algorithm")
    g.add_argument("--loss-type", default="policy_loss", metavar="{policy_loss,sft_loss,custom_loss}",
                   help="custom_loss is not implemented: refused")
    g.add_argument("--use-kl-loss", action="store_true", help="add kl_loss_coef * KL(policy, ref) to the loss")
    g.add_argument("--kl-loss-coef", type=float, default=0.0)
    g.add_argument("--kl-loss-type", default="k1", metavar="{k1,k2,k3,low_var_kl}")
    g.add_argument("--kl-coef", type=float, default=0.0, help="reward-shaping KL coefficient (not with --kl-loss-coef)")
    g.add_argument("--use-unbiased-kl", action="store_true")
    g.add_argument("--entropy-coef", type=float, default=0.0)
    g.add_argument("--eps-clip", type=float, default=0.2)
    g.add_argument("--eps-clip-high", type=float, help="upper clip (default: --eps-clip)")
    g.add_argument("--eps-clip-c", type=float, help="dual-clip constant, > 1")
    g.add_argument("--use-tis", action="store_true", help="truncated importance sampling against rollout log-probs")
    g.add_argument("--tis-clip", type=float, default=2.0)
    g.add_argument("--tis-clip-low", type=float, default=0.0)
    g.add_argument("--tis-level", metavar="{token,sequence,geometric}",
                   help="TIS ratio per token, of the whole sample (product) or its geometric mean (default token)")
    g.add_argument("--use-rs", action="store_true",
                   help="rejection sampling (MIS; IcePop at token level): mask tokens/samples whose train/rollout "
                        "ratio leaves [--rs-lower-bound, --rs-upper-bound]")
    g.add_argument("--rs-level", metavar="{token,sequence,geometric}", help="(default token)")
    g.add_argument("--rs-lower-bound", type=float, help="(default 1 / --rs-upper-bound)")
    g.add_argument("--rs-upper-bound", type=float, help="(default --tis-clip)")
    g.add_argument("--rs-veto-threshold", type=float,
                   help="mask a whole sample when one of its tokens has a train/rollout ratio below this")
    g.add_argument("--loss-agg-mode", metavar="{seq-mean-token-mean,token-mean,seq-mean-token-sum,seq-mean-token-sum-norm}",
                   help="loss aggregation (default seq-mean-token-mean; token-mean with --calculate-per-token-loss; "
                        "the estimator's, e.g. dr_grpo's seq-mean-token-sum-norm)")
    g.add_argument("--loss-scale-factor", type=float,
                   help="constant divisor of seq-mean-token-sum-norm (default --rollout-max-response-len)")
    g.add_argument("--use-rollout-logprobs", action="store_true", help="use the engine's log-probs as old log-probs")
    g.add_argument("--calculate-per-token-loss", action="store_true")
    g.add_argument("--normalize-advantages", action="store_true")
    g.add_argument("--gamma", type=float, default=1.0)
    g.add_argument("--lambd", type=float, default=1.0)
    g.add_argument("--value-clip", type=float, default=0.2,
                   help="PPO value-function clip (slime's flag; no effect: plugrl's estimators train no critic)")
    g.add_argument("--num-steps-per-rollout", type=int, help="optimizer steps per rollout (sets --global-batch-size)")
    g.add_argument(
        "--global-batch-size",
        type=int,
        help="samples per optimizer step (default: rollout-batch-size * n-samples-per-prompt / num-steps-per-rollout)",
    )


def _training(p: PlugrlArgumentParser) -> None:
    g = p.add_argument_group("training (all backends)")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument(
        "--use-dynamic-batch-size", action="store_true", help="pack micro-batches up to --max-tokens-per-gpu"
    )
    g.add_argument("--max-tokens-per-gpu", type=int)
    g.add_argument("--balance-data", action="store_true", help="balance tokens across data-parallel ranks")
    g.add_argument("--optimizer", default="adam")
    g.add_argument("--lr", type=float, default=1e-6)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="constant", metavar="{constant,linear,cosine}")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float)
    g.add_argument("--lr-decay-iters", type=int)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--bf16", action="store_true", default=None,
                   help="train in bf16 (default: bf16 when the train actors run on CUDA, fp32 on CPU)")
    g.add_argument("--fp32", action="store_true", help="train in fp32 (the torch backend; SDPA attention on CUDA)")
    g.add_argument(
        "--sft-warmup-steps", type=int, default=0, help="supervised format warm-up steps before RL (0 = off)"
    )
    g.add_argument("--sft-warmup-data", metavar="PATH", help="JSONL of prompt/response rows for the warm-up")
    g.add_argument("--sft-warmup-lr", type=float, help="(default: --lr)")
    g.add_argument("--sft-warmup-batch-size", type=int, help="rows per warm-up step (default: --rollout-batch-size)")
    g.add_argument(
        "--sft-warmup-prompt-loss-weight", type=float, default=0.0, help="weight of prompt tokens in the warm-up loss"
    )


def _logging(p: PlugrlArgumentParser) -> None:
    g = p.add_argument_group("logging")
    g.add_argument("--use-tensorboard", action="store_true")
    g.add_argument("--use-wandb", action="store_true")
    g.add_argument("--wandb-project")
    g.add_argument("--wandb-group")
    g.add_argument("--wandb-key", help="wandb API key (wandb.login; never written to config.yaml or checkpoints; "
                   "WANDB_API_KEY in the environment works too)")
    g.add_argument("--wandb-mode", metavar="{online,offline,disabled}")
    g.add_argument("--log-interval", type=int, default=1,
                   help="print the console line every N rollouts (and the last); metrics.jsonl gets every rollout")


def _custom_functions(p: PlugrlArgumentParser) -> None:
    g = p.add_argument_group(
        "custom functions (slime --*-path)",
        "module.attr or module:attr of a function with slime's signature (docs/plugin-guide.md, 'slime --*-path "
        "functions'); imported by the loop.",
    )
    g.add_argument("--custom-generate-function-path", metavar="MODULE.ATTR")
    g.add_argument("--rollout-sample-hook-path", action=ReplaceAppendAction, metavar="MODULE.ATTR", help="(repeatable)")
    g.add_argument("--custom-reward-post-process-path", metavar="MODULE.ATTR")
    g.add_argument("--custom-advantage-function-path", metavar="MODULE.ATTR")
    g.add_argument("--custom-loss-function-path", metavar="MODULE.ATTR",
                   help="not implemented: refused (use --custom-pg-loss-reducer-function-path)")
    g.add_argument("--custom-pg-loss-reducer-function-path", metavar="MODULE.ATTR")
    g.add_argument("--custom-config-path", metavar="YAML", help="YAML whose keys become extra attributes of args")


def add_core_flags(parser: PlugrlArgumentParser) -> None:
    """Every flag plugrl core owns, in the group order of ``plugrl train --help``."""
    for add_group in (
        _run_and_cluster,
        _plugins,
        _checkpoints,
        _data,
        _rollout,
        _eval,
        _algorithm,
        _training,
        _logging,
        _custom_functions,
    ):
        add_group(parser)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """An invalid run configuration; ``problems`` lists each one (flag + what to do)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [message])


META_KEYS = ("recipe",)  # config keys read before the flags (--recipe named in a YAML)
# Flags never written to config.yaml, checkpoints or the wandb run config (credentials)
SECRET_DESTS = ("wandb_key",)


def without_secrets(config: dict) -> dict:
    """``config`` minus the ``SECRET_DESTS`` keys (the dict a run writes to its files)."""
    return {k: v for k, v in config.items() if k not in SECRET_DESTS}


# --------------------------------------------------------------------------------------------------
# Layers: recipe and YAML values, coerced to the flags' types
# --------------------------------------------------------------------------------------------------


@dataclass
class Layer:
    source: str
    values: dict = field(default_factory=dict)  # dest -> value
    flags: set = field(default_factory=set)  # canonical flags it sets
    passthrough: dict = field(default_factory=dict)  # passthrough dest -> {key: value}
    extra: dict = field(default_factory=dict)  # non-flag attributes (config_to_dict's "extra")


def _scalar(action: argparse.Action, value: Any, fail) -> Any:
    kind = action.type
    if kind is None:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            fail(f"expects text, got {value!r}")
        return str(value)
    if kind in (int, float) and isinstance(value, (bool, int, float)):
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            fail(f"expects {'an integer' if kind is int else 'a number'}, got {value!r}")
        return kind(value)
    try:
        return kind(value)
    except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
        fail(f"has an invalid value {value!r} ({exc})")


def coerce_value(action: argparse.Action, value: Any, where: str, key: str) -> Any:
    """A recipe/YAML value as the command line would have produced it."""

    def fail(why: str):
        raise ConfigError(f"{where}: '{key}' ({canonical_flag(action)}) {why}")

    if value is None:
        return None
    if isinstance(action, KeyValueAction):
        if isinstance(value, dict):
            return {str(k): v for k, v in value.items()}
        try:
            return dict(key_value(item) for item in (value if isinstance(value, list) else [value]))
        except argparse.ArgumentTypeError as exc:
            fail(str(exc))
    if action.nargs == 0:
        if not isinstance(value, bool):
            fail(f"is a switch: write true or false, not {value!r}")
        return value
    if isinstance(action, ReplaceAppendAction) or action.nargs in ("*", "+"):
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        return [_scalar(action, item, fail) for item in items]
    if isinstance(value, (list, tuple)):
        fail(f"takes one value, got {value!r}")
    return _scalar(action, value, fail)


def _unknown_key(parser: PlugrlArgumentParser, where: str, key: str) -> ConfigError:
    dashed = "--" + key.lstrip("-").replace("_", "-")
    close = difflib.get_close_matches(dashed, parser.all_flag_names(), n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0][2:]}'?" if close else " Keys are flag names (`plugrl train --help`)."
    return ConfigError(f"{where}: unknown key '{key}'.{hint}")


def read_layer(parser: PlugrlArgumentParser, raw: dict, where: str, source: str) -> Layer:
    """Map ``{flag-or-dest: value}`` onto the parser's actions; unknown keys are errors."""
    layer = Layer(source)
    passthrough_dests = {spec.dest: spec for spec in parser.passthroughs}
    for key, value in raw.items():
        key = str(key)
        bare = key.lstrip("-")
        if bare in META_KEYS:
            continue
        if bare == "config":
            raise ConfigError(f"{where}: '{key}' cannot name another config file; merge the files instead")
        if bare == "extra":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: 'extra' must be a mapping of attribute names to values")
            layer.extra.update(value)
            continue
        action = parser.action_for_key(bare)
        if action is not None:
            value = coerce_value(action, value, where, key)
            negated = "--" + bare.replace("_", "-") != canonical_flag(action) and bare.replace("_", "-")[:3] == "no-"
            if isinstance(action, argparse.BooleanOptionalAction) and negated and value is not None:
                value = not value  # `no-offload-train: true` means offload_train = False
            layer.values[action.dest] = value
            layer.flags.add(canonical_flag(action))
            continue
        if bare.replace("-", "_") in passthrough_dests and isinstance(value, dict):
            layer.passthrough.setdefault(bare.replace("-", "_"), {}).update(value)
            continue
        spec = parser.passthrough_for("--" + bare.replace("_", "-"))
        if spec is None:
            raise _unknown_key(parser, where, key)
        name = bare.replace("_", "-")[len(spec.prefix) - 2 :]
        layer.passthrough.setdefault(spec.dest, {})[name.replace("-", "_")] = value
    return layer


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word; for flags (``rollout_batch_size`` and
    ``rollout-batch-size`` name the same one) that silently drops a setting, so a repeat is an error."""


def _mapping_without_repeats(loader, node, deep=False):
    seen: dict = {}
    for key_node, _value in node.value:
        key = loader.construct_object(key_node, deep=deep)
        same = key.replace("-", "_") if isinstance(key, str) else key
        if same in seen:
            first, line = seen[same]
            also = "" if first == key else f" (as {first!r})"
            raise yaml.constructor.ConstructorError(
                None, None, f"{key!r} is given twice: also on line {line}{also}; keep one", key_node.start_mark)
        seen[same] = (key, key_node.start_mark.line + 1)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)


def read_yaml(path: str, what: str) -> dict:
    """A YAML mapping (``--config``, ``--custom-config-path``); ``what`` names the flag in errors."""
    if Path(path).is_dir():
        raise ConfigError(f"{what} {path}: is a directory; give the YAML file itself")
    if not Path(path).is_file():
        raise ConfigError(f"{what} {path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path}: not valid YAML ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: the top level must be a mapping of flag names to values")
    return data


# --------------------------------------------------------------------------------------------------
# Command line: explicit flags and passthrough words
# --------------------------------------------------------------------------------------------------


def looks_like_flag(word: str) -> bool:
    if not word.startswith("-") or word == "-":
        return False
    try:
        float(word)
        return False
    except ValueError:
        return True


def cli_flags(parser: PlugrlArgumentParser, argv: list[str]) -> set[str]:
    """The canonical names of the flags ``argv`` gives (abbreviations are off, so words match exactly)."""
    flags = set()
    for word in argv:
        if word == "--":
            break
        action = parser.action_for_option(word.split("=", 1)[0]) if looks_like_flag(word) else None
        if action is not None:
            flags.add(canonical_flag(action))
    return flags


def passthrough_words(parser: PlugrlArgumentParser, extras: list[str]) -> tuple[dict, list[str]]:
    """``--sglang-foo-bar V`` / ``--sglang-foo=V`` / bare ``--sglang-foo`` -> {dest: {"foo_bar": V}}."""
    collected: dict[str, dict] = {}
    unknown: list[str] = []
    i = 0
    while i < len(extras):
        word = extras[i]
        spec = parser.passthrough_for(word.split("=", 1)[0]) if word.startswith("--") else None
        if spec is None:
            unknown.append(word)
            i += 1
            continue
        name, eq, text = word[len(spec.prefix) :].partition("=")
        if eq:
            value, i = text, i + 1
        else:
            j = i + 1
            while j < len(extras) and not looks_like_flag(extras[j]):
                j += 1
            words = extras[i + 1 : j]
            value = True if not words else words[0] if len(words) == 1 else list(words)
            i = j
        collected.setdefault(spec.dest, {})[name.replace("-", "_")] = value
    return collected, unknown


def check_reserved(parser: PlugrlArgumentParser, passthrough: dict) -> None:
    """Refuse passthrough flags that plugrl sets itself (e.g. ``--sglang-tp-size``)."""
    for spec in parser.passthroughs:
        for key in passthrough.get(spec.dest, {}):
            reason = spec.reserved.get(key.replace("_", "-"))
            if reason:
                raise ConfigError(f"{spec.prefix}{key.replace('_', '-')} is set by plugrl ({reason}); drop it")

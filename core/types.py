"""Plain data types shared by every process: a generated ``Sample``, its ``Status``, filter decisions.

Field names and status strings follow slime's ``Sample`` so that a slime user's custom functions
(rewards, filters, buffer filters) read and write the same attributes.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any


def option(args: Any, key: str, default: Any) -> Any:
    """``args.<key>``, or ``default`` when it is missing or None (a flag left unset): how backends,
    estimators and losses read the run config, which may be a bare namespace in tests."""
    value = getattr(args, key, None) if args is not None else None
    return default if value is None else value


class Status(str, enum.Enum):
    PENDING = "pending"
    COMPLETED = "completed"
    TRUNCATED = "truncated"
    ABORTED = "aborted"
    FAILED = "failed"


# SGLang's finish_reason.type -> the status a sample takes; other types leave the status unchanged.
FINISH_REASON_STATUS = {"stop": Status.COMPLETED, "length": Status.TRUNCATED, "abort": Status.ABORTED}


@dataclass
class SpecInfo:
    spec_accept_token_num: int = 0
    spec_draft_token_num: int = 0
    spec_verify_ct: int = 0
    completion_token_num: int = 0

    @property
    def spec_accept_rate(self) -> float:
        return self.spec_accept_token_num / self.spec_draft_token_num if self.spec_draft_token_num else 0.0

    @property
    def spec_accept_length(self) -> float:
        return self.completion_token_num / self.spec_verify_ct if self.spec_verify_ct else 0.0


@dataclass
class PrefixCacheInfo:
    cached_tokens: int = 0
    total_prompt_tokens: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.cached_tokens / self.total_prompt_tokens if self.total_prompt_tokens else 0.0


@dataclass
class Sample:
    """One prompt and (after generation) one response; ``n`` deep copies of a prompt form a group."""

    group_index: int | None = None
    index: int | None = None
    rollout_id: int | None = None
    prompt: str | list[dict] = ""
    tokens: list[int] = field(default_factory=list)  # prompt + response token ids
    multimodal_inputs: Any = None
    multimodal_train_inputs: Any = None
    multimodal_train_input_id: Any = None
    apply_chat_template_kwargs: dict = field(default_factory=dict)
    response: str = ""
    response_length: int = 0
    label: Any = None
    reward: float | dict | None = None
    loss_mask: list[int] | None = None  # length == response_length when set
    weight_versions: list[str] = field(default_factory=list)
    rollout_log_probs: list[float] | None = None
    rollout_top_p_token_ids: Any = None
    rollout_top_p_token_offsets: Any = None
    rollout_routed_experts: Any = None
    remove_sample: bool = False
    teacher_log_probs: list[float] | None = None
    status: Status = Status.PENDING
    metadata: dict = field(default_factory=dict)
    generate_function_path: str | None = None
    custom_rm_path: str | None = None
    train_metadata: dict | None = None
    session_id: str | None = None
    non_generation_time: float = 0.0
    spec_info: SpecInfo = field(default_factory=SpecInfo)
    prefix_cache_info: PrefixCacheInfo = field(default_factory=PrefixCacheInfo)

    # ---- derived values -------------------------------------------------------------------------
    @property
    def prompt_length(self) -> int:
        return len(self.tokens) - self.response_length

    @property
    def effective_response_length(self) -> int:
        return sum(self.loss_mask) if self.loss_mask is not None else self.response_length

    def get_reward_value(self, args: Any = None, reward_key: str | None = None) -> float:
        """The scalar reward: ``reward[reward_key]`` for dict rewards (``--reward-key``), else ``reward``."""
        key = reward_key if reward_key is not None else getattr(args, "reward_key", None)
        if isinstance(self.reward, dict):
            if not key:
                raise ValueError(
                    f"reward is a dict with keys {sorted(self.reward)}; pass --reward-key to pick the scalar"
                )
            if key not in self.reward:  # a mistyped --reward-key: name it and what the reward gave
                raise ValueError(f"--reward-key {key}: the reward returned a dict without that key (its keys: "
                                 f"{', '.join(repr(k) for k in sorted(self.reward, key=str))}); pass --reward-key "
                                 "with one of them")
            return self.reward[key]
        return self.reward

    # ---- generation bookkeeping -----------------------------------------------------------------
    def append_response_tokens(
        self,
        new_tokens: list[int],
        log_probs: list[float] | None = None,
        *,
        text: str = "",
        trainable: bool = True,
        finish_reason: str | None = None,
        weight_version: str | None = None,
    ) -> None:
        """Append generated (trainable) or environment (non-trainable) tokens; keeps the invariants
        ``len(loss_mask) == len(rollout_log_probs) == response_length``."""
        if trainable and log_probs is None:
            raise ValueError("trainable tokens need their rollout log-probs")
        if not trainable and log_probs is not None:
            raise ValueError("non-trainable tokens must not carry log-probs")
        if log_probs is not None and len(log_probs) != len(new_tokens):
            raise ValueError(f"{len(new_tokens)} tokens but {len(log_probs)} log-probs")
        if self.loss_mask is None:
            self.loss_mask = [1] * self.response_length
        if self.rollout_log_probs is None:
            self.rollout_log_probs = [0.0] * self.response_length
        self.tokens = list(self.tokens) + list(new_tokens)
        self.response_length += len(new_tokens)
        self.loss_mask += [1 if trainable else 0] * len(new_tokens)
        self.rollout_log_probs += list(log_probs) if log_probs is not None else [0.0] * len(new_tokens)
        self.response += text
        if weight_version is not None:
            self.weight_versions.append(str(weight_version))
        if finish_reason is not None and finish_reason in FINISH_REASON_STATUS:
            self.status = FINISH_REASON_STATUS[finish_reason]

    # ---- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Status):
                value = value.value
            elif dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            else:
                value = copy.deepcopy(value)
            out[f.name] = value
        out.update({k: copy.deepcopy(v) for k, v in self.__dict__.items() if k not in out})
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Sample":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        extra = {k: data.pop(k) for k in list(data) if k not in known}
        if "status" in data:
            data["status"] = Status(data["status"])
        if isinstance(data.get("spec_info"), dict):
            data["spec_info"] = SpecInfo(**data["spec_info"])
        if isinstance(data.get("prefix_cache_info"), dict):
            data["prefix_cache_info"] = PrefixCacheInfo(**data["prefix_cache_info"])
        sample = cls(**data)
        for k, v in extra.items():  # slime keeps unknown keys as attributes
            setattr(sample, k, v)
        return sample


@dataclass(frozen=True)
class FilterDecision:
    """What a dynamic-sampling filter says about one group (slime's ``DynamicFilterOutput``)."""

    keep: bool
    reason: str | None = None
    keep_when_insufficient: bool = False

    @classmethod
    def coerce(cls, value: Any) -> "FilterDecision":
        """A filter's return value as a decision. As in slime, anything that is not a decision is
        ``keep=bool(value)``: a bool, a 0-d tensor (the guide's ``torch.tensor(rewards).std() > 0.0``),
        a numpy bool, an int. An object with ``.keep`` is read as slime's ``DynamicFilterOutput``.
        ``None`` (a filter that forgot to ``return``) and values whose truth is ambiguous (a tensor or
        array of several elements) raise ``TypeError``; callers name the filter."""
        if isinstance(value, cls):
            return value
        if hasattr(value, "keep"):  # duck-typed slime DynamicFilterOutput
            return cls(_truth(value.keep, "keep"), getattr(value, "reason", None),
                       _truth(getattr(value, "keep_when_insufficient", False), "keep_when_insufficient"))
        return cls(keep=_truth(value, "its return value"))


def _truth(value: Any, what: str) -> bool:
    if value is None:
        raise TypeError(f"{what} is None (a missing return?); return a bool or FilterDecision")
    try:
        return bool(value)
    except (RuntimeError, ValueError, TypeError) as exc:  # torch/numpy: several elements have no single truth
        shape = getattr(value, "shape", None)
        raise TypeError(f"{what} ({type(value).__name__}{'' if shape is None else f' of shape {tuple(shape)}'}) "
                        f"has no single truth value ({exc}); return one bool per group or a FilterDecision") from exc


Group = list[Sample]

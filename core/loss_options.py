"""Names and driver checks of the loss options that are not an estimator: the loss-aggregation mode
(``--loss-agg-mode``, Dr.GRPO's constant normaliser) and the rollout/train mismatch corrections
(``--use-tis``/``--tis-level``, ``--use-rs``/``--rs-*``: TIS, MIS, IcePop). The formulas are in
``core/losses.py``; this module is torch-free so the driver can check a config on any laptop.

``loss_option_problems(args)`` runs on the driver (``check_config``, ``--dry-run`` too);
``resolve_loss_agg_mode`` runs in the train actors (``rl_step``) and in the checks.
"""

from __future__ import annotations

from typing import Any

from .types import option as _opt

# verl's names (``actor.loss_agg_mode``); slime's default is seq-mean-token-mean and its
# --calculate-per-token-loss is token-mean.
SEQ_MEAN_TOKEN_MEAN = "seq-mean-token-mean"
TOKEN_MEAN = "token-mean"
SEQ_MEAN_TOKEN_SUM = "seq-mean-token-sum"
SEQ_MEAN_TOKEN_SUM_NORM = "seq-mean-token-sum-norm"
LOSS_AGG_MODES = (SEQ_MEAN_TOKEN_MEAN, TOKEN_MEAN, SEQ_MEAN_TOKEN_SUM, SEQ_MEAN_TOKEN_SUM_NORM)

# slime's (examples/train_infer_mismatch_helper): how a train/rollout ratio is formed per sample.
RATIO_LEVELS = ("token", "sequence", "geometric")


def resolve_loss_agg_mode(args: Any, estimator_default: str | None = None) -> str:
    """The aggregation in force: ``--loss-agg-mode`` if given, else ``token-mean`` under
    ``--calculate-per-token-loss``, else the estimator's declared default (``dr_grpo``:
    seq-mean-token-sum-norm), else slime's per-sample token mean."""
    mode = _opt(args, "loss_agg_mode", None)
    if mode is not None:
        return str(mode)
    if bool(_opt(args, "calculate_per_token_loss", False)):
        return TOKEN_MEAN
    return estimator_default or SEQ_MEAN_TOKEN_MEAN


def loss_scale_factor(args: Any) -> float:
    """The constant ``C`` of seq-mean-token-sum-norm: ``--loss-scale-factor``, else the generation
    budget ``--rollout-max-response-len`` (Dr.GRPO divides every sequence by the same MAX_TOKENS)."""
    value = _opt(args, "loss_scale_factor", None)
    if value is None:
        value = _opt(args, "rollout_max_response_len", None)
    if value is None:
        raise ValueError("--loss-agg-mode seq-mean-token-sum-norm needs --loss-scale-factor or "
                         "--rollout-max-response-len (the constant length normaliser)")
    return float(value)


def loss_agg_problems(args: Any, estimator_default: str | None = None) -> list[str]:
    """Problems of the aggregation flags given the estimator's default mode."""
    problems: list[str] = []
    mode = _opt(args, "loss_agg_mode", None)
    if mode is not None and mode not in LOSS_AGG_MODES:
        problems.append(f"--loss-agg-mode '{mode}' is not one of {', '.join(LOSS_AGG_MODES)}")
        return problems
    per_token = bool(_opt(args, "calculate_per_token_loss", False))
    if mode is not None and mode != TOKEN_MEAN and per_token:
        problems.append(f"--calculate-per-token-loss is --loss-agg-mode token-mean; it contradicts "
                        f"--loss-agg-mode {mode}: keep one")
    elif mode is None and per_token and estimator_default not in (None, TOKEN_MEAN):
        problems.append(f"--advantage-estimator {_opt(args, 'advantage_estimator', '?')} aggregates the loss "
                        f"{estimator_default}; --calculate-per-token-loss contradicts it (give --loss-agg-mode "
                        f"to choose)")
    if resolve_loss_agg_mode(args, estimator_default) == SEQ_MEAN_TOKEN_SUM_NORM:
        try:
            if not loss_scale_factor(args) > 0:
                problems.append(f"--loss-scale-factor must be > 0, got {loss_scale_factor(args)}")
        except ValueError as exc:
            problems.append(str(exc))
    elif _opt(args, "loss_scale_factor", None) is not None:
        problems.append("--loss-scale-factor only applies to --loss-agg-mode seq-mean-token-sum-norm")
    return problems


def mismatch_problems(args: Any) -> list[str]:
    """Problems of ``--tis-level`` and the rejection-sampling (``--use-rs``) flags."""
    problems: list[str] = []
    tis_level = _opt(args, "tis_level", "token")
    if tis_level not in RATIO_LEVELS:
        problems.append(f"--tis-level '{tis_level}' is not one of {', '.join(RATIO_LEVELS)}")
    rs_level = _opt(args, "rs_level", "token")
    if rs_level not in RATIO_LEVELS:
        problems.append(f"--rs-level '{rs_level}' is not one of {', '.join(RATIO_LEVELS)}")
    use_rs = bool(_opt(args, "use_rs", False))
    rs_given = [f for f, k in (("--rs-lower-bound", "rs_lower_bound"), ("--rs-upper-bound", "rs_upper_bound"),
                               ("--rs-veto-threshold", "rs_veto_threshold")) if _opt(args, k, None) is not None]
    if _opt(args, "rs_level", None) not in (None, "token"):
        rs_given.append("--rs-level")
    if rs_given and not use_rs:
        problems.append(f"{', '.join(rs_given)} only appl{'y' if len(rs_given) > 1 else 'ies'} with --use-rs")
    if use_rs:
        if bool(_opt(args, "use_rollout_logprobs", False)):
            problems.append("--use-rs compares recomputed log-probs with the rollout's; --use-rollout-logprobs "
                            "makes them equal (nothing would be masked): keep one")
        low, high = rs_bounds(args)
        if not 0.0 <= low < high:
            problems.append(f"--rs-lower-bound {low} and --rs-upper-bound {high} must satisfy 0 <= lower < upper")
        veto = _opt(args, "rs_veto_threshold", None)
        if veto is not None and not 0.0 < float(veto) < 1.0:
            problems.append(f"--rs-veto-threshold must be in (0, 1), got {veto}")
    if _opt(args, "tis_level", None) not in (None, "token") and not bool(_opt(args, "use_tis", False)):
        problems.append("--tis-level only applies with --use-tis")
    return problems


def rs_bounds(args: Any) -> tuple[float, float]:
    """``[low, high]`` of ``--use-rs``: ``--rs-upper-bound`` (default ``--tis-clip``, 2.0) and
    ``--rs-lower-bound`` (default ``1 / upper``, the band symmetric in log space)."""
    high = float(_opt(args, "rs_upper_bound", _opt(args, "tis_clip", 2.0)))
    low = _opt(args, "rs_lower_bound", None)
    return (1.0 / high if low is None and high > 0 else float(low or 0.0)), high


def estimator_loss_agg_mode(estimator: Any) -> str | None:
    """The aggregation an estimator class or instance declares (class var ``loss_agg_mode``; ``None``:
    the run's default)."""
    return getattr(estimator, "loss_agg_mode", None)


def loss_option_problems(args: Any, plugin_set: Any = None) -> list[str]:
    """Every driver check of this module; the selected estimator's declared aggregation is looked up
    in ``plugin_set`` (an unknown estimator is reported by the plugin checks, not here)."""
    default = None
    name = _opt(args, "advantage_estimator", None)
    if plugin_set is not None and name and name in plugin_set.registries["advantage_estimator"]:
        try:
            default = estimator_loss_agg_mode(plugin_set.get("advantage_estimator", name))
        except Exception:  # an unloadable estimator is reported by the plugin checks
            default = None
    return loss_agg_problems(args, default) + mismatch_problems(args)

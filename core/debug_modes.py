"""slime's debug modes on the driver: ``--debug-rollout-only`` (generate, score and evaluate; no train
actors, no training, no weight pushes, no checkpoints, as slime's train actors do nothing then) and
``--debug-train-only``, which plugrl does not implement (slime trains it from rollouts saved by
``--save-debug-rollout-data``, flags plugrl lacks), so it is refused before Ray starts."""

from __future__ import annotations


def _typed(args, flag: str) -> bool:
    """The user gave ``flag`` (a recipe's value is not theirs to drop)."""
    from .config import _from_recipe

    return flag in (getattr(args, "_sources", None) or {}) and not _from_recipe(args, flag)


def debug_mode_problems(args) -> list[str]:
    """``--debug-train-only`` refused; ``--debug-rollout-only`` with what needs a trainer (a checkpoint to
    resume or write, a warm-up) refused, naming the flag."""
    problems = []
    if getattr(args, "debug_train_only", False):
        problems.append("--debug-train-only is not implemented in plugrl (slime trains from rollouts saved with "
                        "--save-debug-rollout-data, which plugrl does not have); drop it")
    if getattr(args, "debug_rollout_only", False):
        needs_trainer = [f"{flag} {getattr(args, dest)}" for flag, dest in
                         (("--load", "load"), ("--save", "save"), ("--save-hf", "save_hf"))
                         if getattr(args, dest, None) and _typed(args, flag)]
        if needs_trainer:
            problems.append(f"--debug-rollout-only generates without training, so there is no trainer state to "
                            f"load or save: drop {', '.join(needs_trainer)} (or --debug-rollout-only)")
    return problems


def rollouts_only(args) -> bool:
    """The loop generates (and evaluates) only: no train actors are started."""
    return bool(getattr(args, "debug_rollout_only", False))


def drop_recipe_trainer_paths(args) -> None:
    """``--debug-rollout-only`` over a recipe that names ``--load``/``--save``/``--save-hf``: the run has no
    trainer state, so those values are dropped (a resume point, the run lock and the start-up tidying of
    ``--save`` would otherwise act on them); values the user typed are refused by ``debug_mode_problems``."""
    if not getattr(args, "debug_rollout_only", False):
        return
    from .config import _from_recipe

    for flag, dest in (("--load", "load"), ("--save", "save"), ("--save-hf", "save_hf")):
        if getattr(args, dest, None) and _from_recipe(args, flag):
            setattr(args, dest, None)

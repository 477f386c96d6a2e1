"""The training schedule: optimizer steps, micro-batches and data-parallel ranks, planned on the CPU.

Runs in the **rollout manager** (a CPU Ray actor) after rewards are post-processed and before the
rollout's data ships to the train actors: slime's "pack first, distribute second" (reference §5).
Every train actor then receives exactly the samples it will run, already cut into micro-batches, so
no train-side all-reduce is needed to agree on micro-batch counts. Pure Python, no torch.

The pipeline for one rollout:

1. :func:`split_into_steps` groups sample positions by rollout id and cuts them into optimizer steps
   of ``G`` rollouts (``G`` from :func:`resolve_global_batch_size`); trailing rollouts that do not
   fill a step are dropped.
2. :func:`plan_micro_batches` packs one step's samples into micro-batches (static chunks of
   ``--micro-batch-size``, or first-fit under ``--max-tokens-per-gpu`` with
   ``--use-dynamic-batch-size``), makes the count a multiple of the DP size, and deals micro-batches to
   DP ranks (Karmarkar–Karp with ``--balance-data``, strided round robin otherwise).
3. :func:`rollout_mask_sums` gives each sample the loss-mask token count of its whole rollout, the
   denominator of the per-sample-mean reducer (reference §2.9/§4.4), so packing cannot change the loss.

:func:`schedule_rollout` chains 1 and 2 and maps step-local positions back to the rollout's sample
positions for every rank.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# The quadratic (attention) term of the default micro-batch cost. For a transformer with hidden size h
# the per-token linear FLOPs are ~24·h² per layer and the attention-score FLOPs ~4·h·L per token, so
# the L² term weighs 1/(6h) relative to L; h≈2.5k (Qwen3-4B) gives ~1/15k. A fixed constant keeps this
# module model-agnostic; pass ``cost_fn`` for an exact FLOP model.
ATTENTION_COST_TOKENS = 16384


# ---------------------------------------------------------------------------------------------------
# Global batch size and optimizer steps
# ---------------------------------------------------------------------------------------------------


def resolve_global_batch_size(
    rollout_batch_size: int,
    n_samples_per_prompt: int,
    global_batch_size: int | None = None,
    num_steps_per_rollout: int | None = None,
) -> int:
    """The number of rollouts per optimizer step, ``G``. Runs on the driver while validating config.

    ``G = B·n // --num-steps-per-rollout`` when that is given; ``--global-batch-size`` when that is
    given (both given: they must agree); neither: one optimizer step per rollout, ``G = B·n``. (slime
    falls back to Megatron's ``micro_batch_size × DP``, which silently means many tiny steps; plugrl
    picks the on-policy default instead, reference §13.7.)

    ``G`` counts rollouts (by default every sample is its own rollout), not prompts.
    """
    for flag, value in (("--rollout-batch-size", rollout_batch_size), ("--n-samples-per-prompt", n_samples_per_prompt)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    per_rollout = rollout_batch_size * n_samples_per_prompt

    from_steps = None
    if num_steps_per_rollout is not None:
        if not isinstance(num_steps_per_rollout, int) or num_steps_per_rollout < 1:
            raise ValueError(f"--num-steps-per-rollout must be a positive integer, got {num_steps_per_rollout!r}")
        if per_rollout % num_steps_per_rollout:
            raise ValueError(
                f"--num-steps-per-rollout {num_steps_per_rollout} does not divide --rollout-batch-size × "
                f"--n-samples-per-prompt = {rollout_batch_size} × {n_samples_per_prompt} = {per_rollout}"
            )
        from_steps = per_rollout // num_steps_per_rollout

    if global_batch_size is not None:
        if not isinstance(global_batch_size, int) or global_batch_size < 1:
            raise ValueError(f"--global-batch-size must be a positive integer, got {global_batch_size!r}")
        if from_steps is not None and from_steps != global_batch_size:
            raise ValueError(
                f"--global-batch-size {global_batch_size} disagrees with --num-steps-per-rollout "
                f"{num_steps_per_rollout}: {rollout_batch_size} × {n_samples_per_prompt} // "
                f"{num_steps_per_rollout} = {from_steps}; give one of the two"
            )
        if global_batch_size > per_rollout:
            raise ValueError(
                f"--global-batch-size {global_batch_size} exceeds the {per_rollout} samples of one rollout "
                f"(--rollout-batch-size {rollout_batch_size} × --n-samples-per-prompt {n_samples_per_prompt}): "
                "no optimizer step could ever be filled"
            )
        return global_batch_size
    return from_steps if from_steps is not None else per_rollout


@dataclass
class StepSplit:
    """Result of :func:`split_into_steps`.

    ``steps[s]`` holds the sample positions of optimizer step ``s`` (rollouts in first-occurrence
    order, each rollout's samples in their original order). ``dropped_rollout_ids`` and
    ``dropped_positions`` are the trailing rollouts that did not fill a step and their samples.
    """

    steps: list[list[int]]
    dropped_rollout_ids: list[int] = field(default_factory=list)
    dropped_positions: list[int] = field(default_factory=list)

    @property
    def num_steps(self) -> int:
        return len(self.steps)


def _group_by_rollout(rollout_ids: Sequence[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}  # dicts keep first-insertion order: first-occurrence order
    for position, rid in enumerate(rollout_ids):
        groups.setdefault(rid, []).append(position)
    return groups


def split_into_steps(rollout_ids: Sequence[int], global_batch_size: int) -> StepSplit:
    """Cut one rollout's samples into optimizer steps of ``global_batch_size`` rollouts.

    Runs in the rollout manager. Samples sharing a rollout id always land in the same step (a
    multi-turn or compact rollout is one unit of the objective). ``num_steps = n_rollouts // G``;
    the remainder is dropped, as slime does, so every step has the same objective weight ``1/G``.
    """
    if global_batch_size < 1:
        raise ValueError(f"--global-batch-size must be a positive integer, got {global_batch_size}")
    groups = _group_by_rollout(rollout_ids)
    num_steps = len(groups) // global_batch_size
    if num_steps == 0:
        raise ValueError(
            f"--global-batch-size {global_batch_size} is larger than the {len(groups)} rollouts "
            f"({len(rollout_ids)} samples) produced by this rollout: not one optimizer step can be filled; "
            "lower --global-batch-size or raise --rollout-batch-size / --n-samples-per-prompt"
        )
    ordered = list(groups.items())
    steps = []
    for s in range(num_steps):
        chunk = ordered[s * global_batch_size : (s + 1) * global_batch_size]
        steps.append([position for _, positions in chunk for position in positions])
    dropped = ordered[num_steps * global_batch_size :]
    return StepSplit(
        steps=steps,
        dropped_rollout_ids=[rid for rid, _ in dropped],
        dropped_positions=[position for _, positions in dropped for position in positions],
    )


def rollout_mask_sums(rollout_ids: Sequence[int], loss_mask_sums: Sequence[int]) -> list[int]:
    """For each sample, the loss-mask token total of every sample sharing its rollout id.

    Runs in the rollout manager (reference §2.9). This is ``D_i`` of the per-sample-mean reducer: a
    rollout split over several micro-batches or ranks still gets one token-weighted mean.
    """
    if len(rollout_ids) != len(loss_mask_sums):
        raise ValueError(f"{len(rollout_ids)} rollout ids but {len(loss_mask_sums)} loss-mask sums")
    totals: dict[int, int] = {}
    for rid, mask_sum in zip(rollout_ids, loss_mask_sums):
        totals[rid] = totals.get(rid, 0) + int(mask_sum)
    return [totals[rid] for rid in rollout_ids]


# ---------------------------------------------------------------------------------------------------
# Karmarkar–Karp (largest differencing method), k-way
# ---------------------------------------------------------------------------------------------------


def karmarkar_karp(costs: Sequence[float], k: int, equal_size: bool) -> list[list[int]]:
    """Partition item indices into ``k`` sets with near-equal cost sums (largest differencing method).

    Every item starts as a partial solution of ``k`` subsets (itself plus ``k−1`` empty ones; with
    ``equal_size`` the items, sorted by cost, are taken ``k`` at a time so each subset starts with
    exactly one item). Repeatedly the two partial solutions with the largest spread (max − min subset
    sum) are merged, pairing the heaviest subset of one with the lightest of the other. The spread of a
    merge never exceeds the larger input spread, so the final spread is at most the largest cost.

    ``equal_size=True`` requires ``len(costs) % k == 0`` and yields subsets of exactly
    ``len(costs) // k`` items. Returns ``k`` lists of indices, each sorted, ordered by first index
    (empty subsets last).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = len(costs)
    if equal_size and n % k:
        raise ValueError(f"equal_size partition needs the item count ({n}) to be a multiple of k ({k})")

    # Sort ascending by cost; ties by index so the result is deterministic.
    order = sorted(range(n), key=lambda i: (costs[i], i))
    if equal_size:
        seeds = [order[g : g + k] for g in range(0, n, k)]
    else:
        seeds = [[i] for i in order]

    counter = itertools.count()
    heap: list[tuple[float, int, list[tuple[float, list[int]]]]] = []
    for seed in seeds:
        subsets = [(float(costs[i]), [i]) for i in seed] + [(0.0, []) for _ in range(k - len(seed))]
        subsets.sort(key=lambda s: s[0])
        spread = subsets[-1][0] - subsets[0][0]
        heapq.heappush(heap, (-spread, next(counter), subsets))

    if not heap:
        return [[] for _ in range(k)]
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)  # both ascending by sum
        _, _, b = heapq.heappop(heap)
        # Heaviest of a with lightest of b: a ascending, b reversed (descending).
        merged = [(sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a, reversed(b))]
        merged.sort(key=lambda s: s[0])
        heapq.heappush(heap, (-(merged[-1][0] - merged[0][0]), next(counter), merged))

    parts = [sorted(items) for _, items in heap[0][2]]
    parts.sort(key=lambda p: (not p, p[0] if p else 0))
    return parts


# ---------------------------------------------------------------------------------------------------
# Micro-batches and DP assignment for one optimizer step
# ---------------------------------------------------------------------------------------------------


def sample_cost(length: int, attention_cost_tokens: int = ATTENTION_COST_TOKENS) -> float:
    """Default per-sample compute estimate: linear layers ∝ L, attention scores ∝ L²."""
    return length + length * length / attention_cost_tokens


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit bins in original order: each sample goes into the first bin it fits, else a new bin.

    A sample longer than ``capacity`` cannot fit any bin, so it gets a bin of its own (and nothing is
    added to that bin later, since it is already over capacity).
    """
    bins: list[list[int]] = []
    loads: list[int] = []
    for position, length in enumerate(lengths):
        for b, load in enumerate(loads):
            if load + length <= capacity:
                bins[b].append(position)
                loads[b] += length
                break
        else:
            bins.append([position])
            loads.append(length)
    return bins


def _split_balanced(bin_positions: list[int], lengths: Sequence[int]) -> tuple[list[int], list[int]]:
    # LPT greedy: longest first into the lighter half; both halves keep the original sample order.
    halves: tuple[list[int], list[int]] = ([], [])
    loads = [0, 0]
    for position in sorted(bin_positions, key=lambda p: (-lengths[p], p)):
        h = 0 if loads[0] <= loads[1] else 1
        halves[h].append(position)
        loads[h] += lengths[position]
    return sorted(halves[0]), sorted(halves[1])


def _align_bins(bins: list[list[int]], lengths: Sequence[int], multiple: int, flag_hint: str) -> list[list[int]]:
    bins = [list(b) for b in bins]
    while len(bins) % multiple:
        splittable = [b for b in range(len(bins)) if len(bins[b]) > 1]
        if not splittable:
            raise ValueError(
                f"cannot make the {len(bins)} micro-batches of a step a multiple of dp_size ({multiple}): every "
                f"micro-batch already holds a single sample ({len(lengths)} samples in the step). {flag_hint}"
            )
        largest = max(splittable, key=lambda b: (sum(lengths[p] for p in bins[b]), -b))
        first, second = _split_balanced(bins[largest], lengths)
        bins[largest : largest + 1] = [first, second]
    return bins


def plan_micro_batches(
    lengths: Sequence[int],
    *,
    micro_batch_size: int = 1,
    use_dynamic_batch_size: bool = False,
    max_tokens_per_gpu: int | None = None,
    dp_size: int = 1,
    balance_data: bool = False,
    cp_size: int = 1,
    cost_fn: Callable[[int], float] | None = None,
) -> list[list[list[int]]]:
    """Pack one optimizer step's samples into micro-batches and deal them to DP ranks.

    Runs in the rollout manager. ``lengths[i]`` is sample i's total token count (prompt + response);
    returned positions index into ``lengths``. Result: ``result[rank]`` is that rank's list of
    micro-batches, each a list of positions in original order; every rank gets the same number of
    micro-batches and every sample appears exactly once.

    * ``use_dynamic_batch_size``: first-fit in original order with capacity
      ``max_tokens_per_gpu × cp_size`` (context parallelism splits each sequence over ``cp_size``
      GPUs); then, while the micro-batch count is not a multiple of ``dp_size``, the micro-batch with
      the most tokens among those holding ≥ 2 samples is split into two token-balanced halves.
    * static: contiguous chunks of ``micro_batch_size`` (the last may be shorter); their count must
      already be a multiple of ``dp_size``.
    * ``balance_data``: Karmarkar–Karp with equal-size partitions over per-micro-batch costs
      (Σ ``cost_fn(L)``, default :func:`sample_cost`); otherwise strided round robin (rank r gets
      micro-batches r, r + dp, ...). A rank's micro-batches keep their packing order.
    """
    n = len(lengths)
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    if cp_size < 1:
        raise ValueError(f"cp_size must be >= 1, got {cp_size}")
    if n < dp_size:
        raise ValueError(
            f"a step has {n} samples but there are {dp_size} data-parallel ranks: every rank needs at least one "
            "sample; raise --global-batch-size or lower the number of training GPUs"
        )
    if any(length < 0 for length in lengths):
        raise ValueError("sample lengths must be non-negative")

    if use_dynamic_batch_size:
        if max_tokens_per_gpu is None:
            raise ValueError("--use-dynamic-batch-size requires --max-tokens-per-gpu")
        if max_tokens_per_gpu < 1:
            raise ValueError(f"--max-tokens-per-gpu must be a positive integer, got {max_tokens_per_gpu}")
        bins = first_fit(lengths, max_tokens_per_gpu * cp_size)
        bins = _align_bins(
            bins,
            lengths,
            dp_size,
            "Choose --global-batch-size so that every step has a multiple of the data-parallel size samples.",
        )
    else:
        if micro_batch_size < 1:
            raise ValueError(f"--micro-batch-size must be a positive integer, got {micro_batch_size}")
        bins = [list(range(start, min(n, start + micro_batch_size))) for start in range(0, n, micro_batch_size)]
        if len(bins) % dp_size:
            raise ValueError(
                f"a step of {n} samples in chunks of --micro-batch-size {micro_batch_size} gives {len(bins)} "
                f"micro-batches, which do not divide evenly over {dp_size} data-parallel ranks; make the samples per "
                "step (--global-batch-size × samples per rollout) a multiple of --micro-batch-size × DP size, "
                "or use --use-dynamic-batch-size"
            )

    if dp_size == 1:
        return [bins]
    if balance_data:
        cost = cost_fn or sample_cost
        bin_costs = [sum(cost(lengths[p]) for p in b) for b in bins]
        return [[bins[b] for b in part] for part in karmarkar_karp(bin_costs, dp_size, equal_size=True)]
    return [bins[rank::dp_size] for rank in range(dp_size)]


# ---------------------------------------------------------------------------------------------------
# The whole rollout
# ---------------------------------------------------------------------------------------------------


@dataclass
class RolloutSchedule:
    """The training schedule of one rollout, as shipped to the train actors.

    ``per_rank[r][s]`` is rank r's list of micro-batches for optimizer step s; each micro-batch lists
    positions into the rollout's flat sample list. ``global_batch_size`` is G (rollouts per step, the
    loss normaliser); ``dropped_positions`` are samples of trailing rollouts that were not trained on.
    """

    per_rank: list[list[list[list[int]]]]
    num_steps: int
    global_batch_size: int
    dropped_positions: list[int]
    dropped_rollout_ids: list[int]

    def positions_of_rank(self, rank: int) -> list[int]:
        """All positions rank ``rank`` trains on, in schedule order (the slice of data it receives)."""
        return [p for step in self.per_rank[rank] for mb in step for p in mb]


def schedule_rollout(
    rollout_ids: Sequence[int],
    lengths: Sequence[int],
    *,
    global_batch_size: int,
    micro_batch_size: int = 1,
    use_dynamic_batch_size: bool = False,
    max_tokens_per_gpu: int | None = None,
    dp_size: int = 1,
    balance_data: bool = False,
    cp_size: int = 1,
    cost_fn: Callable[[int], float] | None = None,
) -> RolloutSchedule:
    """Steps, micro-batches and DP ranks for a whole rollout. Runs in the rollout manager.

    ``rollout_ids[i]`` and ``lengths[i]`` describe sample i of the rollout's flat sample list.
    """
    if len(rollout_ids) != len(lengths):
        raise ValueError(f"{len(rollout_ids)} rollout ids but {len(lengths)} lengths")
    split = split_into_steps(rollout_ids, global_batch_size)
    per_rank: list[list[list[list[int]]]] = [[] for _ in range(dp_size)]
    for step_positions in split.steps:
        plan = plan_micro_batches(
            [lengths[p] for p in step_positions],
            micro_batch_size=micro_batch_size,
            use_dynamic_batch_size=use_dynamic_batch_size,
            max_tokens_per_gpu=max_tokens_per_gpu,
            dp_size=dp_size,
            balance_data=balance_data,
            cp_size=cp_size,
            cost_fn=cost_fn,
        )
        for rank, micro_batches in enumerate(plan):
            per_rank[rank].append([[step_positions[local] for local in mb] for mb in micro_batches])
    return RolloutSchedule(
        per_rank=per_rank,
        num_steps=split.num_steps,
        global_batch_size=global_batch_size,
        dropped_positions=split.dropped_positions,
        dropped_rollout_ids=split.dropped_rollout_ids,
    )

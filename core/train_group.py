"""``TrainGroup``: the N train Ray actors of a run (one torch.distributed world), driven as one.

Runs on the driver. N = ``--actor-num-nodes`` × ``--actor-num-gpus-per-node``; on GPU rank r runs on
logical bundle ``plan.actor_bundles[r]`` (mapped to a physical bundle by ``sort_bundles``), on CPU
the N actors are plain CPU actors. The calling convention (what is fanned out, whose result counts)
is in ``core/train_worker.py``.

Rendezvous contract: before a rank builds its backend, ``TrainWorker.build`` sets in ``os.environ``

  MASTER_ADDR, MASTER_PORT  rank 0's node IP and a port that was free there (asked from rank 0)
  RANK, WORLD_SIZE          this rank (0..N-1, rank r = logical actor bundle r) and N
  LOCAL_RANK                0: Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES, so its GPU is
                            cuda:0 (CPU actors have no device index)
  LOCAL_WORLD_SIZE          how many ranks of this world run on this node

and the backend itself calls ``torch.distributed.init_process_group(init_method="env://")`` with
backend ``gloo`` on CPU and ``nccl`` on CUDA (a world of one may skip it: WORLD_SIZE is "1").
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger(__name__)

# A rank that raises while the others wait in a collective never lets them finish; a rank that
# died makes its peers fail too (peer closed) a moment before Ray reports the death. Waiting this
# long after the first ordinary error lets the death, the real cause, be the one reported.
ERROR_GRACE_S = 10.0


class RankDiedError(RuntimeError):
    """A train rank's process died (Ray ``RayActorError``); the driver turns it into ActorDiedError."""

    def __init__(self, rank: int, world_size: int, cause: BaseException):
        self.rank, self.world_size, self.cause = rank, world_size, cause
        super().__init__(f"train rank {rank} of {world_size}: {cause}")


def rendezvous_env(node_ips: Sequence[str], master_port: int) -> list[dict[str, str]]:
    """The env vars of every rank (see the module docstring); ``node_ips[r]`` is rank r's node IP."""
    world = len(node_ips)
    return [{"MASTER_ADDR": node_ips[0], "MASTER_PORT": str(master_port), "RANK": str(rank),
             "WORLD_SIZE": str(world), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": str(node_ips.count(ip))}
            for rank, ip in enumerate(node_ips)]


def remote_actor_class(cls):
    """``cls`` as a Ray actor class whose ``progress`` method has a concurrency group of its own."""
    import ray

    return ray.remote(concurrency_groups={"progress": 1, "stop": 1})(_threads(cls))


def _threads(cls):
    """Subclass that lets torch use every core: in the sync loop generation and training take
    turns, so neither actor needs to leave cores to the other (Ray pins OMP_NUM_THREADS to 1);
    with ``--async`` they run at once and split the cores.
    Train ranks sharing a node split the cores again in ``TrainWorker.build``."""

    import ray

    class WithThreads(cls):
        def __init__(self, *a, **kw):
            import torch

            cores = max(1, os.cpu_count() or 1)
            config = a[0] if a and isinstance(a[0], dict) else kw.get("config") or {}
            # --async overlaps generation with training: each actor takes half the cores instead of
            # both oversubscribing all of them (measured on 2 cores: 1.80 s/step oversubscribed).
            torch.set_num_threads(max(1, cores // 2) if config.get("async_train") else cores)
            super().__init__(*a, **kw)

        # Its own concurrency group: the driver polls it while generate/train run in the default
        # group, whose calls keep their one-at-a-time order.
        @ray.method(concurrency_group="progress")
        def progress(self) -> dict:
            return cls.progress(self)

        # Also a group of its own: on Ctrl-C / SIGTERM the driver must stop the processes an engine launched
        # (SGLang servers, the router) while a generate still runs in the default group.
        @ray.method(concurrency_group="stop")
        def stop(self) -> None:
            closer = getattr(cls, "close", None)
            if closer is not None:
                closer(self)

    WithThreads.__name__ = cls.__name__
    WithThreads.__qualname__ = cls.__qualname__
    return WithThreads


def probe_bundles(pg, num_bundles: int) -> list[tuple[str, int]]:
    """(node IP, Ray GPU id) of every bundle of a ready placement group, from a tiny actor started on
    each (slime's ``InfoActor``); the probes are killed before returning."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_gpus=1, num_cpus=0)
    class BundleProbe:
        def where(self) -> tuple[str, int]:
            return ray.util.get_node_ip_address(), ray.get_gpu_ids()[0]

    probes = [BundleProbe.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=b)).remote() for b in range(num_bundles)]
    try:
        return [tuple(info) for info in ray.get([p.where.remote() for p in probes])]
    finally:
        for probe in probes:
            ray.kill(probe)


class TrainGroup:
    """Creates the ranks, hands them the rendezvous env, then fans every call out to all of them.

    ``actor_options[r]`` are rank r's Ray ``.options(...)`` (resources, scheduling strategy).
    Methods return rank 0's result once every rank has finished; a rank whose process died raises
    ``RankDiedError``.
    """

    def __init__(self, actor_class, config: dict, total_optimizer_steps: int, actor_options: Sequence[dict]):
        self.actors = [actor_class.options(**options).remote(config, total_optimizer_steps, build=False)
                       for options in actor_options]
        self.world_size = len(self.actors)
        try:
            addresses = self.gather([actor.node_address.remote() for actor in self.actors], all_results=True)
            envs = rendezvous_env([ip for ip, _ in addresses], master_port=addresses[0][1])
            # All builds are launched before waiting: init_process_group blocks until every rank joins.
            self.gather([actor.build.remote(env) for actor, env in zip(self.actors, envs)])
        except BaseException:
            self.kill()  # the caller never gets the group, so nobody else would
            raise

    # ---- waiting -----------------------------------------------------------------------------
    def gather(self, refs: list, *, poll: Callable[[], None] | None = None, all_results: bool = False,
               leave_remote: Sequence[int] = ()) -> Any:
        """Wait for one call per rank (``refs[r]`` from rank r); rank 0's result (or all of them).

        ``poll`` is called about every half second while waiting. Results of ranks in ``leave_remote``
        are not fetched to the driver (their errors surface where the ObjectRef is consumed).
        """
        import ray

        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        pending = list(refs)
        first_error, error_at = None, None
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5, fetch_local=False)
            errors = []
            for ref in ready:
                rank = rank_of[ref]
                if rank in leave_remote:
                    continue
                try:
                    results[rank] = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    raise RankDiedError(rank, self.world_size, exc) from exc
                except Exception as exc:  # noqa: BLE001 - re-raised below, after the grace period
                    errors.append(exc)
            if errors and first_error is None:
                first_error, error_at = errors[0], time.monotonic()
            if first_error is not None and (not pending or time.monotonic() - error_at > ERROR_GRACE_S):
                raise first_error
            if poll is not None and pending:
                poll()
        return [results.get(rank) for rank in range(len(refs))] if all_results else results.get(0)

    def _all(self, method: str, *args, poll=None, **kwargs) -> Any:
        return self.gather([getattr(actor, method).remote(*args, **kwargs) for actor in self.actors], poll=poll)

    # ---- the fanned-out calls (see core/train_worker.py) -------------------------------------
    def train(self, rollout_id: int, data: dict, *, poll: Callable[[], None] | None = None) -> dict:
        import ray

        data_ref = ray.put(data)  # one copy in the object store, read by every rank
        return self._all("train", rollout_id, data_ref, poll=poll)

    def progress(self) -> dict:
        """Rank 0's progress counters (polled while ``train`` runs)."""
        import ray

        try:
            return ray.get(self.actors[0].progress.remote())
        except ray.exceptions.RayActorError as exc:
            raise RankDiedError(0, self.world_size, exc) from exc

    def export_weights(self, bucket_bytes: int | None = None):
        """ObjectRef of rank 0's buckets (left in the object store for the rollout side to fetch);
        returns once every rank has finished the export."""
        refs = [actor.export_weights.remote(bucket_bytes) for actor in self.actors]
        self.gather(refs, leave_remote=(0,))
        # Rank 0's result stays unread, so ask it something tiny: a death shows up here, by rank.
        self.gather([self.actors[0].__ray_ready__.remote()])
        return refs[0]

    def save(self, path: str) -> None:
        self._all("save", path)

    def load(self, path: str) -> None:
        self._all("load", path)

    def save_hf(self, path: str) -> None:
        self._all("save_hf", path)

    def offload(self) -> None:
        self._all("offload")

    def onload(self) -> None:
        self._all("onload")

    def release_cached_memory(self) -> None:
        self._all("release_cached_memory")

    def sft_warmup(self, path: str, **kwargs) -> list[float]:
        return self._all("sft_warmup", path, **kwargs)

    def log_probs(self, sequences: list[list[int]], response_lengths: list[int]) -> list[list[float]]:
        return self._all("log_probs", sequences, response_lengths)

    def kill(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception as exc:  # noqa: BLE001 - an actor already gone needs no kill
                logger.debug("killing a train rank failed: %s", exc)

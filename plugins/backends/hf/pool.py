"""Several embedded ``hf`` engines behind the one-engine API the rollout manager uses.

Built by the rollout manager (inside its Ray actor) through ``HFRolloutEngine.from_placement`` when
the placement plan gives the ``hf`` backend more than one engine (``--rollout-num-gpus 8`` on GPUs):
one Ray actor per engine, pinned to the engine's bundle of the run's placement group, so every
rollout GPU generates (before, the one embedded engine used the first rollout GPU only). A request
goes to the engine with the fewest requests in flight, as a router would; weight pushes, memory
release/resume, abort and checkpoint state fan out to all engines. Engine ``i`` samples with
``seed + i``. A streamed weight push (``core/weight_stream.py``) is handed to every engine actor,
which pulls the buckets itself (CUDA IPC from the trainer on its GPU, or the weight broadcast group
it joined: ``join_weight_group``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

logger = logging.getLogger(__name__)


class _EngineActor:
    """The body of one engine's Ray actor (async: generate calls overlap; other calls run in a
    thread so the actor's event loop keeps delivering results)."""

    def __init__(self, hf_checkpoint: str, kwargs: dict):
        from plugrl.plugins.backends.hf.engine import HFRolloutEngine

        self.engine = HFRolloutEngine(hf_checkpoint, **kwargs)

    async def generate(self, input_ids: list[int], sampling_params: dict) -> dict:
        return await self.engine.generate(input_ids, sampling_params)

    async def abort_all(self) -> None:
        await self.engine.abort_all()

    def gpu_ids(self) -> list:
        """The GPU ids Ray gave this actor (its bundle's GPU)."""
        import ray

        return ray.get_gpu_ids()

    def receiver_info(self) -> dict:
        """Where this engine's weights live (``RolloutManager.weight_receivers``)."""
        import ray
        from plugrl.core.weight_handles import device_uuid

        on_gpu = self.engine.device.type == "cuda"
        return {"uuid": device_uuid() if on_gpu else None, "node": ray.util.get_node_ip_address(),
                "where": f"engine actor (GPU ids {ray.get_gpu_ids()})"}

    async def join_weight_group(self, name: str, address: str, port: int, rank: int, world_size: int,
                                backend: str) -> None:
        """Join the weight broadcast group (the rendezvous blocks until every member joins: off the loop)."""
        from plugrl.core.weight_broadcast import join

        await asyncio.to_thread(join, name, address, port, rank, world_size, backend=backend)

    async def call(self, method: str, *args, **kwargs) -> Any:
        return await asyncio.to_thread(functools.partial(getattr(self.engine, method), *args, **kwargs))


class HFEnginePool:
    """``placement``: ``{"bundles": [bundle index per engine], "placement_group": PlacementGroup or
    None, "num_gpus": GPU share per engine actor (0 on CPU)}``; the other arguments are
    ``HFRolloutEngine``'s, per engine."""

    def __init__(self, hf_checkpoint: str, *, placement: dict, seed: int = 0, **engine_kwargs):
        import ray

        bundles = list(placement["bundles"])
        if not bundles:
            raise ValueError("HFEnginePool needs at least one engine bundle")
        group = placement.get("placement_group")
        actor_class = ray.remote(_EngineActor)
        self.actors = []
        for i, bundle in enumerate(bundles):
            options: dict[str, Any] = {"num_cpus": 0, "num_gpus": float(placement.get("num_gpus", 0))}
            if group is not None:
                from ray.util.scheduling_strategies import (
                    PlacementGroupSchedulingStrategy,
                )

                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=group, placement_group_bundle_index=bundle)
            kwargs = {**engine_kwargs, "seed": int(seed) + i}
            self.actors.append(actor_class.options(**options).remote(hf_checkpoint, kwargs))
        ray.get([actor.__ray_ready__.remote() for actor in self.actors])
        self._in_flight = [0] * len(self.actors)
        self._weight_version = str(engine_kwargs.get("weight_version", "default"))

    def __len__(self) -> int:
        return len(self.actors)

    def _all(self, method: str, *args, **kwargs) -> list:
        import ray

        return ray.get([actor.call.remote(method, *args, **kwargs) for actor in self.actors])

    # ---- generation (on the rollout manager's event loop) ------------------------------------------
    async def generate(self, input_ids: list[int], sampling_params: dict) -> dict:
        engine = min(range(len(self.actors)), key=self._in_flight.__getitem__)
        self._in_flight[engine] += 1
        try:
            return await self.actors[engine].generate.remote(input_ids, sampling_params)
        finally:
            self._in_flight[engine] -= 1

    async def abort_all(self) -> None:
        await asyncio.gather(*[actor.abort_all.remote() for actor in self.actors])

    def load_stats(self) -> dict:
        stats = self._all("load_stats")
        return {key: sum(s[key] for s in stats) for key in ("num_running", "num_waiting")}

    def in_flight(self) -> list[int]:
        """Requests in flight per engine, as the pool dispatched them."""
        return list(self._in_flight)

    def health(self) -> bool:
        return all(self._all("health"))

    # ---- weights and memory -------------------------------------------------------------------------
    @property
    def weight_version(self) -> str:
        return self._weight_version

    def update_weights(self, named_tensors, version: int | str) -> None:
        import ray

        self.update_weights_from_ref(ray.put(named_tensors), version)  # one copy, read by every engine

    def update_weights_from_ref(self, ref, version: int | str) -> None:
        """The weights in the object store (the trainer's export): every engine reads them there."""
        import ray

        ray.get([actor.call.remote("update_weights", ref, version) for actor in self.actors])
        self._weight_version = str(version)

    def weight_receivers(self) -> list[dict]:
        """One ``{"uuid", "node", "where"}`` per engine actor (the driver picks the weight transport)."""
        import ray

        return ray.get([actor.receiver_info.remote() for actor in self.actors])

    def join_weight_group(self, name: str, address: str, port: int, first_rank: int, world_size: int,
                          backend: str) -> None:
        """Every engine actor joins the weight broadcast group, engine i as rank ``first_rank + i``."""
        import ray

        ray.get([actor.join_weight_group.remote(name, address, port, first_rank + i, world_size, backend)
                 for i, actor in enumerate(self.actors)])

    def release_memory(self, tags=None, *, keep_weights: bool = True) -> None:
        self._all("release_memory", tags, keep_weights=keep_weights)

    def resume_memory(self, tags=None) -> None:
        self._all("resume_memory", tags)

    def gpu_memory_gib(self) -> float | None:
        """The most any one engine holds on its GPU (None on CPU)."""
        held = [g for g in self._all("gpu_memory_gib") if g is not None]
        return max(held) if held else None

    def log_probs_of(self, sequences, response_lengths, temperature: float = 1.0):
        """Engine 0's (every engine holds the same weights after a push)."""
        import ray

        return ray.get(self.actors[0].call.remote("log_probs_of", sequences, response_lengths, temperature))

    # ---- checkpointing and shutdown -----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"engines": self._all("state_dict")}

    def load_state_dict(self, state: dict) -> None:
        import ray

        engines = state.get("engines")
        if engines is None or len(engines) != len(self.actors):  # another engine count: keep fresh RNGs
            return
        ray.get([actor.call.remote("load_state_dict", s) for actor, s in zip(self.actors, engines)])

    def close(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.get(actor.call.remote("close"), timeout=30)
            except Exception as exc:  # noqa: BLE001  (a dead engine: nothing left to close)
                logger.warning("engine actor did not close cleanly: %s", exc)
            ray.kill(actor)
        self.actors = []

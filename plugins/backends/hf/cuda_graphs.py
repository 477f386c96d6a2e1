"""CUDA graphs for the fast decode step of the embedded ``hf`` engine (decode thread, one GPU).

A decode step of a 36-layer model is several hundred small kernels; launched one by one from Python
the GPU mostly waits for the host. Each (batch bucket, KV-length bucket) gets its own graph, captured
lazily the first time it is needed and replayed afterwards. Graphs read their inputs (token and
position buffers, the KV cache, the model's parameters) by address, so:

* in-place weight updates (``hf/weights.load_named_tensors`` copies into the parameters) are seen by
  the next replay without recapturing;
* anything that moves those tensors (the KV cache growing, ``release_memory``/``resume_memory``
  re-materialising the weights) must ``clear()`` the graphs; the owner does.

All graphs share one memory pool: only one runs at a time, and each output is consumed (sampled)
before the next replay.
"""

from __future__ import annotations

from typing import Callable, Hashable

import torch


class DecodeGraphs:
    def __init__(self, device: torch.device):
        self.device = device
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self.captures = 0  # since start (a test and the benchmark read it)

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, key: Hashable, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Replay the graph of ``key`` (capturing ``fn`` first if needed); returns its output tensor,
        valid until the next ``run``. ``fn`` must only read and write tensors that outlive the graph."""
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(fn)
        entry[0].replay()
        return entry[1]

    def _capture(self, fn: Callable[[], torch.Tensor]):
        # Warm up on a side stream first (lazy cuBLAS/attention initialisation must not be captured).
        # The eager run writes the same K/V the replay will write, so it changes nothing.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (event loops, weight pushes) may touch CUDA meanwhile
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = fn()
        self.captures += 1
        return graph, out

    def clear(self) -> None:
        """Drop every graph and the pool (their memory returns to the caching allocator)."""
        self._graphs.clear()
        self._pool = None

"""The decode thread of the embedded ``hf`` rollout engine (inside the rollout manager actor).

One thread owns the model's forward passes: it takes queued requests (up to ``max_batch_size`` rows;
new rows are prefilled and merged into the running batch between decode steps, so batching is
continuous), decodes one token per step for every row, and answers each request on its caller's
event loop as soon as it finishes. Callers' event loops therefore never run a forward. Other users
of the model (weight push, memory release, teacher forcing) take it between two steps through
``exclusive()``: a turnstile in front of the model lock, so the busy decode loop cannot starve them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import deque
from typing import Callable

import torch

from .batch import DecodeBatch, Request, StopContext
from .sampling import RowSampling
from .slot_batch import SlotDecoder

logger = logging.getLogger(__name__)


class DecodeScheduler:
    def __init__(self, model, device: torch.device, ctx: StopContext, generator: torch.Generator, *,
                 max_batch_size: int, max_prefill_tokens: int, weight_version: Callable[[], str],
                 forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 fast: SlotDecoder | None = None):
        self.model, self.device, self._ctx, self._generator = model, device, ctx, generator
        # The slot-cache fast path (Llama-family models) or None: HF forwards over a DynamicCache.
        self.fast = fast
        self.max_batch_size, self.max_prefill_tokens = max_batch_size, max_prefill_tokens
        self._weight_version = weight_version
        self._forward_context = forward_context  # entered around every forward (attention backends)
        self._cond = threading.Condition()  # guards the queue, counters and flags below
        self._pending: deque[Request] = deque()
        self._seq = 0
        self._abort_upto = 0  # requests with seq <= this are aborted
        self._abort_waiters: list[concurrent.futures.Future] = []
        self._num_running = 0
        self._stop = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # counters, and where the decode thread's time goes (seconds, summed over steps): prefill forwards
        # + their sampling; per decode step the forward's launch (on CUDA it returns before the GPU is
        # done), sampling up to the tokens on the host (mostly waiting for the GPU), and the per-row
        # bookkeeping after that, during which a GPU has nothing queued
        self._stats = {"decode_steps": 0, "prefill_forwards": 0, "max_rows_per_step": 0, "generated_tokens": 0,
                       "prefill_s": 0.0, "decode_launch_s": 0.0, "decode_wait_s": 0.0, "decode_host_s": 0.0}
        self._turnstile = threading.Lock()
        self._model_lock = threading.Lock()

    # ------------------------------------------------------------------ called from other threads
    def submit(self, request: Request) -> None:
        with self._cond:
            if self._stop:
                raise RuntimeError("hf engine is closed")
            self._seq += 1
            request.seq = self._seq
            self._pending.append(request)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="plugrl-hf-engine", daemon=True)
                self._thread.start()
            self._cond.notify()

    async def abort_all(self) -> None:
        with self._cond:
            self._abort_upto = self._seq
            if self._thread is None or not self._thread.is_alive():
                return
            waiter: concurrent.futures.Future = concurrent.futures.Future()
            self._abort_waiters.append(waiter)
            self._cond.notify()
        await asyncio.wrap_future(waiter)

    def load_stats(self) -> dict:
        with self._cond:
            return {"num_running": self._num_running, "num_waiting": len(self._pending)}

    def stats(self) -> dict:
        with self._cond:
            return dict(self._stats)

    def healthy(self) -> bool:
        thread_ok = self._thread is None or self._thread.is_alive()
        return not self._stop and self._error is None and thread_ok

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    @contextlib.contextmanager
    def exclusive(self):
        """The model, between two decode steps (holding the turnstile parks the decode thread)."""
        with self._turnstile, self._model_lock:
            yield

    # ------------------------------------------------------------------ the decode thread
    @contextlib.contextmanager
    def _model_turn(self):
        with self._turnstile:
            pass
        with self._model_lock, self._forward_context():
            yield

    def _collect(self) -> None:
        """Called with ``_cond`` held when an idle engine gets work: requests submitted together
        (``asyncio.gather`` over a group) arrive one by one, so wait until none has come for 2 ms
        (at most 20 ms) and start them as one batch. Rows that start together share a cache width,
        which avoids padding and KV copies from merging stragglers into the batch."""
        deadline = time.monotonic() + 0.02
        while len(self._pending) < self.max_batch_size and not self._stop:
            seen = len(self._pending)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(min(0.002, left))
            if len(self._pending) == seen:
                return

    def _run(self) -> None:
        batch: DecodeBatch | None = None
        try:
            with torch.inference_mode():  # thread-local: covers every tensor the batch creates
                while True:
                    with self._cond:
                        while not (self._stop or self._pending or batch or self._abort_waiters):
                            self._cond.wait()
                        if batch is None and self._pending:
                            self._collect()
                        stop, upto = self._stop, self._abort_upto
                        if stop:
                            upto = self._seq
                        dropped = [r for r in self._pending if r.seq <= upto or r.cancelled]
                        for r in dropped:
                            self._pending.remove(r)
                        waiters, self._abort_waiters = self._abort_waiters, []
                        admit = []
                        if self._admitting(len(batch or ())):
                            while self._pending and len(admit) + len(batch or ()) < self.max_batch_size:
                                admit.append(self._pending.popleft())
                                admit[-1].running = True
                        self._num_running += len(admit)
                    for r in dropped:
                        self._finish_abort(r)
                    if batch is not None:
                        batch = self._drop(batch, lambda r: r.seq <= upto or r.cancelled)
                    for waiter in waiters:
                        waiter.set_result(None)
                    if stop:
                        for r in admit:
                            self._finish_abort(r)
                        return
                    batch = self._work(batch, admit)
        except BaseException as exc:  # a bug in the loop itself: fail loudly, never hang callers
            self._error = exc
            logger.exception("hf engine decode thread died")
            with self._cond:
                stranded, waiters = list(self._pending) + (batch.requests if batch else []), self._abort_waiters
                self._pending.clear()
                self._abort_waiters = []
            for r in stranded:
                if r.finish is None:
                    self._complete(r, RuntimeError(f"hf engine decode thread died: {exc!r}"))
            for waiter in waiters:
                waiter.set_result(None)

    def _admitting(self, running: int) -> bool:
        """Whether to prefill queued requests now. Joining a running batch costs a prefill forward
        and a copy of the batch's KV cache, so while the batch is busy wait until an eighth of it
        (or every queued request) fits."""
        free = self.max_batch_size - running
        return running == 0 or free >= min(len(self._pending), max(1, self.max_batch_size // 8))

    def _work(self, batch: DecodeBatch | None, admit: list[Request]) -> DecodeBatch | None:
        """Prefill the admitted requests into the batch, then run one decode step. A failing forward
        (e.g. out of memory) fails the requests involved, not the engine."""
        try:
            for chunk in self._prefill_chunks(admit):
                with self._model_turn():
                    start = time.perf_counter()
                    if self.fast is not None:
                        new, logits = self.fast.prefill(chunk)
                    else:
                        new, logits = DecodeBatch.prefill(self.model, chunk, self.device)
                    self._sample_into(new, logits, prefill=True, started=start)
                new = self._drop(new, lambda r: r.finish is not None)
                if new is not None:
                    if batch is None:
                        batch = new
                    else:
                        batch.merge(new)
            if batch is not None:
                with self._model_turn():
                    start = time.perf_counter()
                    logits = batch.decode(self.model)
                    self._sample_into(batch, logits, prefill=False, started=start)
                batch = self._drop(batch, lambda r: r.finish is not None)
            return batch
        except Exception as exc:
            logger.exception("hf engine forward failed; failing %d requests", len(admit) + len(batch or ()))
            failed = {id(r): r for r in admit + (batch.requests if batch else [])}
            for r in failed.values():
                if r.finish is None:
                    self._complete(r, exc)
            if self.fast is not None:  # every row holding a slot was just failed
                self.fast.reset()
            return None

    def _prefill_chunks(self, requests: list[Request]):
        chunk: list[Request] = []
        for r in requests:
            width = max([len(r.prompt)] + [len(c.prompt) for c in chunk])
            if chunk and width * (len(chunk) + 1) > self.max_prefill_tokens:
                yield chunk
                chunk = []
            chunk.append(r)
        if chunk:
            yield chunk

    def _sample_into(self, batch: DecodeBatch, logits: torch.Tensor, *, prefill: bool, started: float) -> None:
        """Sample each row's next token from ``logits`` and hand it to its request; ``started``: when
        the forward that made ``logits`` began (perf_counter), for the time split in ``stats``."""
        launched = time.perf_counter()
        rows = batch.requests
        if batch.sampling is None:
            batch.sampling = RowSampling([r.params for r in rows], logits.device, logits.shape[-1])
        tokens, log_probs = batch.sampling.sample(
            logits, [len(r.tokens) for r in rows], self._generator, banned=[r.banned_tokens(self._ctx) for r in rows],
        )
        batch.advance(tokens)
        with self._cond:  # before any answer goes out, so callers never see stale counters
            key = "prefill_forwards" if prefill else "decode_steps"
            self._stats[key] += 1
            self._stats["max_rows_per_step"] = max(self._stats["max_rows_per_step"], len(rows))
            self._stats["generated_tokens"] += len(rows)
        # One device->host copy for the whole batch (each .tolist() would synchronise separately);
        # float64 holds both the token ids and the float32 log-probs exactly.
        host = torch.stack([tokens.to(torch.float64), log_probs.to(torch.float64)]).cpu()
        on_host = time.perf_counter()
        for r, token, lp in zip(rows, host[0].long().tolist(), host[1].tolist()):
            if r.observe(token, lp, self._ctx):
                self._complete(r, r.result(self._ctx, self._weight_version()))
        done = time.perf_counter()
        with self._cond:
            if prefill:
                self._stats["prefill_s"] += done - started
            else:
                self._stats["decode_launch_s"] += launched - started
                self._stats["decode_wait_s"] += on_host - launched
                self._stats["decode_host_s"] += done - on_host

    def _drop(self, batch: DecodeBatch, gone) -> DecodeBatch | None:
        """Remove rows for which ``gone(request)``; aborted/cancelled ones are answered here."""
        keep = []
        for i, r in enumerate(batch.requests):
            if not gone(r):
                keep.append(i)
            elif r.finish is None:
                self._finish_abort(r)
        batch.keep(keep)
        return batch if keep else None

    def _finish_abort(self, request: Request) -> None:
        request.abort("aborted by abort_all" if not self._stop else "engine closed")
        self._complete(request, request.result(self._ctx, self._weight_version()))

    def _complete(self, request: Request, result) -> None:
        """Every request leaves through here: it stops counting as running *before* its caller
        sees the answer, so ``load_stats`` is never stale for a caller that awaited its results."""
        with self._cond:
            if request.running:
                request.running = False
                self._num_running -= 1
        if not request.cancelled:
            request.deliver(result)

"""The embedded rollout engine ``hf``: transformers in-process, CPU or one GPU.

Runs inside the rollout manager (a Ray actor) and answers the same contract as an SGLang server's
``/generate`` (sampling-parameter names and defaults, ``finish_reason`` objects, per-token
log-probs, abort with partial output, weight push, memory release), so the rollout manager cannot
tell the two apart. Semantics details live next to the code: log-probs in ``hf_sampling``, stop
handling in ``hf_batch.Request``, weight loading in ``hf_weights``.

Threads: ``generate`` coroutines (any event loop) queue requests; one decode thread owned by the
engine batches them (up to ``max_batch_size`` rows, new rows join between decode steps) and delivers
each result to its caller's loop as soon as that row finishes. The forward passes run on that thread,
so the caller's event loop stays responsive. Weight pushes, memory release and ``log_probs_of`` take
the model between two decode steps (a turnstile lock so that the decode loop cannot starve them).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections import deque

import torch

from .hf_batch import DecodeBatch, Request, StopContext
from .hf_sampling import SamplingParams, sample_tokens
from .hf_weights import load_named_tensors

logger = logging.getLogger(__name__)

MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")  # SGLang's release/resume_memory_occupation tags
_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
_OPTIONS = {"context_length", "max_prefill_tokens", "weight_version", "trust_remote_code"}


def _eos_ids(tokenizer, *configs) -> frozenset[int]:
    ids = {tokenizer.eos_token_id}
    for config in configs:
        value = getattr(config, "eos_token_id", None)
        ids.update(value if isinstance(value, (list, tuple, set)) else [value])
    return frozenset(int(i) for i in ids if i is not None)


def _settle(future: asyncio.Future, result) -> None:
    if future.done():  # the caller was cancelled
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class HFRolloutEngine:
    """See the module docstring. ``options``: ``context_length`` (default: the config's
    ``max_position_embeddings``; prompts must be shorter, ``max_new_tokens`` is clipped to the rest),
    ``max_prefill_tokens`` (padded prompt tokens per prefill forward, default 16384),
    ``weight_version`` (initial, default ``"default"`` like SGLang), ``trust_remote_code``."""

    def __init__(self, hf_checkpoint: str, *, device: str | None = None, dtype: str | None = None,
                 max_batch_size: int = 256, seed: int = 0, attn_implementation: str | None = None, **options):
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise TypeError(f"HFRolloutEngine: unknown options {unknown}; known: {sorted(_OPTIONS)}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:  # bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and imprecise)
            torch_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        elif dtype == "auto" or isinstance(dtype, torch.dtype):
            torch_dtype = dtype
        elif dtype in _DTYPES:
            torch_dtype = _DTYPES[dtype]
        else:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}")
        remote = bool(options.get("trust_remote_code", False))
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        # transformers >= 4.56 calls it ``dtype``; older releases ``torch_dtype``.
        dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        kwargs[dtype_key] = torch_dtype
        self.tokenizer = AutoTokenizer.from_pretrained(hf_checkpoint, trust_remote_code=remote)
        self.model = AutoModelForCausalLM.from_pretrained(hf_checkpoint, trust_remote_code=remote, **kwargs)
        self.model.to(self.device).eval()
        config = self.model.config
        self.vocab_size = int(config.get_text_config().vocab_size)
        self.context_length = int(options.get("context_length") or config.get_text_config().max_position_embeddings)
        self.max_prefill_tokens = int(options.get("max_prefill_tokens", 16384))
        self.max_batch_size = int(max_batch_size)
        self._ctx = StopContext(self.tokenizer, _eos_ids(self.tokenizer, config, self.model.generation_config))
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(int(seed))
        self._weight_version = str(options.get("weight_version", "default"))
        self._released: set[str] = set()

        self._cond = threading.Condition()  # guards everything below it
        self._pending: deque[Request] = deque()
        self._seq = 0
        self._abort_upto = 0  # requests with seq <= this are aborted
        self._abort_waiters: list[concurrent.futures.Future] = []
        self._num_running = 0
        self._stop = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stats = {"decode_steps": 0, "prefill_forwards": 0, "max_rows_per_step": 0, "generated_tokens": 0}
        self._turnstile = threading.Lock()
        self._model_lock = threading.Lock()

    # ------------------------------------------------------------------ generation API (any loop)
    async def generate(self, input_ids: list[int], sampling_params: dict) -> dict:
        """SGLang ``/generate`` with ``return_logprob=True``; see ``hf_batch.Request.result``."""
        params = SamplingParams.from_dict(sampling_params)
        prompt = [int(t) for t in input_ids]
        if not prompt:
            raise ValueError("input_ids is empty")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise ValueError(f"input_ids must be in [0, {self.vocab_size}), got {min(prompt)}..{max(prompt)}")
        if len(prompt) >= self.context_length:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context length {self.context_length}")
        if self._released:
            raise RuntimeError(f"hf engine memory is released ({sorted(self._released)}); call resume_memory() first")
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def deliver(result) -> None:
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody is waiting
                loop.call_soon_threadsafe(_settle, future, result)

        max_new = min(params.max_new_tokens, self.context_length - len(prompt))
        with self._cond:
            if self._stop:
                raise RuntimeError("hf engine is closed")
            self._seq += 1
            request = Request(self._seq, prompt, params, max_new, deliver)
            if max_new == 0:  # nothing to generate (SGLang answers without decoding too)
                request.finish = {"type": "length", "matched": None, "length": 0}
                return request.result(self._ctx, self._weight_version)
            self._pending.append(request)
            self._ensure_thread()
            self._cond.notify()
        try:
            return await future
        except asyncio.CancelledError:
            request.cancelled = True  # the decode thread drops it at the next step
            raise

    async def abort_all(self) -> None:
        """Finish every request submitted so far with ``finish_reason.type == "abort"`` and the
        partial output generated until now; returns once they are all answered (at most one decode
        step later). Requests submitted afterwards run normally."""
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
        """Counters since start: decode steps, prefill forwards, most rows in one step, tokens."""
        with self._cond:
            return dict(self._stats)

    def health(self) -> bool:
        thread_ok = self._thread is None or self._thread.is_alive()
        return not self._stop and self._error is None and thread_ok

    def close(self) -> None:
        """Stop the decode thread; queued and running requests finish with "abort"."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    # ------------------------------------------------------------------ weights and memory
    @property
    def weight_version(self) -> str:
        return self._weight_version

    def update_weights(self, named_tensors, version: int | str) -> None:
        """Load HF-named tensors (dict, pairs or buckets; strict names/shapes) between two decode
        steps and set ``weight_version`` to ``str(version)``."""
        with self._exclusive():
            load_named_tensors(self.model, named_tensors)
            self._weight_version = str(version)

    def release_memory(self, tags=None) -> None:
        """Colocated training: free the GPU. ``weights`` moves the model to CPU (a no-op on CPU);
        ``kv_cache``/``cuda_graph`` hold nothing between batches. Refused while requests are in
        flight (abort them first, as slime does before releasing)."""
        tags = self._check_tags(tags)
        with self._cond:
            busy = self._num_running + len(self._pending)
        if busy:
            raise RuntimeError(f"release_memory with {busy} requests in flight; call abort_all() first")
        with self._exclusive():
            if "weights" in tags and "weights" not in self._released and self.device.type != "cpu":
                self.model.to("cpu")
                torch.cuda.empty_cache()
            self._released |= set(tags)

    def resume_memory(self, tags=None) -> None:
        """Undo ``release_memory`` for ``tags`` (all by default); generation needs every tag back."""
        tags = self._check_tags(tags)
        with self._exclusive():
            if "weights" in tags and "weights" in self._released and self.device.type != "cpu":
                self.model.to(self.device)
            self._released -= set(tags)

    @staticmethod
    def _check_tags(tags) -> tuple[str, ...]:
        tags = MEMORY_TAGS if tags is None else tuple([tags] if isinstance(tags, str) else tags)
        bad = sorted(set(tags) - set(MEMORY_TAGS))
        if bad:
            raise ValueError(f"unknown memory tags {bad}; known: {list(MEMORY_TAGS)}")
        return tags

    def log_probs_of(self, sequences: list[list[int]], response_lengths, temperature: float = 1.0) -> list[list[float]]:
        """Teacher-forced log-probs ``log_softmax(logits / T)`` of the last ``response_lengths[i]``
        tokens of each sequence, one unpadded forward per sequence (tests compare engine vs trainer)."""
        if isinstance(response_lengths, int):
            response_lengths = [response_lengths] * len(sequences)
        out = []
        with self._exclusive(), torch.inference_mode():
            device = next(self.model.parameters()).device
            for seq, n in zip(sequences, response_lengths):
                ids = torch.tensor([seq], dtype=torch.long, device=device)
                logits = self.model(input_ids=ids).logits[0, :-1].float() / temperature
                lp = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1)
                out.append(lp[len(seq) - 1 - n:].tolist() if n else [])
        return out

    @contextlib.contextmanager
    def _exclusive(self):
        # Holding the turnstile stops the decode thread at its next step boundary.
        with self._turnstile, self._model_lock:
            yield

    @contextlib.contextmanager
    def _model_turn(self):
        with self._turnstile:
            pass
        with self._model_lock:
            yield

    # ------------------------------------------------------------------ the decode thread
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="plugrl-hf-engine", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        batch: DecodeBatch | None = None
        try:
            with torch.inference_mode():  # thread-local: covers every tensor the batch creates
                while True:
                    with self._cond:
                        while not (self._stop or self._pending or batch or self._abort_waiters):
                            self._cond.wait()
                        stop, upto = self._stop, self._abort_upto
                        if stop:
                            upto = self._seq
                        dropped = [r for r in self._pending if r.seq <= upto or r.cancelled]
                        for r in dropped:
                            self._pending.remove(r)
                        waiters, self._abort_waiters = self._abort_waiters, []
                        admit = []
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
                self._complete(r, RuntimeError(f"hf engine decode thread died: {exc!r}"))
            for waiter in waiters:
                waiter.set_result(None)

    def _work(self, batch: DecodeBatch | None, admit: list[Request]) -> DecodeBatch | None:
        """Prefill the admitted requests into the batch, then run one decode step. A failing forward
        (e.g. out of memory) fails the requests involved, not the engine."""
        try:
            for chunk in self._prefill_chunks(admit):
                with self._model_turn():
                    new, logits = DecodeBatch.prefill(self.model, chunk, self.device)
                    self._sample_into(new, logits, prefill=True)
                new = self._drop(new, lambda r: r.finish is not None)
                if new is not None:
                    if batch is None:
                        batch = new
                    else:
                        batch.merge(new)
            if batch is not None:
                with self._model_turn():
                    logits = batch.decode(self.model)
                    self._sample_into(batch, logits, prefill=False)
                batch = self._drop(batch, lambda r: r.finish is not None)
            return batch
        except Exception as exc:
            logger.exception("hf engine forward failed; failing %d requests", len(admit) + len(batch or ()))
            failed = {id(r): r for r in admit + (batch.requests if batch else [])}
            for r in failed.values():
                if r.finish is None:
                    self._complete(r, exc)
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

    def _sample_into(self, batch: DecodeBatch, logits: torch.Tensor, *, prefill: bool) -> None:
        rows = batch.requests
        tokens, log_probs = sample_tokens(
            logits, [r.params for r in rows], [len(r.tokens) for r in rows], self._generator,
            banned=[r.banned_tokens(self._ctx) for r in rows],
        )
        batch.advance(tokens)
        with self._cond:  # before any answer goes out, so callers never see stale counters
            key = "prefill_forwards" if prefill else "decode_steps"
            self._stats[key] += 1
            self._stats["max_rows_per_step"] = max(self._stats["max_rows_per_step"], len(rows))
            self._stats["generated_tokens"] += len(rows)
        for r, token, lp in zip(rows, tokens.tolist(), log_probs.tolist()):
            if r.observe(token, lp, self._ctx):
                self._complete(r, r.result(self._ctx, self._weight_version))

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
        self._complete(request, request.result(self._ctx, self._weight_version))

    def _complete(self, request: Request, result) -> None:
        """Every request leaves through here: it stops counting as running *before* its caller
        sees the answer, so ``load_stats`` is never stale for a caller that awaited its results."""
        with self._cond:
            if request.running:
                request.running = False
                self._num_running -= 1
        if not request.cancelled:
            request.deliver(result)

"""The embedded rollout engine ``hf``: transformers in-process, CPU or one GPU.

Runs inside the rollout manager (a Ray actor) and answers the same contract as an SGLang server's
``/generate`` (sampling-parameter names and defaults, ``finish_reason`` objects, per-token
log-probs, abort with partial output, weight push, memory release), so the rollout manager cannot
tell the two apart. Semantics details live next to the code: log-probs in ``hf_sampling``, stop
handling in ``hf_batch.Request``, weight loading in ``hf_weights``.

Threads: ``generate`` coroutines (on any event loop) queue requests; the decode thread of
``hf_scheduler`` batches them and answers each on its caller's loop, so no forward pass ever runs on
an event loop. Weight pushes, memory release and ``log_probs_of`` take the model between two decode
steps.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging

import torch
from plugrl.core.gpu_offload import StorageOffload

from .batch import Request, StopContext
from .sampling import SamplingParams
from .scheduler import DecodeScheduler
from .weights import load_named_tensors, missing_parameters

logger = logging.getLogger(__name__)
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")  # SGLang's release/resume_memory_occupation tags
_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
_OPTIONS = {"context_length", "max_prefill_tokens", "weight_version", "trust_remote_code", "cudnn_attention",
            "fast_decode", "cuda_graphs", "decode_attention", "compile_decode", "kv_bucket"}


def _attention_backends(use_cudnn: bool):
    """Context for every engine forward. On CUDA, PyTorch may route SDPA to cuDNN attention, which
    builds an execution plan per new shape; a KV cache grows by one column per decode step, so it
    plans on every step (measured on an H100 with torch 2.11: ~40 ms per SDPA call for a 2-layer
    model). Flash / memory-efficient attention have no such cost."""
    if use_cudnn:
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return lambda: sdpa_kernel(backends)


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


_DROPPED = ("hf engine weights were released without a copy (release_memory(keep_weights=False)); push every "
            "parameter with update_weights before generating")


class HFRolloutEngine:
    """See the module docstring. ``options``: ``context_length`` (default: the config's
    ``max_position_embeddings``; prompts must be shorter, ``max_new_tokens`` is clipped to the rest),
    ``max_prefill_tokens`` (padded prompt tokens per prefill forward, default 16384),
    ``weight_version`` (initial, default ``"default"`` like SGLang), ``trust_remote_code``,
    ``cudnn_attention`` (default False: keep SDPA off cuDNN, see ``_attention_backends``),
    ``fast_decode`` (default True: Llama-family models decode through ``slot_batch`` — a preallocated
    slot KV cache and the engine's own forward; other models, or False, use HF forwards over a
    ``DynamicCache``), ``cuda_graphs`` (default True: on CUDA the fast path replays decode steps as
    CUDA graphs), ``decode_attention`` (the fast path's attention over the slot cache: ``sdpa``
    (default), ``matmul`` or ``flash`` (CUDA, 16-bit); ``decode_attention.py``), ``compile_decode``
    (``"auto"``, the default, = on CUDA; True/False: the fast path's norms, RoPE, residual adds and
    SiLU as compiled fused kernels, ``fused_decode_ops.py``), ``kv_bucket`` (default 256: the fast
    path's smallest KV-length bucket, ``slot_batch.kv_bucket``; a CUDA graph per bucket). ``decode_path``
    says which path runs.
    ``args``: the engine's view of the run config (the rollout manager passes it); its ``--hf-*`` flags
    (``options.py``) become options, and options given by name win over them."""

    accepts_run_config = True  # the rollout manager passes args=PluginConfig (its --hf-* flags)

    def __init__(self, hf_checkpoint: str, *, device: str | None = None, dtype: str | None = None,
                 max_batch_size: int = 256, seed: int = 0, attn_implementation: str | None = None,
                 args=None, **options):
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if args is not None:
            from .options import engine_options

            options = {**engine_options(args), **options}
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
        self._weight_version = str(options.get("weight_version", "default"))
        self._released: set[str] = set()
        self._weights_offload = StorageOffload()
        self._weights_dropped = False  # released with keep_weights=False and no full push since
        self._written_since_drop: set = set()  # parameter storages pushed since that release
        generator = torch.Generator(device=self.device)
        generator.manual_seed(int(seed))
        self._generator = generator  # the sampling RNG; checkpointed by state_dict()
        self._ctx = StopContext(self.tokenizer, _eos_ids(self.tokenizer, config, self.model.generation_config))
        self._forward_context = _attention_backends(bool(options.get("cudnn_attention", False)))
        fast = None
        if options.get("fast_decode", True):
            from .decode_attention import IMPLEMENTATIONS, unavailable_reason
            from .decode_forward import unsupported_reason
            from .slot_batch import KV_BUCKET, SlotDecoder

            attention = str(options.get("decode_attention", "sdpa"))
            if attention not in IMPLEMENTATIONS:
                raise ValueError(f"HFRolloutEngine option decode_attention={attention!r}: one of {IMPLEMENTATIONS}")
            reason = unsupported_reason(self.model)
            if reason is None:
                compile_decode = options.get("compile_decode", "auto")
                if compile_decode not in ("auto", True, False):
                    raise ValueError(f"HFRolloutEngine option compile_decode={compile_decode!r}: 'auto' (on CUDA), "
                                     "True or False")
                kv_block = options.get("kv_bucket", KV_BUCKET)
                if isinstance(kv_block, bool) or not isinstance(kv_block, int) or kv_block < 1:
                    raise ValueError(f"HFRolloutEngine option kv_bucket={kv_block!r}: a whole number of positions >= 1")
                fast = SlotDecoder(self.model, self.device, max_batch_size=self.max_batch_size,
                                   cuda_graphs=bool(options.get("cuda_graphs", True)), decode_attention=attention,
                                   compile_ops=self.device.type == "cuda" if compile_decode == "auto" else compile_decode,
                                   kv_block=kv_block)
                # the decoder allocates nothing until its first prefill: checking after building it is free
                refused = unavailable_reason(attention, self.device, fast.forward.dtype, fast.forward.head_dim)
                if refused:
                    raise ValueError(f"HFRolloutEngine option decode_attention: {refused}")
                self.decode_path = fast.name
            else:
                self.decode_path = f"hf ({reason})"
                if attention != "sdpa":
                    logger.warning("hf engine: decode_attention=%r is not used: this model decodes through HF's "
                                   "forward (%s)", attention, reason)
        else:
            self.decode_path = "hf (fast_decode=False)"
        self._scheduler = DecodeScheduler(
            self.model, self.device, self._ctx, generator, max_batch_size=self.max_batch_size,
            max_prefill_tokens=self.max_prefill_tokens, weight_version=lambda: self._weight_version,
            forward_context=self._forward_context, fast=fast,
        )

    @classmethod
    def from_placement(cls, hf_checkpoint: str, *, placement: dict, **kwargs):
        """The rollout manager's constructor when the placement plan has engine bundles for this
        backend (GPU runs): one engine in this process for one bundle, else an ``HFEnginePool`` of
        one Ray actor per bundle (``plugins/backends/hf/pool.py``)."""
        if len(placement["bundles"]) <= 1:
            return cls(hf_checkpoint, **kwargs)
        from .options import engine_options
        from .pool import HFEnginePool

        args = kwargs.pop("args", None)  # the engine actors get the options its flags set, not the config
        if args is not None:
            kwargs = {**engine_options(args), **kwargs}

        return HFEnginePool(hf_checkpoint, placement=placement, **kwargs)

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
        if self._weights_dropped:
            raise RuntimeError(_DROPPED)
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def deliver(result) -> None:
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody is waiting
                loop.call_soon_threadsafe(_settle, future, result)

        max_new = min(params.max_new_tokens, self.context_length - len(prompt))
        request = Request(0, prompt, params, max_new, deliver)
        if max_new == 0:  # nothing to generate (SGLang answers without decoding too)
            request.finish = {"type": "length", "matched": None, "length": 0}
            return request.result(self._ctx, self._weight_version)
        self._scheduler.submit(request)
        try:
            return await future
        except asyncio.CancelledError:
            request.cancelled = True  # the decode thread drops it at the next step
            raise

    async def abort_all(self) -> None:
        """Finish every request submitted so far with ``finish_reason.type == "abort"`` and the
        partial output generated until now; returns once they are all answered (at most one decode
        step later). Requests submitted afterwards run normally."""
        await self._scheduler.abort_all()

    def load_stats(self) -> dict:
        """``{"num_running", "num_waiting"}`` (what slime polls after an abort)."""
        return self._scheduler.load_stats()

    def stats(self) -> dict:
        """Counters since start: decode steps, prefill forwards, most rows in one step, tokens."""
        return self._scheduler.stats()

    def decode_info(self) -> dict:
        """Which decode path runs and, on the fast path, its cache size and CUDA graphs."""
        fast = self._scheduler.fast
        with self._scheduler.exclusive():
            return fast.info() if fast is not None else {"decode_path": self.decode_path}

    def health(self) -> bool:
        return self._scheduler.healthy()

    def close(self) -> None:
        """Stop the decode thread; queued and running requests finish with "abort"."""
        self._scheduler.close()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """The sampling RNG (JSON-safe): restored on resume, generation continues exactly as an
        uninterrupted run's would (unseeded requests all draw from this one generator)."""
        with self._scheduler.exclusive():
            state = self._generator.get_state()
        return {"device": self.device.type,
                "generator": base64.b64encode(state.cpu().numpy().tobytes()).decode("ascii")}

    def load_state_dict(self, state: dict) -> None:
        if state.get("device") != self.device.type:  # a CPU state does not fit a CUDA generator
            return
        raw = torch.frombuffer(bytearray(base64.b64decode(state["generator"])), dtype=torch.uint8)
        with self._scheduler.exclusive():
            self._generator.set_state(raw)

    # ------------------------------------------------------------------ weights and memory
    @property
    def weight_version(self) -> str:
        return self._weight_version

    def update_weights(self, named_tensors, version: int | str) -> None:
        """Load HF-named tensors (dict, pairs or buckets; strict names/shapes) between two decode
        steps and set ``weight_version`` to ``str(version)``. After ``release_memory(keep_weights=False)``
        the push must carry every parameter: one that does not is loaded but leaves the engine
        refusing to generate, and raises naming what is missing."""
        with self._scheduler.exclusive():
            if "weights" in self._released and self._weights_offload.offloaded:
                raise RuntimeError("hf engine weights are released; call resume_memory(['weights']) before updating them")
            # parameters written since the drop, kept across calls: a push may come in several calls
            written = self._written_since_drop if self._weights_dropped else None
            load_named_tensors(self.model, named_tensors, written)
            if written is not None:
                missing = missing_parameters(self.model, written)
                if missing:
                    raise RuntimeError(
                        f"hf engine: after release_memory(keep_weights=False), pushes so far lack {len(missing)} "
                        f"parameter(s), e.g. {missing[:3]}; their values were dropped at the release, so the engine "
                        "will not generate until pushes have carried every parameter")
                self._weights_dropped = False
            self._weight_version = str(version)

    def release_memory(self, tags=None, *, keep_weights: bool = True) -> None:
        """Colocated training: free the GPU. ``weights`` frees the model's GPU memory and keeps a host
        copy (a no-op on CPU); ``kv_cache``/``cuda_graph`` free the fast path's slot cache and CUDA
        graphs (the generic path holds nothing between batches). Any tag drops the graphs: they read
        the weights and the cache by address, and both may come back elsewhere (recaptured lazily).
        Refused while requests are in flight (abort them first, as slime does before releasing).

        ``keep_weights=False`` (the loop, when a full push follows every resume; SGLang's default,
        which keeps no CPU backup of released weights): the parameters are freed without a host copy
        (no device-to-host copy now, no host-to-device copy at resume, no pinned host memory) and the
        engine refuses to generate until a push has carried every parameter. Buffers keep their copy."""
        tags = self._check_tags(tags)
        with self._scheduler.exclusive():  # the decode thread is parked: the load cannot change under us
            load = self._scheduler.load_stats()
            busy = load["num_running"] + load["num_waiting"]
            if busy:
                raise RuntimeError(f"release_memory with {busy} requests in flight; call abort_all() first")
            # on CPU only a drop frees anything, and only weights that own their memory (a checkpoint
            # loaded on CPU may be memory-mapped: then the release stays a no-op, as with a copy)
            drop_on_cpu = not keep_weights and all(p.untyped_storage().resizable() for p in self.model.parameters())
            if "weights" in tags and "weights" not in self._released and (self.device.type != "cpu" or drop_on_cpu):
                # Freed in place (core/gpu_offload.py): with a host copy in reused pinned buffers, so a
                # resume without a push still generates with the same weights, or without one.
                params = {t.untyped_storage()._cdata for t in self.model.parameters()}
                self._weights_offload.offload(
                    (t.data, keep_weights or t.untyped_storage()._cdata not in params)
                    for t in (*self.model.parameters(), *self.model.buffers()))
                if not keep_weights:  # a later release with a copy must not forget that these are gone
                    self._weights_dropped = True
                    self._written_since_drop = set()
            fast = self._scheduler.fast
            if fast is not None:
                if "kv_cache" in tags:
                    fast.release()
                elif fast.graphs is not None:
                    fast.graphs.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._released |= set(tags)

    def gpu_memory_gib(self) -> float | None:
        """GPU memory this process holds (the engine's share of a colocated GPU); None on CPU."""
        if self.device.type != "cuda":
            return None
        return torch.cuda.memory_allocated(self.device) / 2**30

    def resume_memory(self, tags=None) -> None:
        """Undo ``release_memory`` for ``tags`` (all by default); generation needs every tag back."""
        tags = self._check_tags(tags)
        with self._scheduler.exclusive():
            if "weights" in tags and "weights" in self._released and self._weights_offload.offloaded:
                self._weights_offload.onload()  # dropped parameters come back zero-filled, awaiting a push
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
        for seq, n in zip(sequences, response_lengths):
            if not 0 <= n < len(seq):
                raise ValueError(f"response length {n} does not fit a sequence of {len(seq)} tokens")
        if self._weights_dropped:
            raise RuntimeError(_DROPPED)
        out = []
        with self._scheduler.exclusive(), self._forward_context(), torch.inference_mode():
            device = next(self.model.parameters()).device
            for seq, n in zip(sequences, response_lengths):
                ids = torch.tensor([seq], dtype=torch.long, device=device)
                logits = self.model(input_ids=ids).logits[0, :-1].float() / temperature
                lp = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1)
                out.append(lp[len(seq) - 1 - n:].tolist() if n else [])
        return out

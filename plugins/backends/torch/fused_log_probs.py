"""Per-token log-probs (and entropy) straight from hidden states and the LM head's weight, in slices
of tokens: neither the ``[tokens, vocab]`` logits nor their gradient ever exist whole.

Used by the torch backend's forward for the scored positions (``TorchTrainBackend._forward_response``)
when the model's logits are exactly ``hidden @ lm_head.weight.T`` (``plain_lm_head``). At the Qwen3-4B
shape the logits of one 9k-token micro-batch are 2.8 GB in bf16 and as much again for their gradient;
here each slice's fp32 softmax (at most ``CHUNK_ELEMENTS``) is recomputed in the backward instead,
the idea behind Liger's fused linear cross-entropy, written in plain torch so it runs on CPU too.
The elementwise work between the GEMMs is in slice_kernels.py (compiled on CUDA by default).

Math (z = h·Wᵀ / T per token, p = softmax(z), lse = logsumexp(z)):
  log p[target] = z[target] − lse;   H = lse − Σ p·z
  ∂ log p[target]/∂z = onehot(target) − p;   ∂H/∂z = p·(Σ p·z − z)
  ∂/∂h = (∂/∂z)·W / T;   ∂/∂W = (∂/∂z)ᵀ·h / T
"""

from __future__ import annotations

import torch

# slices of at most CHUNK_ELEMENTS fp32 logits (256 MiB), as core's log-prob kernels take them
from plugrl.core.losses import CHUNK_ELEMENTS, accumulation_dtype, slab_tokens, token_chunks

from .slice_kernels import grad_basis_kernel, kernels

# model types whose causal-LM logits are exactly lm_head(last hidden state): no bias, scaling or soft-capping
PLAIN_HEAD_MODEL_TYPES = frozenset({"qwen2", "qwen3", "llama", "mistral"})


def plain_lm_head(model) -> torch.nn.Linear | None:
    """The LM head when ``model``'s logits are ``hidden @ head.weight.T`` and its decoder can be called
    alone (``model.model``), else None (the caller then runs the model's own forward)."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES or not isinstance(head, torch.nn.Linear):
        return None
    if head.bias is not None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    return head if isinstance(getattr(model, "model", None), torch.nn.Module) else None


def slice_logits(hidden: torch.Tensor, weight: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``hidden·Wᵀ`` for one slice of tokens, in ``acc`` (fp32, or fp64 for fp64 inputs); runs once
    per slice in the forward and again in the backward for the vocabulary columns not kept. The
    temperature is applied by the slice kernels (slice_kernels.py), fused with their first read.

    bf16/fp16 on CUDA: the GEMM writes fp32 itself (``out_dtype``), sparing a half-precision slab and
    its cast, and keeping the logits' low bits."""
    return matmul_into(hidden, weight.t(), acc)


def add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a·b`` in place, ``acc`` in fp32 (fp64 for fp64 operands); runs once per slice or block in
    the backward, for whichever gradient accumulates there.

    With bf16 operands on CUDA the fp32 sum is taken by the GEMM itself (``out_dtype``): a separate
    bf16->fp32 cast and fp32 add per slice cost 65 ms of a 692 ms Qwen3-4B step on an H100 when the
    LM head's gradient accumulated this way. Same-dtype operands (the fp32/fp64 CPU paths) are one
    ``addmm_``. Elsewhere (bf16 on CPU, where the dtype overload does not exist) the product is cast
    and added."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += (a @ b).to(acc.dtype)


def gemm_token_slice(vocab: int, chunk_tokens: int | None) -> int:
    """Tokens per forward slice: as many as keep the ``[tokens, vocab]`` fp32 slab within ``CHUNK_ELEMENTS``,
    rounded down to a multiple of 128 (the GEMM's row tile) so no slice's last tile runs mostly empty
    (at the 4B vocabulary 441 tokens would fill 4 tiles of 128 rows, 14% of them padding); ``chunk_tokens``
    when given (tests)."""
    if chunk_tokens is not None:
        return chunk_tokens
    widest = slab_tokens(vocab)
    return widest // 128 * 128 if widest >= 128 else widest


def vocab_blocks(num_tokens: int, vocab: int, block: int | None, first: int = 0):
    """``(start, end)`` vocabulary rows from ``first`` on whose ``[tokens, rows]`` fp32 slab stays within
    ``CHUNK_ELEMENTS`` (``block`` rows each when given); the backward's blocks when ``num_tokens <= vocab``."""
    rows = vocab - first
    if block is None:
        widest = max(1, CHUNK_ELEMENTS // max(1, num_tokens))
        blocks = -(-rows // widest)
        # equal blocks, each a multiple of 64 rows where that is possible (aligned rows for the tensor-core
        # GEMMs that read the 16-bit slabs; the slab may pass CHUNK_ELEMENTS by under 64 rows' worth)
        block = -(-rows // max(1, blocks))
        block = -(-block // 64) * 64 if block >= 64 else block
    for start in range(first, vocab, max(1, block)):
        yield start, min(vocab, start + block)


def cached_basis_columns(num_tokens: int, vocab: int, itemsize: int, budget_bytes: int) -> int:
    """How many leading vocabulary columns of the log-probs' gradient basis (``[tokens, columns]`` in the
    hidden states' dtype) the forward keeps within ``budget_bytes``: all of them when they fit, else a
    multiple of 128 when that many fit (whole GEMM tiles), else what fits. Kept only where the backward
    runs over vocabulary blocks (``num_tokens <= vocab``)."""
    if budget_bytes <= 0 or num_tokens == 0 or num_tokens > vocab:
        return 0
    columns = min(vocab, budget_bytes // (num_tokens * itemsize))
    return columns if columns == vocab or columns < 128 else columns // 128 * 128


def matmul_into(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``a @ b`` in ``acc``: on CUDA with 16-bit operands the GEMM writes fp32 itself (``out_dtype``)."""
    if a.is_cuda and a.dtype != acc and acc == torch.float32:
        return torch.mm(a, b, out_dtype=acc)
    return (a @ b).to(acc)


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, chunk_tokens, vocab_block, compiled,
                grad_cache_bytes):
        n, vocab = hidden.shape[0], weight.shape[0]
        acc = accumulation_dtype(hidden.dtype)
        forward_slice, _ = kernels(compiled)
        log_probs = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        mean_z = torch.empty(n, dtype=acc, device=hidden.device) if with_entropy else None
        # linear_log_probs passes no budget without a backward to come (no_grad, no input needing grad)
        kept = cached_basis_columns(n, vocab, hidden.element_size(), grad_cache_bytes)
        basis = torch.empty(n, kept, dtype=hidden.dtype, device=hidden.device) if kept else None
        for s, e in token_chunks(n, vocab, gemm_token_slice(vocab, chunk_tokens)):
            z = slice_logits(hidden[s:e], weight, acc)
            lp, lse_s, mean_z_s = forward_slice(z, targets[s:e], 1.0 / temperature, with_entropy)
            log_probs[s:e], lse[s:e] = lp, lse_s
            if with_entropy:
                mean_z[s:e] = mean_z_s
            if basis is not None:
                grad_basis_kernel(compiled)(z[:, :kept], lse[s:e], targets[s:e], 1.0 / temperature, basis[s:e])
            del z  # one fp32 slab at a time: the next slice's GEMM would otherwise allocate beside it
        ctx.save_for_backward(hidden, weight, targets, lse, mean_z if with_entropy else lse,
                              basis if basis is not None else lse)
        ctx.kept_columns = kept
        # an output the loss does not use (entropy as a metric only) reaches backward as None, not as
        # zeros, so its terms are skipped there
        ctx.set_materialize_grads(False)
        ctx.temperature, ctx.with_entropy, ctx.compiled = temperature, with_entropy, compiled
        ctx.chunk_tokens, ctx.vocab_block = chunk_tokens, vocab_block
        if not with_entropy:
            return log_probs, torch.empty(0, dtype=acc, device=hidden.device)
        return log_probs, lse - mean_z

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        hidden, weight, targets, lse, mean_z, basis = ctx.saved_tensors
        use_entropy = ctx.with_entropy and grad_entropy is not None and grad_entropy.numel() > 0
        grads = (grad_log_probs, grad_entropy if use_entropy else None)
        n, vocab = hidden.shape[0], weight.shape[0]
        # the kept basis serves the log-probs' term alone; an entropy gradient recomputes every column
        kept = ctx.kept_columns if grad_log_probs is not None and not use_entropy else 0
        if n <= vocab:
            grad_hidden, grad_weight = _backward_by_vocab_blocks(ctx, hidden, weight, targets, lse, mean_z, *grads,
                                                                 basis=basis if kept else None)
        else:
            grad_hidden, grad_weight = _backward_by_token_slices(ctx, hidden, weight, targets, lse, mean_z, *grads)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


# The backward recomputes the logits a slab at a time and turns each into its gradient g, then
# ∂/∂h = g·W and ∂/∂W = gᵀ·h. One of the two sums over slabs: over vocabulary blocks ∂/∂h does
# (an [n, H] fp32 sum), over token slices ∂/∂W does (a [V, H] fp32 sum). Each slab reads and writes
# that sum once, so the smaller one is accumulated: vocabulary blocks when n <= V, as in RL training
# (at the 4B shape a 9k-token micro-batch's ∂/∂h is 94 MB against the LM head's 1.56 GB, which token
# slices re-read and re-wrote ~21 times per step). The other gradient is written once per slab, by
# its GEMM, in the weights' dtype. Vocabulary columns whose gradient basis the forward kept
# (``grad_cache_bytes``) skip the recomputation: their g is the basis scaled per token.

def _backward_by_vocab_blocks(ctx, hidden, weight, targets, lse, mean_z, grad_log_probs, grad_entropy, basis=None):
    _, grad_slab = kernels(ctx.compiled)
    acc = lse.dtype
    kept = 0 if basis is None else basis.shape[1]
    grad_hidden = grad_weight = None
    if kept:
        # the kept columns: g = basis·(grad/T) per token, so ∂/∂h = (basis·W)·(grad/T) and
        # ∂/∂W = basisᵀ·(h·grad/T), two GEMMs on the basis and no recomputed logits
        scale = grad_log_probs.to(acc) * (1.0 / ctx.temperature)
        if ctx.needs_input_grad[0]:
            grad_hidden = matmul_into(basis, weight[:kept], acc).mul_(scale[:, None])
        if ctx.needs_input_grad[1]:
            grad_weight = torch.empty_like(weight)
            torch.mm(basis.t(), (hidden * scale[:, None]).to(hidden.dtype), out=grad_weight[:kept])
    if grad_hidden is None and ctx.needs_input_grad[0]:
        grad_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
    if grad_weight is None and ctx.needs_input_grad[1]:
        grad_weight = torch.empty_like(weight)
    for v0, v1 in vocab_blocks(hidden.shape[0], weight.shape[0], ctx.vocab_block, first=kept):
        block = weight[v0:v1]
        # targets outside the block match no column of its one-hot
        g = grad_slab(slice_logits(hidden, block, acc), lse, mean_z if grad_entropy is not None else None,
                      targets - v0, grad_log_probs, grad_entropy, 1.0 / ctx.temperature, hidden.dtype)
        if grad_weight is not None:
            torch.mm(g.t(), hidden, out=grad_weight[v0:v1])
        if grad_hidden is not None:
            add_product(grad_hidden, g, block)
    return None if grad_hidden is None else grad_hidden.to(hidden.dtype), grad_weight


def _backward_by_token_slices(ctx, hidden, weight, targets, lse, mean_z, grad_log_probs, grad_entropy):
    _, grad_slab = kernels(ctx.compiled)
    acc = lse.dtype
    grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
    for s, e in token_chunks(hidden.shape[0], weight.shape[0], gemm_token_slice(weight.shape[0], ctx.chunk_tokens)):
        g = grad_slab(slice_logits(hidden[s:e], weight, acc), lse[s:e],
                      mean_z[s:e] if grad_entropy is not None else None, targets[s:e],
                      None if grad_log_probs is None else grad_log_probs[s:e],
                      None if grad_entropy is None else grad_entropy[s:e], 1.0 / ctx.temperature, hidden.dtype)
        if grad_hidden is not None:
            grad_hidden[s:e] = g @ weight
        if grad_weight is not None:
            add_product(grad_weight, g.t(), hidden[s:e])
    return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype)


def linear_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                     with_entropy: bool = False, chunk_tokens: int | None = None, vocab_block: int | None = None,
                     compiled: bool = False, grad_cache_bytes: int = 0):
    """``(log_softmax(h·Wᵀ/T)[target], entropy or None)`` for ``hidden [N, H]``, ``weight [V, H]``,
    ``targets [N]``, both fp32 (fp64 for fp64 inputs); differentiable in ``hidden`` and ``weight``.
    ``chunk_tokens`` / ``vocab_block`` override the slab sizes (tests); ``compiled`` runs the slab
    kernels under torch.compile (slice_kernels.py).

    ``grad_cache_bytes``: up to that many bytes of the log-probs' gradient basis (``onehot − softmax``
    per token and logit, in the hidden states' dtype, ``cached_basis_columns``) are written by the
    forward and kept until the backward, whose kept columns then take two GEMMs instead of three (no
    recomputed logits). It pays one GEMM of the LM head's size per kept vocabulary: at the 4B shape
    ~10 ms of a 0.6 s step for 2.3 GiB held from the LM head's forward to its backward."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (--rollout-temperature), got {temperature}")
    # ctx.needs_input_grad inside the function ignores grad mode: under no_grad (the old-policy log-probs,
    # whose LM head still requires grad) a kept basis would be written and thrown away
    backward_to_come = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    log_probs, entropy = _LinearLogProbs.apply(hidden, weight, targets.long(), float(temperature), with_entropy,
                                               chunk_tokens, vocab_block, compiled,
                                               int(grad_cache_bytes) if backward_to_come else 0)
    return log_probs, (entropy if with_entropy else None)

"""Log-probs and entropy from hidden states and the LM head in slices of tokens
(plugins/backends/torch/fused_log_probs.py): values and gradients against autograd through the full
logits (fp64 gradcheck, several slice sizes), and the torch backend's forward and train step with it
against the same backend computing full logits (--fused-log-probs always / never), and 'auto' choosing
by the size of the logits."""

import copy

import pytest
import torch

from plugrl.plugins.backends.torch.fused_log_probs import linear_log_probs, plain_lm_head
from plugrl.plugins.backends.torch_trainer import TorchTrainBackend
from plugrl.plugins.estimators.grpo import GRPOEstimator

from .test_torch_trainer import _grads_after_one_step, checkpoint, make_args, random_sequences  # noqa: F401  (fixture)


def _reference(hidden, weight, targets, temperature):
    z = (hidden @ weight.t()) / temperature
    log_p = torch.log_softmax(z, -1)
    return log_p.gather(1, targets[:, None])[:, 0], -(log_p.exp() * log_p).sum(-1)


def _matches_autograd(tokens: int, vocab: int, hidden_size: int, seed: int, temperature: float, **options):
    """Random fp64 inputs; ``linear_log_probs(**options)``'s log-probs, entropy and their gradients under
    random output weights equal autograd's through the full logits. -> (hidden, weight, targets)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    g_lp = torch.randn(tokens, dtype=torch.float64, generator=gen)
    g_ent = torch.randn(tokens, dtype=torch.float64, generator=gen)
    lp, ent = linear_log_probs(hidden, weight, targets, temperature=temperature, with_entropy=True, **options)
    ref_lp, ref_ent = _reference(hidden, weight, targets, temperature)
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(ent, ref_ent)
    grads = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), (hidden, weight))
    ref_grads = torch.autograd.grad((ref_lp * g_lp).sum() + (ref_ent * g_ent).sum(), (hidden, weight))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
    return hidden, weight, targets


# (tokens, vocab): 7 <= 11 takes the backward over vocabulary blocks, 13 > 5 the one over token slices
@pytest.mark.parametrize("tokens,vocab", [(7, 11), (13, 5)])
@pytest.mark.parametrize("chunk,block", [(1, 1), (3, 4), (None, None)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_equal_autograd_through_full_logits(tokens, vocab, chunk, block, temperature):
    hidden, weight, targets = _matches_autograd(tokens, vocab, 5, 0, temperature, chunk_tokens=chunk, vocab_block=block)

    def both(h, w):
        return linear_log_probs(h, w, targets, temperature=temperature, with_entropy=True, chunk_tokens=chunk,
                                vocab_block=block)

    assert torch.autograd.gradcheck(both, (hidden, weight))
    assert torch.autograd.gradcheck(
        lambda h, w: linear_log_probs(h, w, targets, temperature=temperature, chunk_tokens=chunk, vocab_block=block)[0],
        (hidden, weight))


# (columns kept, vocab block): all 11 columns, 5 then blocks of 4, 3 then blocks of the default size
@pytest.mark.parametrize("budget_columns,block", [(11, None), (5, 4), (3, None)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_a_kept_gradient_basis_gives_autograds_gradients_and_skips_the_recomputed_logits(
        budget_columns, block, temperature, monkeypatch):
    """``grad_cache_bytes``: the forward keeps the first columns' ``onehot − softmax`` (fp64 here), the
    backward takes their gradients from it (no logits recomputed for them) and recomputes the rest;
    gradients equal autograd through the full logits (gradcheck), with the entropy used as a metric
    only or, which recomputes every column, in the loss too."""
    from plugrl.plugins.backends.torch import fused_log_probs

    tokens, vocab = 7, 11
    budget = tokens * budget_columns * 8  # fp64 inputs
    assert fused_log_probs.cached_basis_columns(tokens, vocab, 8, budget) == budget_columns
    _matches_autograd(tokens, vocab, 5, 0, temperature, vocab_block=block, grad_cache_bytes=budget)
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(tokens, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    assert torch.autograd.gradcheck(
        lambda h, w: linear_log_probs(h, w, targets, temperature=temperature, with_entropy=True, vocab_block=block,
                                      grad_cache_bytes=budget)[0], (hidden, weight))

    recomputed = []  # the vocabulary rows whose logits the backward recomputes
    slice_logits = fused_log_probs.slice_logits
    monkeypatch.setattr(fused_log_probs, "slice_logits",
                        lambda h, w, acc: recomputed.append(w.shape[0]) or slice_logits(h, w, acc))
    lp, _ = linear_log_probs(hidden, weight, targets, temperature=temperature, with_entropy=True,
                             vocab_block=block, grad_cache_bytes=budget)
    recomputed.clear()
    lp.sum().backward()
    assert sum(recomputed) == vocab - budget_columns


def test_no_gradient_basis_is_kept_without_a_budget_room_or_a_backward():
    from plugrl.plugins.backends.torch.fused_log_probs import cached_basis_columns

    assert cached_basis_columns(8192, 151936, 2, 4 * 2**30) == 151936  # the 4B shape: 2.3 GiB fits 4
    assert cached_basis_columns(8192, 151936, 2, 2**30) == 65536  # 1 GiB: whole 128-column tiles
    assert cached_basis_columns(8192, 151936, 2, 0) == 0
    assert cached_basis_columns(20, 11, 4, 10**9) == 0  # more tokens than vocabulary: token-slice backward
    assert cached_basis_columns(0, 11, 4, 10**9) == 0


def test_the_basis_is_written_only_for_a_backward(monkeypatch):
    """Under no_grad (the old-policy and reference log-probs) the forward keeps nothing, whatever the budget."""
    from plugrl.plugins.backends.torch import fused_log_probs

    written = []
    monkeypatch.setattr(fused_log_probs, "grad_basis_kernel",
                        lambda compiled: lambda z, *rest: written.append(z.shape))
    # the LM head's weight requires grad, as the policy's does while its old log-probs are computed
    hidden, weight, targets = torch.randn(4, 3), torch.randn(9, 3, requires_grad=True), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        linear_log_probs(hidden, weight, targets, grad_cache_bytes=10**9)
    assert written == []
    linear_log_probs(hidden.detach(), weight.detach(), targets, grad_cache_bytes=10**9)  # nothing needs grad
    assert written == []
    linear_log_probs(hidden, weight, targets, grad_cache_bytes=10**9)
    assert written == [(4, 9)]


def test_the_compiled_basis_kernel_matches_autograd_in_one_graph(fresh_compiles):
    from torch._dynamo.utils import counters

    from plugrl.plugins.backends.torch import slice_kernels

    counters.clear()
    for n in (13, 17, 9):  # first 8 of 19 columns kept, the rest in blocks of 7
        _matches_autograd(n, 19, 6, n, 0.7, chunk_tokens=5, vocab_block=7, compiled=True, grad_cache_bytes=n * 8 * 8)
        assert not slice_kernels._failed, slice_kernels._failed
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])  # forward, gradient, basis


@pytest.fixture
def fresh_compiles():
    """The slice kernels compiled anew in this test (another test may have compiled them already)."""
    from plugrl.plugins.backends.torch import slice_kernels

    torch._dynamo.reset()
    slice_kernels._compiled.cache_clear()
    slice_kernels._compiled_basis.cache_clear()
    yield


def test_compiled_slice_kernels_match_autograd_and_compile_once_for_every_length(fresh_compiles):
    """--compile-log-prob-slices: the slice kernels under torch.compile (inductor's C++ backend here, Triton
    on CUDA) give autograd's values and gradients through the full logits, for micro-batches of four
    lengths, slabs of many shapes and both backward orientations, from one graph per kernel (no
    recompile per shape, which would hit dynamo's recompile limit over a run)."""
    from torch._dynamo.utils import counters

    from plugrl.plugins.backends.torch import slice_kernels

    counters.clear()
    # forward slices of 5 tokens and a last one of 3, 2, 4 or 3; backward over vocabulary blocks of 7, 7
    # and 5 rows (13, 17, 9 tokens <= 19) or over the token slices (23 tokens)
    for n in (13, 17, 9, 23):
        _matches_autograd(n, 19, 6, n, 0.7, chunk_tokens=5, vocab_block=7, compiled=True)
        assert not slice_kernels._failed, slice_kernels._failed
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # the forward and the gradient kernel


ON_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA_EAGER = pytest.param("cuda", False, marks=ON_CUDA, id="cuda-eager")
CUDA_COMPILED = pytest.param("cuda", True, marks=ON_CUDA, id="cuda-compiled")


@pytest.mark.parametrize("device,compiled", [("cpu", False), CUDA_EAGER, CUDA_COMPILED])
@pytest.mark.parametrize("kept_columns", [0, 40, 96])
def test_bf16_gradients_accumulate_over_slices_like_an_fp64_reference(device, compiled, kept_columns):
    """bf16 operands: logits in fp32 (on CUDA straight from the GEMM), the backward over 4 vocabulary
    blocks (each block's LM-head gradient written by one GEMM, the hidden states' gradient summed over
    blocks in fp32: on CUDA inside the GEMM, on CPU by a cast and add), or over a kept bf16 gradient
    basis for the first 40 or all 96 columns; log-probs and gradients match autograd through the full
    fp64 logits of the same values."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(64, 32, generator=gen).to(device, torch.bfloat16).requires_grad_()
    weight = (0.3 * torch.randn(96, 32, generator=gen)).to(device, torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 96, (64,), generator=gen).to(device)
    g_lp = torch.randn(64, generator=gen).to(device)
    lp, _ = linear_log_probs(hidden, weight, targets, temperature=0.7, chunk_tokens=8, vocab_block=24,
                             compiled=compiled, grad_cache_bytes=64 * kept_columns * 2)
    grad_hidden, grad_weight = torch.autograd.grad((lp * g_lp).sum(), (hidden, weight))
    assert grad_weight.dtype == torch.bfloat16

    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref_lp, _ = _reference(h64, w64, targets, 0.7)
    # each logit is off by at most half a bf16 ulp (2^-9 relative) where the GEMM writes bf16 (CPU), and a
    # log-softmax adds at most twice its inputs' largest error
    logit_bound = 2 * 2.0 ** -9 * float((h64 @ w64.t()).abs().max()) / 0.7
    assert float((lp.double() - ref_lp).abs().max()) < logit_bound
    ref_hidden, ref_weight = torch.autograd.grad((ref_lp * g_lp.double()).sum(), (h64, w64))
    for got, want in ((grad_weight, ref_weight), (grad_hidden, ref_hidden)):
        assert float((got.double() - want).norm() / want.norm()) < 1e-2


def test_an_unused_entropy_or_log_prob_output_gives_the_same_gradients():
    """Entropy computed but left out of the loss (a metric) and log-probs left out: the backward sees
    None for that output and must give what autograd gives with that output weighted by zero."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(9, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(13, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.randint(0, 13, (9,), generator=gen)
    w = torch.randn(9, dtype=torch.float64, generator=gen)
    lp, ent = linear_log_probs(hidden, weight, targets, temperature=0.8, with_entropy=True, chunk_tokens=4)
    for used, unused in ((lp, ent), (ent, lp)):
        alone = torch.autograd.grad((used * w).sum(), (hidden, weight), retain_graph=True)
        with_zero = torch.autograd.grad((used * w).sum() + 0.0 * unused.sum(), (hidden, weight), retain_graph=True)
        for got, want in zip(alone, with_zero):
            torch.testing.assert_close(got, want)
        ref_lp, ref_ent = _reference(hidden, weight, targets, 0.8)
        ref_used = ref_lp if used is lp else ref_ent
        for got, want in zip(alone, torch.autograd.grad((ref_used * w).sum(), (hidden, weight))):
            torch.testing.assert_close(got, want)


def test_no_entropy_is_returned_unless_asked_and_a_bad_temperature_is_refused():
    hidden, weight = torch.randn(3, 4), torch.randn(6, 4)
    lp, ent = linear_log_probs(hidden, weight, torch.tensor([0, 5, 2]))
    assert ent is None and lp.dtype == torch.float32 and lp.shape == (3,)
    with pytest.raises(ValueError, match="--rollout-temperature"):
        linear_log_probs(hidden, weight, torch.tensor([0, 5, 2]), temperature=0)


def test_only_plain_heads_take_the_fused_path(checkpoint):
    backend = TorchTrainBackend(make_args(checkpoint), estimator=GRPOEstimator(None))
    model = backend.model
    assert plain_lm_head(model) is model.get_output_embeddings()  # Qwen3: logits = lm_head(hidden)
    other = copy.deepcopy(model)
    other.config.model_type = "gemma2"  # soft-capped logits: not a plain head
    assert plain_lm_head(other) is None
    biased = copy.deepcopy(model)
    biased.lm_head = torch.nn.Linear(biased.lm_head.in_features, biased.lm_head.out_features, bias=True)
    assert plain_lm_head(biased) is None


@pytest.mark.parametrize("with_entropy", [False, True])
def test_the_backend_forward_equals_full_logits(checkpoint, with_entropy):
    fused = TorchTrainBackend(make_args(checkpoint, rollout_temperature=0.8, fused_log_probs="always"),
                              estimator=GRPOEstimator(None))
    full = TorchTrainBackend(make_args(checkpoint, rollout_temperature=0.8, fused_log_probs="never"),
                             estimator=GRPOEstimator(None))
    seqs, resp = random_sequences(seed=2)
    lp, ent = fused._forward_response(fused.model, seqs, resp, with_entropy=with_entropy)
    ref_lp, ref_ent = full._forward_response(full.model, seqs, resp, with_entropy=with_entropy)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    if with_entropy:
        torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    (lp.sum() + (ent.sum() if with_entropy else 0)).backward()
    (ref_lp.sum() + (ref_ent.sum() if with_entropy else 0)).backward()
    for (name, a), (_, b) in zip(fused.model.named_parameters(), full.model.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("entropy_coef,grad_cache", [(0.01, None), (0.0, "1"), (0.01, "1")])
def test_a_grpo_step_with_the_fused_path_equals_the_full_logits_step(checkpoint, entropy_coef, grad_cache,
                                                                    monkeypatch):
    """One step's gradients (lr 0; with gradient checkpointing, with an entropy term or without) and
    metrics; ``--log-prob-grad-cache 1`` keeps the whole gradient basis of these micro-batches (1 GiB)."""
    from plugrl.plugins.backends.torch import fused_log_probs

    kept = []
    basis_kernel = fused_log_probs.grad_basis_kernel
    monkeypatch.setattr(fused_log_probs, "grad_basis_kernel", lambda compiled: kept.append(1) or basis_kernel(compiled))
    args = dict(micro_batch_size=2, entropy_coef=entropy_coef, gradient_checkpointing=True)
    fused, metrics = _grads_after_one_step(checkpoint, fused_log_probs="always", log_prob_grad_cache=grad_cache,
                                           **args)
    # 'auto' on CPU keeps nothing, and nothing is kept for an entropy term, whose gradient needs every logit
    assert bool(kept) == (grad_cache is not None and entropy_coef == 0.0)
    full, ref_metrics = _grads_after_one_step(checkpoint, fused_log_probs="never", **args)
    assert fused.keys() == full.keys() and len(full) > 10
    for name, grad in full.items():
        torch.testing.assert_close(fused[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    compared = [k for k in ("train/loss", "train/pg_loss", "train/entropy_loss", "train/grad_norm") if k in ref_metrics]
    assert len(compared) >= 2, sorted(ref_metrics)
    for key in compared:
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-5, abs=1e-7), key


def test_auto_fuses_only_when_the_logits_exceed_one_slice(checkpoint, monkeypatch):
    """The default: a micro-batch whose [tokens, vocab] logits fit one slice keeps the full logits (the
    backward's recomputation would cost more than it saves); a bigger one takes the fused path."""
    from plugrl.plugins.backends.torch import trainer

    backend = TorchTrainBackend(make_args(checkpoint), estimator=GRPOEstimator(None))
    assert backend.fused_log_probs == "auto"
    calls = []
    real = trainer.linear_log_probs
    monkeypatch.setattr(trainer, "linear_log_probs", lambda *a, **k: calls.append(1) or real(*a, **k))
    seqs, resp = random_sequences(seed=6)
    scored, vocab = sum(resp), backend.model.config.vocab_size
    monkeypatch.setattr(trainer, "CHUNK_ELEMENTS", scored * vocab)  # exactly one slice: not fused
    backend._forward_response(backend.model, seqs, resp, with_entropy=False)
    assert calls == []
    monkeypatch.setattr(trainer, "CHUNK_ELEMENTS", scored * vocab - 1)  # more than one slice: fused
    backend._forward_response(backend.model, seqs, resp, with_entropy=False)
    assert calls == [1]


@pytest.mark.parametrize("tokens,vocab", [(9208, 151936), (1, 151936), (7, 11), (150000, 151936), (3000, 1000)])
def test_vocab_blocks_cover_the_vocabulary_once_in_aligned_blocks_near_one_slab(tokens, vocab):
    from plugrl.core.losses import CHUNK_ELEMENTS
    from plugrl.plugins.backends.torch.fused_log_probs import vocab_blocks

    blocks = list(vocab_blocks(tokens, vocab, None))
    assert [b for _, b in blocks[:-1]] == [a for a, _ in blocks[1:]] and blocks[0][0] == 0 and blocks[-1][1] == vocab
    widths = [b - a for a, b in blocks]
    assert all(w % 64 == 0 for w in widths[:-1]) and len(set(widths[:-1])) <= 1
    assert max(widths) * tokens <= CHUNK_ELEMENTS + 64 * tokens or max(widths) == 1


@pytest.mark.parametrize("vocab", [151936, 32000, 1000, 600_000, 10**9])
def test_forward_token_slices_fill_whole_gemm_row_tiles_within_one_slab(vocab):
    from plugrl.core.losses import CHUNK_ELEMENTS
    from plugrl.plugins.backends.torch.fused_log_probs import gemm_token_slice

    widest = CHUNK_ELEMENTS // vocab  # the most tokens whose fp32 [tokens, vocab] slab fits one slab
    size = gemm_token_slice(vocab, None)
    assert 1 <= size <= max(1, widest)
    if widest >= 128:
        assert size % 128 == 0 and widest - size < 128  # whole 128-row tiles, as many as fit
    else:
        assert size == max(1, widest)
    assert gemm_token_slice(vocab, 7) == 7  # an explicit slice size (tests) is kept

"""The megatron train backend on CUDA (marker ``gpu``; run on the GPU machine: megatron-core 0.19,
no Transformer Engine). A Qwen3-shaped model with random bf16 weights is built locally; the
independent references are HF transformers (logits, the torch backend's GRPO step) and the
backend's own unpacked / SDPA paths. TP=2 and DP=2 need two GPUs (tests/megatron_tp_worker.py)."""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"),
]
pytest.importorskip("megatron.core", reason="megatron-core not installed (plugrl[megatron])")

from .megatron_ranks import make_args, megatron, run_ranks, train_data  # noqa: E402  (after the skip)
from .qwen3_gpu_checkpoint import SHAPE, build_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("qwen3") / "ckpt")


@pytest.fixture(scope="module", autouse=True)
def one_process_world():
    """The backend creates a world of one; leave no process group behind for other test modules."""
    yield
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()



def sequences(count=8, seed=0, vocab=4000):
    gen = torch.Generator().manual_seed(seed)
    seqs, resp = [], []
    for i in range(count):
        prompt, response = 40 + 17 * i, 30 + 11 * ((i * 5) % 7)
        seqs.append(torch.randint(0, vocab, (prompt + response,), generator=gen).tolist())
        resp.append(response)
    return seqs, resp




def values(metrics: dict) -> dict:
    """A train call's metrics without its wall-clock timers (``perf/``), which no two runs share."""
    return {k: v for k, v in metrics.items() if not k.startswith("perf/")}


def rel_error(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_logits_equal_hf_and_packed_equals_unpacked(checkpoint):
    from plugrl.plugins.backends.megatron.backend import pack_thd
    from transformers import AutoModelForCausalLM

    backend = megatron(make_args(checkpoint))
    backend.model.eval()
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).cuda().eval()
    seqs, _ = sequences(6)
    with torch.no_grad():
        packed = backend.logits(backend.model, pack_thd(seqs, "cuda"))[:, :SHAPE["vocab_size"]]
        offset = 0
        for seq in seqs:
            ids = torch.tensor([seq], device="cuda")
            reference = hf(input_ids=ids).logits[0]
            alone = backend.logits(backend.model, pack_thd([seq], "cuda"))[:, :SHAPE["vocab_size"]]
            mine = packed[offset:offset + len(seq)]
            assert rel_error(mine, reference) < 1e-2
            assert rel_error(mine, alone) < 1e-2
            offset += len(seq)


def test_varlen_attention_equals_sdpa_per_segment():
    from plugrl.plugins.backends.megatron.attention import packed_attention

    torch.manual_seed(0)
    lengths = [300, 17, 1024, 5]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    q = torch.randn(sum(lengths), 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(sum(lengths), 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(sum(lengths), 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    outs, grads = [], []
    for impl in ("varlen", "sdpa"):
        out = packed_attention(q, k, v, cu, max(lengths), scale=128 ** -0.5, implementation=impl)
        (g,) = torch.autograd.grad(out.float().square().sum(), q)
        outs.append(out)
        grads.append(g)
    assert rel_error(outs[0], outs[1]) < 1e-2
    assert rel_error(grads[0], grads[1]) < 2e-2


def test_grpo_step_equals_the_torch_backend(checkpoint):
    from plugrl.plugins.backends.torch_trainer import TorchTrainBackend
    from plugrl.plugins.estimators.grpo import GRPOEstimator

    args = make_args(checkpoint, lr=1e-4)
    seqs, resp = sequences(8, seed=1)
    data = train_data(seqs, resp, [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    reference = TorchTrainBackend(args, estimator=GRPOEstimator(args)).train(0, data)
    got = megatron(args).train(0, data)
    for key in ("train/pg_loss", "train/entropy_loss", "train/grad_norm", "train/train_rollout_logprob_abs_diff"):
        assert got[key] == pytest.approx(reference[key], rel=2e-2, abs=1e-4), (key, got[key], reference[key])


def test_full_recompute_gives_the_same_step(checkpoint):
    seqs, resp = sequences(8, seed=2)
    data = train_data(seqs, resp, [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    plain = megatron(make_args(checkpoint)).train(0, data)
    recompute = megatron(make_args(checkpoint, recompute_granularity="full", recompute_method="uniform",
                                   recompute_num_layers=1)).train(0, data)
    for key in ("train/pg_loss", "train/entropy_loss", "train/grad_norm"):
        assert recompute[key] == pytest.approx(plain[key], rel=1e-3, abs=1e-6), key


def test_fused_kernels_give_the_same_step(checkpoint):
    """The compiled RMSNorm / RoPE / log-prob kernels and megatron's fused SwiGLU and bias-dropout-add
    (the CUDA default) against the same step run unfused (--no-*-fusion), with full recompute."""
    seqs, resp = sequences(8, seed=4)
    data = train_data(seqs, resp, [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    recompute = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    fused = megatron(make_args(checkpoint, **recompute)).train(0, data)
    plain = megatron(make_args(checkpoint, **recompute, no_bias_swiglu_fusion=True, no_bias_dropout_fusion=True,
                               no_rope_fusion=True, no_rmsnorm_fusion=True)).train(0, data)
    for key in ("train/pg_loss", "train/entropy_loss", "train/grad_norm", "train/train_rollout_logprob_abs_diff"):
        assert fused[key] == pytest.approx(plain[key], rel=2e-2, abs=1e-4), (key, fused[key], plain[key])


@pytest.mark.parametrize("fp32_buffer", [False, True], ids=["bf16-buffer", "fp32-buffer"])
def test_wgrad_accumulation_fusion_gives_the_same_gradients(checkpoint, monkeypatch, fp32_buffer):
    """Weight gradients accumulated into megatron's gradient buffer by the GEMM (the CUDA default)
    against the same step with --no-gradient-accumulation-fusion (a bf16 .grad per weight and
    micro-batch, added by megatron's DDP hook), over several micro-batches. Every parameter's gradient
    is compared, the tied embedding too (its lookup gradient must not be dropped where the output
    layer accumulated). The buffer is bf16 by default, fp32 with --accumulate-allreduce-grads-in-fp32."""
    from megatron.core.tensor_parallel import layers
    from plugrl.plugins.backends.megatron import wgrad_accumulation

    assert wgrad_accumulation.install()
    kernels = layers.fused_weight_gradient_mlp_cuda  # this module, or apex's extension where installed
    calls = []
    for name in ("wgrad_gemm_accum_fp32", "wgrad_gemm_accum_fp16"):  # by the buffer's dtype (bf16 by default)
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *operands, real=real: (calls.append(operands[2].dtype),
                                                                          real(*operands)))
    seqs, resp = sequences(8, seed=5)
    data = train_data(seqs, resp, [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    small = {"max_tokens_per_gpu": 256, "clip_grad": 1e9, "lr": 1e-4,  # several micro-batches, no clipping
             "accumulate_allreduce_grads_in_fp32": fp32_buffer}
    gradients, norms = [], []
    for off in (False, True):
        backend = megatron(make_args(checkpoint, **small, no_gradient_accumulation_fusion=off))
        assert backend.wgrad_accumulation_fusion is not off
        norms.append(backend.train(0, data)["train/grad_norm"])
        gradients.append({name: p.main_grad.clone() for name, p in backend.model.named_parameters()})
        micro_batches = backend.progress[1]
        if not off:
            linear_weights = 4 * SHAPE["num_hidden_layers"] + 1  # qkv, proj, fc1, fc2 per layer; output layer
            assert micro_batches >= 3 and len(calls) == linear_weights * micro_batches
            assert set(calls) == {torch.float32 if fp32_buffer else torch.bfloat16}
    fused, plain = gradients
    assert fused.keys() == plain.keys()
    for name in fused:
        # the unfused path rounds each micro-batch's gradient to bf16 before summing (~4e-3 relative)
        assert rel_error(fused[name], plain[name]) < 1e-2, name
    assert norms[0] == pytest.approx(norms[1], rel=5e-3)


def test_offload_frees_memory_and_training_continues_identically(checkpoint, tmp_path):
    seqs, resp = sequences(8, seed=3)
    data = train_data(seqs, resp, [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    straight = megatron(make_args(checkpoint))
    straight.train(0, data)
    expected = straight.train(1, data)
    del straight
    torch.cuda.empty_cache()
    backend = megatron(make_args(checkpoint))
    backend.train(0, data)
    exported = backend.export_weights(None)[0]
    before = torch.cuda.memory_allocated()
    backend.offload()
    after = torch.cuda.memory_allocated()
    # colocated runs push weights to the engines while the trainer is offloaded
    offloaded_export = backend.export_weights(None)[0]
    assert offloaded_export.keys() == exported.keys()
    assert all(torch.equal(offloaded_export[k], exported[k]) for k in exported)
    backend.onload()
    got = backend.train(1, data)
    # params (bf16) + grads (bf16) + fp32 main params + 2 Adam moments = 16 bytes per parameter
    n_params = sum(p.numel() for p in backend.model.parameters())
    assert before - after >= 0.9 * 16 * n_params, (before, after, n_params)
    assert got.pop("train/offload_left_gib") < after / 2**30 + 1e-6 and "train/offload_freed_gib" in got
    got.pop("train/offload_freed_gib")
    assert values(got) == pytest.approx(values(expected), rel=1e-6, abs=1e-9)
    # save / load (distributed optimizer state gathered to DP rank 0) round trip on the GPU
    backend.save(str(tmp_path))
    again = {k: v for k, v in backend.train(2, data).items() if "offload" not in k}
    resumed = megatron(make_args(checkpoint))
    resumed.load(str(tmp_path))
    assert values(resumed.train(2, data)) == pytest.approx(values(again), rel=1e-6, abs=1e-9)



@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="TP=2 needs two GPUs")
def test_tp2_equals_tp1(checkpoint, tmp_path):
    """Two processes (nccl, TP=2 with sequence parallelism) against this process's TP=1 backend."""
    seqs, resp = sequences(8, seed=4)
    data = train_data(seqs, resp, [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    tp1 = megatron(make_args(checkpoint))
    expected = tp1.train(0, data)
    expected_weights = tp1.export_weights(None)[0]
    got, weights = run_ranks(checkpoint, tmp_path, data, world=2, tp=2, device="cuda", sequence_parallel=True)
    for key in ("train/pg_loss", "train/entropy_loss", "train/grad_norm"):
        assert got[key] == pytest.approx(expected[key], rel=2e-2, abs=1e-4), (key, got[key], expected[key])
    assert weights.keys() == expected_weights.keys()
    for name, tensor in expected_weights.items():
        assert rel_error(weights[name], tensor) < 1e-2, name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DP=2 needs two GPUs")
def test_dp2_with_overlapped_grad_reduce_equals_one_process(checkpoint, tmp_path):
    """Two processes (nccl, DP=2, the distributed optimizer's reduce-scatter, --overlap-grad-reduce) against
    this process's one-rank backend, over two optimizer steps whose micro-batch counts differ (dynamic
    batches: one per rank in the first step, two in the second). From the second step on every bucket's
    reduction is launched by the last micro-batch's backward."""
    gen = torch.Generator().manual_seed(9)
    seqs = [torch.randint(0, 4000, (n,), generator=gen).tolist() for n in [96] * 4 + [224] * 4]
    resp = [48] * 4 + [112] * 4
    data = train_data(seqs, resp, [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    batching = {"global_batch_size": 4, "use_dynamic_batch_size": True, "max_tokens_per_gpu": 224}
    one = megatron(make_args(checkpoint, **batching))
    expected = one.train(0, data)
    expected_weights = one.export_weights(None)[0]
    got, weights = run_ranks(checkpoint, tmp_path, data, world=2, tp=1, device="cuda", sequence_parallel=False,
                             args_overrides={**batching, "overlap_grad_reduce": True, "probe_overlap": True})
    assert got["grad_reduce_launched_before_step"] == [False, True]
    for key in ("train/pg_loss", "train/grad_norm"):
        assert got[key] == pytest.approx(expected[key], rel=2e-2, abs=1e-4), (key, got[key], expected[key])
    for name, tensor in expected_weights.items():
        assert rel_error(weights[name], tensor) < 1e-2, name

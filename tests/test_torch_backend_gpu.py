"""The torch train backend on CUDA (marker ``gpu``; run on the GPU machine) against plain transformers:
per-token log-probs and the gradients of one backward, with and without Liger's kernels
(``--liger-kernels``), on the same bf16 weights. The reference is HF ``Qwen3ForCausalLM`` with SDPA,
one sequence at a time, log-softmax in fp32: independent of the backend's packing, varlen attention,
fused log-probs and Liger's RoPE / RMSNorm / SwiGLU."""

import pytest
import torch

from .qwen3_gpu_checkpoint import SHAPE, build_checkpoint
from .test_torch_trainer import make_args

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# bf16 forward/backward in differently ordered kernels (packed varlen flash vs SDPA per sequence, Triton
# vs torch norms): per-token log-probs of a 4,000-way distribution differ by rounding only, a few 1e-3
# nats typically; a wrong RoPE, norm or packing boundary moves them by tenths to whole nats. Gradients
# are compared per parameter by relative L2 error (bf16 has 8 mantissa bits: 2^-8 ~ 4e-3 per op).
LOGPROB_MAX_DIFF, LOGPROB_MEAN_DIFF, GRAD_REL = 0.08, 0.01, 0.05


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("qwen3") / "ckpt")


@pytest.fixture
def restore_transformers_qwen3():
    """Liger patches transformers' Qwen3 module for the whole process; undo it so later tests (and the
    reference here) see plain transformers."""
    from transformers.models.qwen3 import modeling_qwen3

    saved = dict(vars(modeling_qwen3))
    yield
    for name, value in saved.items():
        setattr(modeling_qwen3, name, value)


def sequences(count=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seqs, resp = [], []
    for i in range(count):
        prompt, response = 30 + 13 * i, 20 + 9 * ((i * 5) % 7)
        seqs.append(torch.randint(0, SHAPE["vocab_size"], (prompt + response,), generator=gen).tolist())
        resp.append(response)
    return seqs, resp


def reference(checkpoint, seqs, resp):
    """Plain transformers (SDPA), one sequence at a time: response log-probs and d(sum)/d(params)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    out = []
    for seq, r in zip(seqs, resp):
        ids = torch.tensor([seq], device="cuda")
        logits = model(input_ids=ids).logits[0, len(seq) - r - 1:len(seq) - 1].float()
        out.append(torch.log_softmax(logits, -1).gather(1, ids[0, len(seq) - r:, None])[:, 0])
    log_probs = torch.cat(out)
    log_probs.sum().backward()
    return log_probs.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("liger", ["off", "on"])
def test_log_probs_and_gradients_equal_plain_transformers(checkpoint, liger, restore_transformers_qwen3):
    if liger == "on":
        pytest.importorskip("liger_kernel", reason="liger-kernel not installed (plugrl[gpu])")
    from plugrl.plugins.backends.torch.trainer import TorchTrainBackend
    from plugrl.plugins.estimators.grpo import GRPOEstimator

    seqs, resp = sequences()
    ref_lp, ref_grads = reference(checkpoint, seqs, resp)  # before the backend patches anything
    backend = TorchTrainBackend(make_args(checkpoint, device="cuda", liger_kernels=liger, fused_log_probs="always"),
                                estimator=GRPOEstimator(None))
    assert backend.dtype == torch.bfloat16
    assert backend.liger_kernels == (["rope", "rms_norm", "swiglu"] if liger == "on" else [])
    if liger == "on":
        from transformers.models.qwen3 import modeling_qwen3

        assert modeling_qwen3.apply_rotary_pos_emb.__module__.startswith("liger_kernel")
    log_probs, _ = backend._forward_response(backend.model, seqs, resp, with_entropy=False)
    diff = (log_probs.float() - ref_lp).abs()
    assert diff.max() < LOGPROB_MAX_DIFF and diff.mean() < LOGPROB_MEAN_DIFF, (diff.max(), diff.mean())
    log_probs.sum().backward()
    grads = {n: p.grad.float() for n, p in backend.model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, ref in ref_grads.items():
        rel = float((grads[name] - ref).norm() / ref.norm().clamp_min(1e-12))
        assert rel < GRAD_REL, (name, rel)

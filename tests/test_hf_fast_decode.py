"""The ``hf`` engine's fast decode path (slot KV cache, own forward, CUDA graphs) against HF transformers.

CPU tests (fp32, tiny random checkpoints with a larger init so greedy decoding does not collapse into
one repeated token): greedy tokens equal HF ``generate`` run on each prompt alone, for mixed prompt
lengths with rows joining a running batch and leaving it at different times; sampled tokens'
log-probs equal an unpadded teacher-forced HF forward; slots are reused and a draining batch is
compacted without changing any output; weight pushes and memory release/resume take effect. Each
runs with exact shapes (the CPU path) and with the bucketed shapes CUDA graphs replay (padded free
slots and KV positions computed along), so the arithmetic the graphs capture is covered here too.

GPU tests (``-m gpu``) check the CUDA-graph path itself in bf16.
"""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # noqa: E402

from plugrl.plugins.backends.hf.engine import HFRolloutEngine  # noqa: E402
from plugrl.plugins.backends.hf.slot_batch import batch_bucket, kv_bucket  # noqa: E402
from plugrl.plugins.backends.torch.tiny_default import build_tiny_checkpoint  # noqa: E402

INIT = 0.3  # initializer_range: a random tiny model with this init greedily decodes varied tokens
LOGPROB_TOL = 1e-5  # fp32: the engine's forward and HF's differ only in summation order (~1e-7)


def run(coro):
    return asyncio.run(coro)


def prompt_of(i, length):
    return [(7 * i + 3 * j) % 300 + 10 for j in range(length)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("fast") / "tiny", initializer_range=INIT)


@pytest.fixture(scope="module")
def other_ckpt(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("fast") / "other", seed=1, initializer_range=INIT)


def load_ref(path, device="cpu", dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()


@pytest.fixture(scope="module")
def reference(ckpt):
    return load_ref(ckpt)


def hf_greedy(model, prompt, n):
    """HF ``generate`` on the prompt alone (no padding), never stopping early (the engine runs with
    ignore_eos)."""
    model.generation_config.eos_token_id = None  # else generate merges the model's EOS back in
    config = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    ids = torch.tensor([prompt], device=model.device)
    with torch.no_grad():
        out = model.generate(ids, generation_config=config)[0, len(prompt):].tolist()
    assert len(out) == n
    return out


def teacher_forced(model, prompt, response, temperature):
    ids = torch.tensor([prompt + response], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].float()
    lp = torch.log_softmax(logits / temperature, dim=-1)
    return lp.gather(1, torch.tensor(response, device=model.device).unsqueeze(1)).squeeze(1).tolist()


def make_engine(path, *, bucketed=False, layout=None, **kwargs):
    eng = HFRolloutEngine(str(path), device=kwargs.pop("device", "cpu"), seed=0, **kwargs)
    if bucketed:
        eng._scheduler.fast.bucketed = True  # the shapes the CUDA graphs run, eagerly on CPU
    if layout:  # before the first prefill allocates it: the cache layout flash reads, tested with sdpa on CPU
        eng._scheduler.fast.cache.layout = layout
    return eng


# (decode_attention, KV cache layout): the CPU-runnable attentions over both layouts
ATTENTIONS = [("sdpa", None), ("matmul", None), ("sdpa", "token")]


async def waves(engine, first, second, params):
    """``first`` starts as one batch; ``second`` joins it after three decode steps."""
    def gen(prompt, n, extra):
        return engine.generate(prompt, {"max_new_tokens": n, "ignore_eos": True, **params, **extra})

    wave1 = [asyncio.ensure_future(gen(*spec)) for spec in first]
    steps = engine.stats()["decode_steps"]
    while engine.stats()["decode_steps"] < steps + 3:
        await asyncio.sleep(0.002)
    wave2 = await asyncio.gather(*[gen(*spec) for spec in second])
    return await asyncio.gather(*wave1) + wave2


def test_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 33, 129, 256)] == [1, 2, 4, 8, 8, 16, 48, 160, 256]
    assert all(batch_bucket(n) >= n and batch_bucket(batch_bucket(n)) == batch_bucket(n) for n in range(1, 600))
    assert [kv_bucket(n) for n in (1, 256, 257, 512, 2049, 5000)] == [256, 256, 512, 512, 2560, 5120]
    assert all(n <= kv_bucket(n) <= n + max(255, n // 4) for n in range(1, 20000, 7))  # <= 25% over past 1k
    # the engine option kv_bucket sets the smallest bucket: multiples of it up to 4x, then as above
    assert [kv_bucket(n, 64) for n in (1, 64, 65, 257, 300, 512, 513, 5000)] == [64, 64, 128, 320, 320, 512, 640, 5120]
    assert all(n <= kv_bucket(n, 64) <= n + max(63, n // 4) and kv_bucket(n, 64) % 64 == 0 for n in range(1, 5000))


def test_small_kv_buckets_decode_exactly_across_bucket_changes(ckpt, reference):
    """kv_bucket=16 on the bucketed (CUDA-graph) shapes, run eagerly here: rows of 3..23 prompt tokens
    grow past several 16-position buckets while they decode and others join; tokens stay HF's greedy."""
    eng = make_engine(ckpt, bucketed=True, max_batch_size=16, kv_bucket=16)
    try:
        first = [(prompt_of(i, 3 + 5 * i), 26 - 4 * i, {}) for i in range(5)]
        second = [(prompt_of(40 + i, 9 + i), 12, {}) for i in range(3)]
        results = run(waves(eng, first, second, {"temperature": 0}))
        for (prompt, n, _), out in zip(first + second, results):
            assert out["tokens"] == hf_greedy(reference, prompt, n)
        assert eng.decode_info()["kv_length"] % 16 == 0 and eng.decode_info()["kv_length"] < 256
    finally:
        eng.close()


@pytest.mark.parametrize("bad", [0, -16, 1.5, True])
def test_kv_bucket_option_is_checked(ckpt, bad):
    with pytest.raises(ValueError, match="kv_bucket"):
        make_engine(ckpt, kv_bucket=bad)


def test_fast_path_selected_for_qwen3(ckpt):
    eng = make_engine(ckpt)
    try:
        assert eng.decode_path == "slots"  # no CUDA here: no graphs
        assert eng.decode_info()["decode_path"] == "slots"
    finally:
        eng.close()
    off = make_engine(ckpt, fast_decode=False)
    try:
        assert off.decode_path.startswith("hf") and off._scheduler.fast is None
    finally:
        off.close()


@pytest.mark.parametrize("attention,layout", ATTENTIONS)
@pytest.mark.parametrize("bucketed", [False, True])
def test_greedy_equals_hf_generate_with_rows_joining_and_leaving(ckpt, reference, bucketed, attention, layout):
    eng = make_engine(ckpt, bucketed=bucketed, max_batch_size=32, decode_attention=attention, layout=layout)
    try:
        first = [(prompt_of(i, 2 + 3 * i), 30 - 3 * i, {}) for i in range(7)]  # leave at different steps
        second = [(prompt_of(50 + i, 11 - i), 8 + i, {}) for i in range(5)]
        results = run(waves(eng, first, second, {"temperature": 0}))
        for (prompt, n, _), out in zip(first + second, results):
            assert out["tokens"] == hf_greedy(reference, prompt, n)
            # greedy log-probs are at T = 1
            expected = teacher_forced(reference, prompt, out["tokens"], 1.0)
            assert max(abs(a - b) for a, b in zip(expected, out["log_probs"])) < LOGPROB_TOL
        assert eng.stats()["max_rows_per_step"] >= 8  # the second wave really joined the first
    finally:
        eng.close()


@pytest.mark.parametrize("attention,layout", ATTENTIONS)
@pytest.mark.parametrize("bucketed", [False, True])
def test_sampled_log_probs_equal_teacher_forcing(ckpt, reference, bucketed, attention, layout):
    eng = make_engine(ckpt, bucketed=bucketed, decode_attention=attention, layout=layout)
    try:
        extras = [{"temperature": 0.7}, {"temperature": 1.0, "top_p": 0.9}, {"temperature": 1.3, "top_k": 20},
                  {"temperature": 0.9, "min_p": 0.05}, {"temperature": 1.0, "sampling_seed": 5}]
        first = [(prompt_of(i, 3 + 2 * i), 20 - i, extras[i % 5]) for i in range(6)]
        second = [(prompt_of(70 + i, 9 - i), 10, extras[(i + 2) % 5]) for i in range(6)]
        results = run(waves(eng, first, second, {}))
        worst = 0.0
        for (prompt, n, extra), out in zip(first + second, results):
            assert len(out["tokens"]) == len(out["log_probs"]) == n
            expected = teacher_forced(reference, prompt, out["tokens"], extra["temperature"])
            worst = max(worst, max(abs(a - b) for a, b in zip(expected, out["log_probs"])))
        assert worst < LOGPROB_TOL
    finally:
        eng.close()


@pytest.mark.parametrize("attention,layout", ATTENTIONS)
@pytest.mark.parametrize("bucketed", [False, True])
def test_slots_are_reused_and_a_draining_batch_is_compacted(ckpt, reference, bucketed, attention, layout):
    eng = make_engine(ckpt, bucketed=bucketed, max_batch_size=8, decode_attention=attention, layout=layout)
    try:
        # 20 requests through 8 slots; lengths chosen so that low slots finish first and the last
        # rows sit high: the batch drains from 8 rows to 2, which must compact (bucket 8 -> 2).
        specs = [(prompt_of(i, 2 + i % 7), 4 + (i % 8) * 3 + (20 if i >= 18 else 0)) for i in range(20)]

        async def main():
            return await asyncio.gather(*[
                eng.generate(p, {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}) for p, n in specs])

        results = run(main())
        for (prompt, n), out in zip(specs, results):
            assert out["tokens"] == hf_greedy(reference, prompt, n)
        info = eng.decode_info()
        assert info["kv_slots"] == 8  # never more slots than rows in flight: finished slots were reused
        assert info["slot_moves"] > 0
        assert eng.load_stats() == {"num_running": 0, "num_waiting": 0}
    finally:
        eng.close()


def test_decode_attention_option_is_checked(ckpt):
    with pytest.raises(ValueError, match="decode_attention='paged'.*sdpa"):
        make_engine(ckpt, decode_attention="paged")
    with pytest.raises(ValueError, match="'flash' needs CUDA.*use 'sdpa' or 'matmul'"):
        make_engine(ckpt, decode_attention="flash")
    eng = make_engine(ckpt, decode_attention="matmul")
    try:
        assert eng.decode_info()["decode_attention"] == "matmul"
    finally:
        eng.close()


def test_weight_update_takes_effect(ckpt, other_ckpt, reference):
    eng = make_engine(ckpt, bucketed=True)
    try:
        prompt = prompt_of(3, 9)
        greedy = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}
        before = run(eng.generate(prompt, greedy))["tokens"]
        other = load_ref(other_ckpt)
        state = {k: v.clone() for k, v in other.state_dict().items() if k != "lm_head.weight"}  # tied
        eng.update_weights(state, version=7)
        out = run(eng.generate(prompt, greedy))
        assert out["weight_version"] == "7"
        assert out["tokens"] == hf_greedy(other, prompt, 16) != before
        assert out["log_probs"] == pytest.approx(teacher_forced(other, prompt, out["tokens"], 1.0), abs=LOGPROB_TOL)
    finally:
        eng.close()


def test_release_and_resume_drop_and_rebuild_the_cache(ckpt, reference):
    eng = make_engine(ckpt, bucketed=True)
    try:
        prompt = prompt_of(4, 5)
        greedy = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
        first = run(eng.generate(prompt, greedy))["tokens"]
        assert eng.decode_info()["kv_slots"] > 0
        eng.release_memory()
        assert eng.decode_info()["kv_slots"] == 0 and eng.decode_info()["kv_length"] == 0
        eng.resume_memory()
        assert run(eng.generate(prompt, greedy))["tokens"] == first == hf_greedy(reference, prompt, 12)
    finally:
        eng.close()


def _variant_checkpoint(base, path, config_class: str, **overrides):
    """The tiny checkpoint's tokenizer with a random model of another class (Llama, Qwen2, ...)."""
    import transformers

    base_config = json.loads((base / "config.json").read_text())
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
            "eos_token_id", "pad_token_id")
    values = {k: base_config[k] for k in keep if k in base_config}
    values.update(initializer_range=INIT, **overrides)
    config = getattr(transformers, config_class)(**values)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config).eval()
    if path.exists():
        shutil.rmtree(path)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(path)
    return path, model


@pytest.mark.parametrize("config_class,overrides,fast", [
    ("LlamaConfig", {"head_dim": 16}, True),
    ("Qwen2Config", {}, True),  # q/k/v biases, no q/k norms
    # sliding-window layers: not the fast path's attention; the HF path must still be exact
    ("Qwen3Config", {"head_dim": 16, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0}, False),
])
def test_other_architectures(ckpt, tmp_path, config_class, overrides, fast):
    path, model = _variant_checkpoint(ckpt, tmp_path / config_class, config_class, **overrides)
    eng = make_engine(path, bucketed=fast)
    try:
        assert eng.decode_path.startswith("slots") == fast, eng.decode_path
        specs = [(prompt_of(i, 3 + 4 * i), 12) for i in range(4)]

        async def main():
            return await asyncio.gather(*[
                eng.generate(p, {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}) for p, n in specs])

        for (prompt, n), out in zip(specs, run(main())):
            assert out["tokens"] == hf_greedy(model, prompt, n)
            expected = teacher_forced(model, prompt, out["tokens"], 1.0)
            assert max(abs(a - b) for a, b in zip(expected, out["log_probs"])) < LOGPROB_TOL
    finally:
        eng.close()


# ---------------------------------------------------------------------- GPU: the CUDA-graph path


def _greedy_batch(eng, specs):
    async def main():
        return await asyncio.gather(*[
            eng.generate(p, {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}) for p, n in specs])

    return [o["tokens"] for o in run(main())]


GPU_SPECS = [(prompt_of(i, 3 + 5 * i), 40 - 2 * i) for i in range(12)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention", ["sdpa", "matmul", "flash"])
def test_cuda_graphs_greedy_equals_eager_bf16(ckpt, attention):
    """Graph replay vs the same forward run eagerly with the same bucketed shapes: the same kernels on
    the same inputs, so bf16 greedy tokens must be identical (no mismatch allowed). Against HF's own
    bf16 forward the kernels differ (batched GEMM shapes, attention kernels), so rounding may flip a
    near-tie: there every chosen token must be within 0.25 logits of the fp32 reference's best (the
    logits reach ~10 here; bf16 keeps 8 mantissa bits, and the bf16 fast path measured 0.064 on CPU;
    a wrong mask or position misses by whole units)."""
    graphs = make_engine(ckpt, device="cuda", dtype="bfloat16", decode_attention=attention)
    eager = make_engine(ckpt, device="cuda", dtype="bfloat16", cuda_graphs=False, bucketed=True,
                        decode_attention=attention)
    try:
        assert graphs.decode_path == "slots+cuda_graphs" and eager.decode_path == "slots"
        got = _greedy_batch(graphs, GPU_SPECS)
        assert graphs.decode_info()["cuda_graph_captures"] > 0
        assert graphs.decode_info()["graph_error"] is None  # the attention was captured, not run eagerly
        # compile_decode auto = on CUDA: the fused ops ran compiled (Triton) inside the graphs
        assert graphs.decode_info()["fused_ops"] == "compiled" and graphs.decode_info()["compile_error"] is None
        assert got == _greedy_batch(eager, GPU_SPECS)
        ref = load_ref(ckpt, "cuda", torch.float32)
        for (prompt, _), tokens in zip(GPU_SPECS, got):
            ids = torch.tensor([prompt + tokens], device="cuda")
            with torch.no_grad():
                logits = ref(input_ids=ids).logits[0, len(prompt) - 1: -1].float()
            chosen = logits.gather(1, ids[0, len(prompt):, None]).squeeze(1)
            assert (logits.max(dim=1).values - chosen).max().item() < 0.25
    finally:
        graphs.close()
        eager.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_log_probs_fp32(ckpt):
    """fp32 on CUDA through the graphs: sampled tokens' log-probs equal teacher forcing (1e-4: TF32-free
    fp32 kernels, different summation orders)."""
    eng = make_engine(ckpt, device="cuda", dtype="float32")
    ref = load_ref(ckpt, "cuda", torch.float32)
    try:
        assert eng.decode_path == "slots+cuda_graphs"
        specs = [(prompt_of(i, 3 + 2 * i), [0.7, 1.0, 1.2][i % 3], 20 + i) for i in range(8)]

        async def main():
            return await asyncio.gather(*[
                eng.generate(p, {"max_new_tokens": n, "temperature": t, "ignore_eos": True}) for p, t, n in specs])

        for (prompt, temp, n), out in zip(specs, run(main())):
            expected = teacher_forced(ref, prompt, out["tokens"], temp)
            assert max(abs(a - b) for a, b in zip(expected, out["log_probs"])) < 1e-4
    finally:
        eng.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_recaptured_after_release_resume(ckpt):
    eng = make_engine(ckpt, device="cuda", dtype="bfloat16")
    try:
        first = _greedy_batch(eng, GPU_SPECS)
        info = eng.decode_info()
        assert info["cuda_graphs"] > 0 and info["kv_slots"] > 0
        before = torch.cuda.memory_allocated()
        eng.release_memory()
        info = eng.decode_info()
        assert info["cuda_graphs"] == 0 and info["kv_slots"] == 0
        assert torch.cuda.memory_allocated() < before
        eng.resume_memory()
        again = _greedy_batch(eng, GPU_SPECS)
        after = eng.decode_info()
        assert after["cuda_graphs"] > 0 and after["cuda_graph_captures"] > info["cuda_graph_captures"]
        assert again == first  # weights came back bit-exact; the new graphs read them where they are now
    finally:
        eng.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_see_weight_pushes(ckpt, other_ckpt):
    """A push copies into the parameters in place: the captured graphs replay with the new weights
    (no recapture), and generate exactly what an engine loaded with those weights generates."""
    eng = make_engine(ckpt, device="cuda", dtype="bfloat16")
    fresh = make_engine(other_ckpt, device="cuda", dtype="bfloat16")
    try:
        before = _greedy_batch(eng, GPU_SPECS)
        captures = eng.decode_info()["cuda_graph_captures"]
        other = load_ref(other_ckpt)
        eng.update_weights({k: v for k, v in other.state_dict().items() if k != "lm_head.weight"}, version=2)
        after = _greedy_batch(eng, GPU_SPECS)
        assert eng.decode_info()["cuda_graph_captures"] == captures
        assert after != before
        assert after == _greedy_batch(fresh, GPU_SPECS)
    finally:
        eng.close()
        fresh.close()

"""The embedded ``hf`` rollout engine against plain transformers forwards (tiny random Qwen3, CPU).

The log-prob invariant is the important one: what ``generate`` returns as per-token log-probs must be
what the trainer recomputes (teacher forcing, ``log_softmax(logits / T)``) for rows of a mixed,
left-padded, continuously refilled batch, because GRPO uses them as the rollout log-probs.
"""

from __future__ import annotations

import asyncio

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM  # noqa: E402

from plugrl.plugins.backends.hf_engine import HFRolloutEngine  # noqa: E402
from plugrl.plugins.backends.hf_sampling import SamplingParams  # noqa: E402
from plugrl.plugins.backends.tiny_default import build_tiny_checkpoint  # noqa: E402

EOS = 2  # <|im_end|> in the tiny tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("hf_engine") / "tiny")


@pytest.fixture(scope="module")
def engine(ckpt):
    eng = HFRolloutEngine(str(ckpt), device="cpu", max_batch_size=64, seed=0)
    yield eng
    eng.close()


@pytest.fixture
def fresh_engine(ckpt):
    """For tests that change weights or memory state."""
    eng = HFRolloutEngine(str(ckpt), device="cpu", seed=0)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def reference(ckpt):
    return AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()


def run(coro):
    return asyncio.run(coro)


def teacher_forced(model, prompt, response, temperature):
    """Unpadded full forward over prompt + response: log_softmax(logits / T) of each response token."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].float()
    lp = torch.log_softmax(logits / temperature, dim=-1)
    return lp.gather(1, torch.tensor(response).unsqueeze(1)).squeeze(1).tolist()


def prompt_of(i, length):
    return [(7 * i + 3 * j) % 300 + 10 for j in range(length)]


def test_log_probs_equal_teacher_forcing_in_mixed_batch(engine, reference):
    temps = [0.6, 1.0, 1.3, 0.0]
    first = [(prompt_of(i, 2 + i), temps[i % 4], 24 - i) for i in range(8)]
    second = [(prompt_of(100 + i, 15 - i), temps[(i + 1) % 4], 12) for i in range(8)]

    async def main():
        gen = lambda p, t, n: engine.generate(p, {"max_new_tokens": n, "temperature": t, "ignore_eos": True})
        wave1 = [asyncio.ensure_future(gen(*spec)) for spec in first]
        steps = engine.stats()["decode_steps"]
        while engine.stats()["decode_steps"] < steps + 3:  # the second wave joins a running batch
            await asyncio.sleep(0.002)
        wave2 = await asyncio.gather(*[gen(*spec) for spec in second])
        return await asyncio.gather(*wave1) + wave2

    results = run(main())
    worst = 0.0
    for (prompt, temp, n), out in zip(first + second, results):
        assert len(out["tokens"]) == len(out["log_probs"]) == n
        expected = teacher_forced(reference, prompt, out["tokens"], temp if temp > 0 else 1.0)
        worst = max(worst, max(abs(a - b) for a, b in zip(expected, out["log_probs"])))
    assert worst < 1e-5
    assert engine.stats()["max_rows_per_step"] >= 8


def test_the_decode_threads_time_split_fits_in_the_wall_time(fresh_engine):
    """stats() splits the decode thread's time into prefill, and per decode step launch, wait and host
    bookkeeping: each grows with work, and together they cannot exceed the wall time they ran in."""
    import time

    before = fresh_engine.stats()
    start = time.perf_counter()
    async def main():
        return await asyncio.gather(*[fresh_engine.generate(prompt_of(i, 5), {"max_new_tokens": 12, "ignore_eos": True})
                                      for i in range(6)])

    run(main())
    wall = time.perf_counter() - start
    after = fresh_engine.stats()
    spent = {key: after[key] - before[key] for key in ("prefill_s", "decode_launch_s", "decode_wait_s", "decode_host_s")}
    assert after["decode_steps"] - before["decode_steps"] >= 11
    assert all(value > 0 for value in spent.values()), spent
    assert sum(spent.values()) <= wall


def test_greedy_equals_plain_argmax_loop(engine, reference):
    prompt = prompt_of(3, 9)
    out = run(engine.generate(prompt, {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}))
    ids, expected = list(prompt), []
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(reference(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert out["tokens"] == ids[len(prompt):]
    # greedy requests report log-probs at T = 1 (SGLang turns temperature 0 into T=1, top_k=1)
    expected = teacher_forced(reference, prompt, out["tokens"], 1.0)
    assert max(abs(a - b) for a, b in zip(expected, out["log_probs"])) < 1e-5


def test_top_k_1_equals_greedy(engine):
    prompt = prompt_of(5, 6)
    greedy = run(engine.generate(prompt, {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}))
    top1 = run(engine.generate(prompt, {"max_new_tokens": 8, "temperature": 0.7, "top_k": 1, "ignore_eos": True}))
    assert top1["tokens"] == greedy["tokens"]


def test_max_new_tokens_finishes_with_length(engine):
    out = run(engine.generate([11, 12, 13], {"max_new_tokens": 7, "ignore_eos": True}))
    assert out["finish_reason"]["type"] == "length"
    assert len(out["tokens"]) == len(out["log_probs"]) == out["completion_tokens"] == 7
    assert out["prompt_tokens"] == 3 and out["weight_version"] == "default"
    empty = run(engine.generate([11, 12, 13], {"max_new_tokens": 0}))
    assert empty["tokens"] == [] and empty["finish_reason"]["type"] == "length"


def test_eos_stop_keeps_the_eos_token(engine):
    # near-uniform sampling over 384 tokens: EOS shows up in a few of these 128 x 64 draws
    params = {"max_new_tokens": 64, "temperature": 50.0, "no_stop_trim": True, "skip_special_tokens": False}

    async def main():
        return await asyncio.gather(*[engine.generate(prompt_of(i, 4), params) for i in range(128)])

    stopped = [o for o in run(main()) if o["finish_reason"]["type"] == "stop"]
    assert stopped
    for out in stopped:
        assert out["finish_reason"]["matched"] == EOS
        assert out["tokens"][-1] == EOS and EOS not in out["tokens"][:-1]
        assert len(out["log_probs"]) == len(out["tokens"])
        assert out["text"].endswith("<|im_end|>")  # no_stop_trim + skip_special_tokens=False (slime)


def _seeded(engine, prompt, **extra):
    params = {"max_new_tokens": 24, "temperature": 1.0, "sampling_seed": 1234, "ignore_eos": True, **extra}
    return run(engine.generate(prompt, params))


def test_stop_string(engine):
    prompt = prompt_of(9, 5)
    full = _seeded(engine, prompt)
    tok = engine.tokenizer
    stop = tok.decode(full["tokens"][10:12], skip_special_tokens=False)
    # the first k such that the decoded response contains the stop string
    k = next(k for k in range(1, 25) if stop in tok.decode(full["tokens"][:k], skip_special_tokens=False))
    kept = _seeded(engine, prompt, stop=[stop], no_stop_trim=True, skip_special_tokens=False)
    assert kept["finish_reason"] == {"type": "stop", "matched": stop}
    assert kept["tokens"] == full["tokens"][:k] and len(kept["log_probs"]) == k
    assert stop in kept["text"]
    trimmed = _seeded(engine, prompt, stop=stop, skip_special_tokens=False)  # a bare string works too
    assert trimmed["tokens"] == kept["tokens"]  # tokens are never trimmed (output_token_logprobs)
    assert stop not in trimmed["text"] and kept["text"].startswith(trimmed["text"])


def test_stop_token_ids(engine):
    prompt = prompt_of(11, 5)
    full = _seeded(engine, prompt)
    token = full["tokens"][6]
    j = full["tokens"].index(token)
    out = _seeded(engine, prompt, stop_token_ids=[token], ignore_eos=False)
    assert out["finish_reason"] == {"type": "stop", "matched": token}
    assert out["tokens"] == full["tokens"][: j + 1]
    # as in SGLang, ignore_eos also ignores stop_token_ids
    assert _seeded(engine, prompt, stop_token_ids=[token])["tokens"] == full["tokens"]


def test_sampling_seed_is_independent_of_batch(engine):
    prompt = prompt_of(13, 6)
    alone = _seeded(engine, prompt)

    async def crowd():
        others = [engine.generate(prompt_of(i, 3 + i), {"max_new_tokens": 20}) for i in range(10)]
        mine = engine.generate(prompt, {"max_new_tokens": 24, "sampling_seed": 1234, "ignore_eos": True})
        return (await asyncio.gather(mine, *others))[0]

    assert run(crowd())["tokens"] == alone["tokens"]


def test_min_new_tokens_masks_stop_tokens(engine):
    stops = list(range(0, 300))  # most of the vocabulary
    params = {"max_new_tokens": 16, "stop_token_ids": stops, "min_new_tokens": 4, "sampling_seed": 7}
    out = run(engine.generate(prompt_of(1, 4), params))
    assert len(out["tokens"]) >= 4 and all(t >= 300 and t != EOS for t in out["tokens"][:4])


def test_concurrent_requests_are_batched(engine):
    before = engine.stats()

    async def main():
        return await asyncio.gather(*[
            engine.generate(prompt_of(i, 3 + i % 5), {"max_new_tokens": 12, "ignore_eos": True}) for i in range(32)
        ])

    assert all(len(o["tokens"]) == 12 for o in run(main()))
    after = engine.stats()
    steps = after["decode_steps"] - before["decode_steps"]
    assert steps < 32 * 12 // 4, steps
    assert after["generated_tokens"] - before["generated_tokens"] == 32 * 12
    assert after["max_rows_per_step"] >= 16


def test_event_loop_stays_responsive(engine):
    async def main():
        ticks = 0
        task = asyncio.ensure_future(engine.generate([5, 6], {"max_new_tokens": 120, "ignore_eos": True}))
        while not task.done():
            ticks += 1
            await asyncio.sleep(0.001)
        return ticks, await task

    ticks, out = run(main())
    assert len(out["tokens"]) == 120 and ticks >= 5


def test_abort_all_returns_partial_outputs(engine):
    async def main():
        params = {"max_new_tokens": 200, "ignore_eos": True}
        tasks = [asyncio.ensure_future(engine.generate(prompt_of(i, 4), params)) for i in range(4)]
        while engine.load_stats()["num_running"] < 4:
            await asyncio.sleep(0.002)
        start = engine.stats()["decode_steps"]
        while engine.stats()["decode_steps"] < start + 3:
            await asyncio.sleep(0.002)
        await engine.abort_all()
        aborted = await asyncio.gather(*tasks)
        idle = engine.load_stats()
        after = await engine.generate([5, 6, 7], {"max_new_tokens": 5, "ignore_eos": True})
        return aborted, idle, after

    aborted, idle, after = run(main())
    for out in aborted:
        assert out["finish_reason"]["type"] == "abort"
        assert 1 <= len(out["tokens"]) < 200 and len(out["log_probs"]) == len(out["tokens"])
    assert idle == {"num_running": 0, "num_waiting": 0}
    assert after["finish_reason"]["type"] == "length" and len(after["tokens"]) == 5


def test_cancelled_request_leaves_the_batch(engine):
    async def main():
        task = asyncio.ensure_future(engine.generate([5, 6], {"max_new_tokens": 200, "ignore_eos": True}))
        while engine.load_stats()["num_running"] == 0:
            await asyncio.sleep(0.002)
        task.cancel()
        for _ in range(500):
            if engine.load_stats()["num_running"] == 0:
                return True
            await asyncio.sleep(0.005)
        return False

    assert run(main())


def test_update_weights_matches_reference(fresh_engine, tmp_path):
    other = AutoModelForCausalLM.from_pretrained(str(build_tiny_checkpoint(tmp_path / "other", seed=1))).eval()
    state = {k: v.clone() for k, v in other.state_dict().items() if k != "lm_head.weight"}  # tied
    names = sorted(state)
    buckets = [{n: state[n] for n in names[:10]}, [(n, state[n]) for n in names[10:]]]
    fresh_engine.update_weights(buckets, version=3)
    assert fresh_engine.weight_version == "3"
    seqs = [prompt_of(1, 12), prompt_of(2, 7)]
    got = fresh_engine.log_probs_of(seqs, [5, 3], temperature=0.8)
    for seq, n, lps in zip(seqs, [5, 3], got):
        expected = teacher_forced(other, seq[:-n], seq[-n:], 0.8)
        assert max(abs(a - b) for a, b in zip(expected, lps)) < 1e-5
    out = run(fresh_engine.generate([5, 6, 7], {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}))
    assert out["weight_version"] == "3"
    assert out["log_probs"] == pytest.approx(teacher_forced(other, [5, 6, 7], out["tokens"], 1.0), abs=1e-5)


def test_update_weights_rejects_bad_names_and_shapes(fresh_engine):
    before = fresh_engine.log_probs_of([prompt_of(1, 8)], [4])
    good = fresh_engine.model.state_dict()["model.norm.weight"] * 2
    with pytest.raises(ValueError, match="unknown parameter 'model.layers.0.mlp.nope.weight'"):
        fresh_engine.update_weights({"model.norm.weight": good, "model.layers.0.mlp.nope.weight": good}, 1)
    with pytest.raises(ValueError, match=r"shape mismatch for 'model.norm.weight': got \(3,\)"):
        fresh_engine.update_weights([("model.norm.weight", torch.ones(3))], 1)
    with pytest.raises(TypeError):
        fresh_engine.update_weights([("model.norm.weight", [1.0] * 64)], 1)
    assert fresh_engine.weight_version == "default"
    assert fresh_engine.log_probs_of([prompt_of(1, 8)], [4]) == before  # nothing was half-applied


def test_release_and_resume_memory(fresh_engine):
    async def gen():
        return await fresh_engine.generate([5, 6], {"max_new_tokens": 2, "ignore_eos": True})

    fresh_engine.release_memory()
    assert fresh_engine.health()
    with pytest.raises(RuntimeError, match="released"):
        run(gen())
    fresh_engine.resume_memory(["weights"])
    with pytest.raises(RuntimeError, match="kv_cache"):
        run(gen())
    fresh_engine.resume_memory(["kv_cache", "cuda_graph"])
    assert len(run(gen())["tokens"]) == 2
    with pytest.raises(ValueError, match="unknown memory tags"):
        fresh_engine.release_memory(["activations"])

    async def busy():
        task = asyncio.ensure_future(fresh_engine.generate([5, 6], {"max_new_tokens": 200, "ignore_eos": True}))
        while fresh_engine.load_stats()["num_running"] == 0:
            await asyncio.sleep(0.002)
        with pytest.raises(RuntimeError, match="in flight"):
            fresh_engine.release_memory()
        await fresh_engine.abort_all()
        return await task

    assert run(busy())["finish_reason"]["type"] == "abort"
    fresh_engine.release_memory()
    fresh_engine.resume_memory()
    assert len(run(gen())["tokens"]) == 2


def test_release_without_a_weight_copy_needs_a_full_push(fresh_engine):
    """release_memory(keep_weights=False), what the colocated loop asks for when a full push follows
    every resume: nothing of the parameters is kept (on CPU too, so it is testable here; the params are
    cloned first because a checkpoint loaded on CPU may be memory-mapped), the engine refuses to
    generate or score until a push has carried every parameter (a partial one says what is missing),
    and after the full push it generates exactly as before the release."""
    eng = fresh_engine
    with torch.no_grad():
        for param in eng.model.parameters():
            param.data = param.data.clone()
    weights = {name: tensor.clone() for name, tensor in eng.model.state_dict().items()}
    before = eng.log_probs_of([prompt_of(1, 8)], [4])

    eng.release_memory(keep_weights=False)
    assert eng._weights_offload.host_buffer_bytes() < 4096  # buffers only (rotary frequencies), no parameters
    assert all(p.untyped_storage().nbytes() == 0 for p in eng.model.parameters())
    eng.resume_memory()
    assert all(float(p.detach().abs().sum()) == 0.0 for p in eng.model.parameters())  # zero-filled until the push
    with pytest.raises(RuntimeError, match="without a copy"):
        run(eng.generate([5, 6], {"max_new_tokens": 2}))
    with pytest.raises(RuntimeError, match="without a copy"):
        eng.log_probs_of([prompt_of(1, 8)], [4])
    partial = {k: v for k, v in weights.items() if k != "model.norm.weight"}
    with pytest.raises(RuntimeError, match=r"lack 1 parameter\(s\), e.g. \['model.norm.weight'\]"):
        eng.update_weights(partial, 1)
    assert eng.weight_version == "default"  # a refused push does not announce a new version
    with pytest.raises(RuntimeError, match="without a copy"):
        run(eng.generate([5, 6], {"max_new_tokens": 2}))
    eng.update_weights({"model.norm.weight": weights["model.norm.weight"]}, 2)  # the rest, in a second call
    assert eng.weight_version == "2"
    assert eng.log_probs_of([prompt_of(1, 8)], [4]) == before
    assert len(run(eng.generate([5, 6], {"max_new_tokens": 2, "ignore_eos": True}))["tokens"]) == 2
    # the default keeps the weights: no push needed after the resume
    eng.release_memory()
    eng.resume_memory()
    assert eng.log_probs_of([prompt_of(1, 8)], [4]) == before
    # a release with a copy after a drop without a push still knows the weights are gone
    eng.release_memory(keep_weights=False)
    eng.resume_memory()
    eng.release_memory()
    eng.resume_memory()
    with pytest.raises(RuntimeError, match="without a copy"):
        eng.log_probs_of([prompt_of(1, 8)], [4])


def test_release_without_a_copy_of_memory_mapped_cpu_weights_is_a_no_op(fresh_engine):
    """On CPU a checkpoint may be memory-mapped (not resizable): nothing is freed, nothing is lost."""
    before = fresh_engine.log_probs_of([prompt_of(1, 8)], [4])
    if all(p.untyped_storage().resizable() for p in fresh_engine.model.parameters()):
        pytest.skip("this transformers build loaded the checkpoint into owned memory")
    fresh_engine.release_memory(keep_weights=False)
    fresh_engine.resume_memory()
    assert fresh_engine.log_probs_of([prompt_of(1, 8)], [4]) == before


def test_sampling_params_follow_sglang(engine):
    slime_default = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 8, "stop": None,
                     "stop_token_ids": None, "skip_special_tokens": False, "no_stop_trim": True,
                     "spaces_between_special_tokens": False}
    p = SamplingParams.from_dict(slime_default)
    assert p.stop == () and p.stop_token_ids == frozenset() and not p.greedy
    assert SamplingParams.from_dict({"max_new_tokens": 1, "temperature": 0}).effective_temperature == 1.0
    for bad, match in [({}, "max_new_tokens"), ({"max_new_tokens": 4, "bogus": 1}, "bogus"),
                       ({"max_new_tokens": 4, "n": 2}, "'n'"), ({"max_new_tokens": 4, "top_p": 0}, "top_p"),
                       ({"max_new_tokens": 4, "top_k": 0}, "top_k")]:
        with pytest.raises(ValueError, match=match):
            run(engine.generate([5], bad))
    with pytest.raises(ValueError, match="input_ids"):
        run(engine.generate([10**6], {"max_new_tokens": 1}))


def test_same_seed_same_samples(ckpt):
    outs = []
    for _ in range(2):
        eng = HFRolloutEngine(str(ckpt), device="cpu", seed=42)
        outs.append(run(eng.generate([5, 6, 7], {"max_new_tokens": 12, "top_p": 0.9, "ignore_eos": True})))
        eng.close()
    assert outs[0]["tokens"] == outs[1]["tokens"]


def test_update_weights_waits_for_the_decode_step(fresh_engine):
    """A push during generation lands between two decode steps; later tokens report the new version."""
    state = {k: v.clone() for k, v in fresh_engine.model.state_dict().items()}

    async def main():
        task = asyncio.ensure_future(fresh_engine.generate([5, 6], {"max_new_tokens": 150, "ignore_eos": True}))
        while fresh_engine.stats()["decode_steps"] < 5:
            await asyncio.sleep(0.002)
        fresh_engine.update_weights(state, version="v2")  # same values: generation continues unchanged
        return await task

    out = run(main())
    assert len(out["tokens"]) == 150 and out["weight_version"] == "v2"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_engine(ckpt):
    ref = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).cuda().eval()
    eng = HFRolloutEngine(str(ckpt), device="cuda", dtype="float32")
    try:
        specs = [(prompt_of(i, 3 + 2 * i), [0.7, 1.0, 0.0][i % 3], 10 + i) for i in range(6)]

        async def main():
            return await asyncio.gather(*[
                eng.generate(p, {"max_new_tokens": n, "temperature": t, "ignore_eos": True}) for p, t, n in specs
            ])

        for (prompt, temp, n), out in zip(specs, run(main())):
            ids = torch.tensor([prompt + out["tokens"]], device="cuda")
            with torch.no_grad():
                logits = ref(input_ids=ids).logits[0, len(prompt) - 1: -1].float() / (temp or 1.0)
            expected = torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt):].unsqueeze(1)).squeeze(1)
            assert torch.allclose(expected.cpu(), torch.tensor(out["log_probs"]), atol=1e-4)
        scores = eng.log_probs_of([[5, 6, 7, 8, 9]], [3])
        before = torch.cuda.memory_allocated()
        eng.release_memory()
        assert torch.cuda.memory_allocated() < before
        with pytest.raises(RuntimeError, match="released"):
            run(eng.generate([5, 6], {"max_new_tokens": 2}))
        with pytest.raises(RuntimeError, match="resume_memory"):
            eng.update_weights({}, 1)
        eng.resume_memory(["weights"])
        eng.resume_memory(["kv_cache", "cuda_graph"])
        assert next(eng.model.parameters()).is_cuda
        assert eng.log_probs_of([[5, 6, 7, 8, 9]], [3]) == scores  # the weights came back bit-exact
        assert len(run(eng.generate([5, 6], {"max_new_tokens": 3, "ignore_eos": True}))["tokens"]) == 3
    finally:
        eng.close()
    bf16 = HFRolloutEngine(str(ckpt))  # defaults on a GPU machine: cuda + bfloat16
    try:
        assert next(bf16.model.parameters()).dtype == torch.bfloat16
        out = run(bf16.generate([5, 6, 7], {"max_new_tokens": 8, "temperature": 0.8, "ignore_eos": True}))
        assert len(out["log_probs"]) == 8 and all(lp <= 0 for lp in out["log_probs"])
    finally:
        bf16.close()

"""Streamed weight pushes on CPU, without Ray: flat bucket layout and round trip, megatron -> HF
views packed on the device, /dev/shm handles between processes, the trainer-side window of packed
buffers, the engine's strict check before any copy, the transport choice from placement, the
colocated loop's step order and the memory plan's accounting of the moment both models are on the GPU."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from plugrl.core import weight_packing as wp
from plugrl.core.weight_source import WeightSource
from plugrl.core.weight_sync import (
    BROADCAST,
    CUDA_IPC,
    OBJECT_STORE,
    choose_transport,
    expected_transport,
    first_push_steps,
    sync_steps,
)

from .test_megatron_bridge import args as flags
from .test_megatron_bridge import random_hf_state, tiny

# ------------------------------------------------------------------------------- bucket layout


def test_plan_buckets_aligns_offsets_and_bounds_each_bucket():
    entries = [("a", "float32", (3,)), ("b", "bfloat16", (5, 2)), ("c", "float32", (100,)), ("d", "int64", (2,)),
               ("huge", "float32", (1000,)), ("e", "uint8", (1,))]
    buckets = wp.plan_buckets(entries, 512)
    # by hand: a 12 B @0; b 20 B @256 (end 276); c 400 B would end at 512+400 > 512 -> new bucket @0;
    # d 16 B @ 512 > 512? 256*2=512 start -> 528 > 512 -> new bucket; huge 4000 B alone; e 1 B new bucket
    assert [[(t.name, t.offset) for t in b.tensors] for b in buckets] == [
        [("a", 0), ("b", 256)], [("c", 0)], [("d", 0)], [("huge", 0)], [("e", 0)]]
    assert [b.nbytes for b in buckets] == [276, 400, 16, 4000, 1]
    assert [t.name for b in wp.plan_buckets(entries, None) for t in b.tensors] == list("abcd") + ["huge", "e"]
    assert len(wp.plan_buckets(entries, None)) == 1
    assert wp.manifest_entries(buckets) == [(n, d, s) for n, d, s in entries]


def test_plan_buckets_refuses_a_name_twice():
    with pytest.raises(ValueError, match="listed twice"):
        wp.plan_buckets([("a", "float32", (1,)), ("a", "float32", (1,))], None)


def test_pack_unpack_round_trip_mixed_dtypes_and_strided_sources():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 8, generator=g)
    sources = {
        "w": torch.randn(4, 5, generator=g).to(torch.bfloat16),
        "t": base.t(),  # not contiguous: packed through a strided copy
        "s": torch.tensor(3.5),  # 0-d
        "i": torch.arange(7, dtype=torch.int64),
        "conv": torch.randn(3, 3, generator=g),  # fp32 source, travels as bf16
    }
    entries = [("w", "bfloat16", (4, 5)), ("t", "float32", (8, 6)), ("s", "float32", ()), ("i", "int64", (7,)),
               ("conv", "bfloat16", (9,))]  # a different (same-numel) shape: the manifest's wins
    buckets = wp.plan_buckets(entries, 128)
    got = {}
    for bucket in buckets:
        flat = wp.pack(bucket, sources)
        assert flat.dtype == torch.uint8 and flat.numel() == max(1, bucket.nbytes)
        got.update(dict(wp.unpack(bucket, flat)))
    assert torch.equal(got["w"], sources["w"])
    assert torch.equal(got["t"], base.t().contiguous())
    assert got["s"].shape == () and float(got["s"]) == 3.5
    assert torch.equal(got["i"], torch.arange(7))
    assert got["conv"].dtype == torch.bfloat16 and torch.equal(got["conv"], sources["conv"].reshape(9).to(torch.bfloat16))


def test_pack_refuses_a_source_of_another_size():
    bucket = wp.plan_buckets([("a", "float32", (4,))], None)[0]
    with pytest.raises(ValueError, match="'a': source has 5 elements"):
        wp.pack(bucket, {"a": torch.zeros(5)})


@pytest.mark.parametrize("model_type,tied", [("qwen3", False), ("qwen3", True), ("qwen2", False), ("llama", True)])
def test_megatron_hf_views_pack_to_the_hf_state(model_type, tied):
    """The megatron backend's streamed export (views of its fused tensors, packed into buckets)
    gives back exactly the HF state dict the megatron state was made from."""
    from plugrl.plugins.backends.megatron.config_bridge import derive_model_config
    from plugrl.plugins.backends.megatron.weights import hf_shapes, hf_to_megatron, hf_views

    hf = tiny(model_type, tie_word_embeddings=tied)
    hf_state = random_hf_state(hf)
    cfg = derive_model_config(hf, flags(tensor_model_parallel_size=1))
    megatron_state = hf_to_megatron(hf_state, cfg)
    shapes = hf_shapes(cfg)
    named = [(name, view, shapes[name]) for name, view in hf_views(megatron_state, cfg)]
    for _, view, _shape in named:  # views, not copies: they share the megatron storages
        assert any(view.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in megatron_state.values())
    source = WeightSource(named, 4096, dtype=torch.bfloat16)
    got = {}
    for index, bucket in enumerate(source.manifest()):
        got.update({k: v.clone() for k, v in wp.unpack(bucket, source.packed(index))})
    expected = {k: v for k, v in hf_state.items() if not (tied and k == "lm_head.weight")}
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor.to(torch.bfloat16)), name


def test_weight_source_keeps_a_window_of_packed_buffers():
    named = [(f"t{i}", torch.full((64,), float(i))) for i in range(5)]
    source = WeightSource(named, 256)  # 64 fp32 = 256 B: one tensor per bucket
    assert len(source.manifest()) == 5
    for i in range(5):
        flat = source.packed(i)
        assert torch.equal(flat.view(torch.float32), torch.full((64,), float(i)))
        assert len(source._packed) <= 2
    assert sorted(source._packed) == [3, 4]
    source.packed(0)  # evicted: packed again
    assert source.packs == 6
    with pytest.raises(IndexError):
        source.packed(5)
    source.end()
    assert not source._packed and not source.sources


# ------------------------------------------------------------------------------- handles

RECEIVER = """
import sys, pickle, torch
from plugrl.core.weight_handles import open_shared
handle = pickle.loads(sys.stdin.buffer.read())
flat = open_shared(handle)
print(flat.view(torch.float32).sum().item(), flat.numel())
flat.view(torch.float32)[0] = -1.0  # the sender sees it: one memory, no copy
"""


def test_cpu_shm_handle_maps_the_same_memory_in_another_process():
    import pickle

    from plugrl.core.weight_handles import share

    flat = torch.arange(10, dtype=torch.float32).view(torch.uint8)[8:]  # an offset into the storage
    handle = share(flat)
    assert handle["kind"] == "cpu_shm"
    proc = subprocess.run([sys.executable, "-c", RECEIVER], input=pickle.dumps(handle), capture_output=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    total, numel = proc.stdout.decode().split()
    assert float(total) == sum(range(2, 10)) and int(numel) == 32
    assert flat.view(torch.float32)[0].item() == -1.0


def test_unknown_handle_kind_is_refused():
    from plugrl.core.weight_handles import open_shared

    with pytest.raises(ValueError, match="unknown weight handle kind"):
        open_shared({"kind": "carrier-pigeon"})


# ------------------------------------------------------------------------------- the engine side


class _FakeStream:
    """A stream of in-memory buckets with the receiver-facing API of core/weight_stream.py."""

    is_weight_stream = True

    def __init__(self, buckets):
        self.buckets = buckets
        self.refused = None
        self.taken = 0

    def entries(self):
        return [(n, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for b in self.buckets for n, t in b.items()]

    def refuse(self, reason):
        self.refused = reason

    def __iter__(self):
        for bucket in self.buckets:
            self.taken += 1
            yield bucket


def _tiny_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {k: v for k, v in tiny("qwen3", tie_word_embeddings=True).items() if k != "model_type"}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3", **values))


def test_stream_load_copies_every_bucket_in_place():
    from plugrl.plugins.backends.hf.weights import load_named_tensors

    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new = {k: v + 1.0 for k, v in before.items()}
    names = list(new)
    stream = _FakeStream([{n: new[n] for n in names[:5]}, {n: new[n] for n in names[5:]}])
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    assert load_named_tensors(model, stream) == len(names) - 1  # the tied head is checked, not copied twice
    state = model.state_dict()
    assert {k: v.data_ptr() for k, v in state.items()} == pointers  # in place
    for name in names:
        assert torch.equal(state[name], new[name]), name


@pytest.mark.parametrize("bad", ["name", "shape"])
def test_stream_with_a_bad_name_or_shape_is_refused_before_any_copy(bad):
    from plugrl.plugins.backends.hf.weights import load_named_tensors

    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = {k: v + 1.0 for k, v in before.items()}
    wrong = {"model.layers.0.mlp.gate_projj.weight": torch.zeros(96, 64)} if bad == "name" else \
        {"model.norm.weight": torch.zeros(65)}
    stream = _FakeStream([good, wrong])
    with pytest.raises(ValueError, match="unknown parameter" if bad == "name" else "shape mismatch"):
        load_named_tensors(model, stream)
    assert stream.refused and stream.taken == 0  # told the sender; took no bucket
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


# ------------------------------------------------------------------------------- transport choice

GPU0, GPU1 = "GPU-aaaa", "GPU-bbbb"


@pytest.mark.parametrize("use_gpu,trainer,receivers,expected", [
    (False, {"uuid": None, "problem": None}, [{"uuid": None}], OBJECT_STORE),
    (True, {"uuid": GPU0, "problem": None}, [{"uuid": GPU0}], CUDA_IPC),
    (True, {"uuid": GPU0, "problem": None}, [{"uuid": GPU0}, {"uuid": GPU0}], CUDA_IPC),
    (True, {"uuid": GPU0, "problem": None}, [{"uuid": GPU1}], BROADCAST),
    (True, {"uuid": GPU0, "problem": None}, [{"uuid": GPU0}, {"uuid": GPU1}], OBJECT_STORE),  # mixed
    (True, {"uuid": GPU0, "problem": "TP 2"}, [{"uuid": GPU0}], OBJECT_STORE),
    (True, {"uuid": GPU0, "problem": None}, None, OBJECT_STORE),  # launched servers (sglang)
    (True, {"uuid": GPU0, "problem": None}, [{"uuid": None}], OBJECT_STORE),
    (True, {"uuid": None, "problem": None}, [{"uuid": GPU0}], OBJECT_STORE),
])
def test_transport_from_placement(use_gpu, trainer, receivers, expected):
    choice = choose_transport(use_gpu=use_gpu, trainer=trainer, receivers=receivers)
    assert choice.name == expected
    assert choice.reason and choice.name in choice.describe()
    assert (choice.backend == "nccl") == (expected == BROADCAST)


def test_index_alone_never_means_same_gpu():
    """Both actors see their GPU as cuda:0 (Ray's CUDA_VISIBLE_DEVICES): only UUIDs decide."""
    choice = choose_transport(use_gpu=True, trainer={"uuid": GPU0, "index": 0}, receivers=[{"uuid": GPU1, "index": 0}])
    assert choice.name == BROADCAST


def _run_args(**overrides):
    values = {"actor_num_nodes": 1, "actor_num_gpus_per_node": 1, "rollout_num_gpus": None,
              "rollout_num_gpus_per_engine": 1, "rollout_backend": "hf", "train_backend": "megatron",
              "tensor_model_parallel_size": 1}
    return SimpleNamespace(**{**values, **overrides})


def test_expected_transport_from_the_config():
    assert expected_transport(_run_args(), colocated=True) == CUDA_IPC  # the 4B recipe on one GPU
    assert expected_transport(_run_args(), colocated=True, on_gpu=False) == OBJECT_STORE
    assert expected_transport(_run_args(tensor_model_parallel_size=2), colocated=True) == OBJECT_STORE
    assert expected_transport(_run_args(actor_num_gpus_per_node=8), colocated=True) == OBJECT_STORE  # mixed
    assert expected_transport(_run_args(actor_num_gpus_per_node=8, rollout_num_gpus_per_engine=8),
                              colocated=True) == CUDA_IPC
    assert expected_transport(_run_args(rollout_num_gpus=1), colocated=False) == BROADCAST
    assert expected_transport(_run_args(rollout_backend="sglang"), colocated=True) == OBJECT_STORE


# ------------------------------------------------------------------------------- loop order


def test_colocated_streamed_push_runs_before_the_trainer_offloads():
    steps = sync_steps(colocated=True, offload_train=True, offload_rollout=True, streams=True, pushing=True)
    assert steps == ["trim_train", "resume_weights", "push", "offload_train", "resume_kv"]
    assert first_push_steps(colocated=True, offload_train=True, streams=True) == ["push", "offload_train"]


def test_object_store_push_keeps_slimes_order():
    steps = sync_steps(colocated=True, offload_train=True, offload_rollout=True, streams=False, pushing=True)
    assert steps == ["offload_train", "resume_weights", "push", "resume_kv"]
    assert first_push_steps(colocated=True, offload_train=True, streams=False) == ["offload_train", "push"]


def test_no_push_due_or_not_colocated():
    assert sync_steps(colocated=True, offload_train=True, offload_rollout=True, streams=True, pushing=False) == \
        ["trim_train", "resume_weights", "offload_train", "resume_kv"]
    assert sync_steps(colocated=False, offload_train=True, offload_rollout=True, streams=True, pushing=True) == ["push"]
    assert sync_steps(colocated=True, offload_train=False, offload_rollout=False, streams=True, pushing=True) == ["push"]
    assert sync_steps(colocated=True, offload_train=True, offload_rollout=False, streams=True, pushing=True) == \
        ["trim_train", "push", "offload_train"]
    assert first_push_steps(colocated=False, offload_train=True, streams=False) == ["push"]


# ------------------------------------------------------------------------------- memory plan


def test_memory_plan_counts_the_buckets_when_both_models_are_resident(tmp_path):
    import json

    from plugrl.core.memory_plan import GIB, plan_memory

    from .test_megatron_bridge import QWEN3_4B

    (tmp_path / "config.json").write_text(json.dumps(QWEN3_4B))
    base = dict(hf_checkpoint=str(tmp_path), offload_train=True, offload_rollout=True, bf16=True,
                update_weight_buffer_size=512 << 20, use_kl_loss=False, kl_coef=0.0, num_gpus_per_node=8)
    streamed = plan_memory(_run_args(**base), colocated=True, node_bytes=1 << 40)
    object_store = plan_memory(_run_args(**base, tensor_model_parallel_size=2, actor_num_gpus_per_node=2),
                               colocated=True, node_bytes=1 << 40)
    assert streamed.weight_transport == CUDA_IPC and object_store.weight_transport == OBJECT_STORE
    gpu = dict((what.split(" (")[0], gib) for what, gib in streamed.gpu_items)
    # two buckets: the larger of the buffer size and the 4B embedding (151936 x 2560 bf16 = 742 MiB)
    assert gpu["2 weight buckets in flight"] == pytest.approx(2 * 151936 * 2560 * 2 / GIB)
    assert any("engine weights on the same GPU" in what for what, _ in streamed.gpu_items)
    assert not any("object store" in what for what, _ in streamed.host_items)  # no host export
    assert any("object store" in what for what, _ in object_store.host_items)
    assert not any("buckets in flight" in what for what, _ in object_store.gpu_items)


def test_weight_transport_flag_overrides_the_prediction():
    assert expected_transport(_run_args(weight_transport="object_store"), colocated=True) == OBJECT_STORE
    assert expected_transport(_run_args(weight_transport="broadcast"), colocated=False, on_gpu=False) == BROADCAST
    assert expected_transport(_run_args(weight_transport="auto"), colocated=True) == CUDA_IPC


@pytest.mark.parametrize("argv, refusal", [
    (["--weight-transport", "cuda_ipc", "--device", "cpu"], "--weight-transport cuda_ipc: CUDA IPC needs a GPU"),
    (["--weight-transport", "broadcast"], "--weight-transport broadcast: broadcast needs the engines on other GPUs"),
    (["--weight-transport", "cuda_ipc", "--device", "cuda", "--actor-num-gpus-per-node", "2"],
     "CUDA IPC reaches only the engine on train rank 0's GPU; this run starts 2 engines"),
    (["--weight-transport", "cuda_ipc", "--device", "cuda", "--no-colocate", "--rollout-num-gpus", "1"],
     "CUDA IPC needs the engines on the trainer's GPU; this placement is decoupled"),
    (["--weight-transport", "broadcast", "--rollout-backend", "sglang"], "launches its engines itself"),
])
def test_a_forced_transport_that_cannot_work_is_refused_on_the_driver(argv, refusal):
    from plugrl.core.config import config_problems, parse_config
    from plugrl.core.plugins import make_plugin_manager

    plugin_set = make_plugin_manager(entry_points=False)
    args = parse_config(["--recipe", "tiny-default", *argv], plugin_set)
    found = config_problems(args, plugin_set)
    assert any(refusal in p for p in found), found
    fine = parse_config(["--recipe", "tiny-default", "--weight-transport", "object_store"], plugin_set)
    assert not [p for p in config_problems(fine, plugin_set) if "--weight-transport" in p]

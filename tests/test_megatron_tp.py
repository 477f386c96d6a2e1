"""TP=2 against a REAL megatron-core: two CPU processes (gloo) each build their TP rank's GPTModel,
check its state-dict shapes against ours, load our shard and run forward; the gathered logits must
equal the HF model's. This checks the per-group QKV split, the per-rank [gate; up] fc1 layout, the
row-parallel projections and the vocab-parallel embedding/output under real tensor parallelism."""

import json
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core not installed (plugrl[megatron])")

from plugrl.plugins.backends.megatron.config_bridge import derive_model_config
from plugrl.plugins.backends.megatron.weights import hf_to_megatron

TINY = {
    "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "vocab_size": 317,
    "max_position_embeddings": 128, "hidden_act": "silu",
}

# Runs in each TP rank's process. Same CPU workarounds as test_megatron_model.py's cpu_forward.
WORKER = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
import torch, torch.distributed as dist
rank, world, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.cuda.current_device = lambda: "cpu"
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import initialize_rng_tracker
from plugrl.plugins.backends.megatron.config_bridge import MegatronModelConfig, build_gpt_model
parallel_state.initialize_model_parallel(world, 1)
initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
for case in json.load(open(f"{workdir}/cases.json")):
    cfg = MegatronModelConfig.from_dict(json.load(open(f"{workdir}/{case}/cfg.json")))
    model = build_gpt_model(cfg, use_cpu_initialization=True).eval()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    missing, unexpected = model.load_state_dict(torch.load(f"{workdir}/{case}/shard{rank}.pt"), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    ids = torch.load(f"{workdir}/{case}/ids.pt")
    seq = ids.shape[1]
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=torch.arange(seq)[None], attention_mask=mask)
    torch.save(logits, f"{workdir}/{case}/logits{rank}.pt")  # this rank's vocab slice (parallel_output=True)
    json.dump(shapes, open(f"{workdir}/{case}/shapes{rank}.json", "w"))
parallel_state.destroy_model_parallel()
dist.destroy_process_group()
"""


CASES = ("qwen3", "qwen2")  # Qwen3: q/k norms; Qwen2: sharded QKV bias. One process pair runs both.


def prepare_case(workdir, model_type, tp):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, tie_word_embeddings=False, **TINY)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random norms and biases too: HF's ones/zeros would hide swaps
        for name, param in model.named_parameters():
            param.copy_(1 + 0.2 * torch.randn_like(param) if "norm" in name else 0.2 * torch.randn_like(param))
    cfg = derive_model_config(config, SimpleNamespace(tensor_model_parallel_size=tp))
    workdir.mkdir()
    (workdir / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    shards = [hf_to_megatron(model.state_dict(), cfg, tp_size=tp, tp_rank=r) for r in range(tp)]
    for rank, shard in enumerate(shards):
        torch.save(shard, workdir / f"shard{rank}.pt")
    ids = torch.randint(0, config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.save(ids, workdir / "ids.pt")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    return cfg, shards, expected


def test_tp2_shards_load_and_reproduce_hf_logits(tmp_path):
    tp = 2
    cases = {name: prepare_case(tmp_path / name, name, tp) for name in CASES}
    (tmp_path / "cases.json").write_text(json.dumps(list(CASES)))
    (tmp_path / "worker.py").write_text(WORKER)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(r), str(tp), port, str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(tp)]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]

    for name, (cfg, shards, expected) in cases.items():
        workdir = tmp_path / name
        for rank, shard in enumerate(shards):
            real = json.loads((workdir / f"shapes{rank}.json").read_text())
            assert {k: list(v.shape) for k, v in shard.items()} == real, (name, rank)
        logits = torch.cat([torch.load(workdir / f"logits{r}.pt") for r in range(tp)], dim=-1)[..., : cfg.vocab_size]
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")

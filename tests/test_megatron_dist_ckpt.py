"""torch_dist checkpoints of a REAL megatron-core GPTModel on CPU (dist_ckpt.py): what is saved from the
converter's model (plain local spec) loads into the train backend's model (packed attention, fp32
norms), at another dtype and at another TP size (TP=1 -> TP=2 -> TP=1 over two gloo processes); every
loaded tensor must equal the HF model's, mapped by weights.hf_to_megatron, and TP=2 logits the HF's."""

import json
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core not installed (plugrl[megatron])")

from plugrl.plugins.backends.megatron.config_bridge import (
    build_gpt_model,
    derive_model_config,
)
from plugrl.plugins.backends.megatron.dist_ckpt import (
    checkpoint_dir,
    is_torch_dist,
    load_torch_dist,
    save_torch_dist,
    single_process_world,
)
from plugrl.plugins.backends.megatron.weights import hf_to_megatron

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")
TINY = {
    "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "vocab_size": 317,
    "max_position_embeddings": 128, "hidden_act": "silu",
}


@pytest.fixture(scope="module")
def world():
    with single_process_world():
        yield


def hf_model(tied: bool = False, seed: int = 4):
    """A random Qwen3 whose norms are random too (HF's ones would hide swapped norms)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3", tie_word_embeddings=tied, **TINY)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
    return config, model


def saved_model(cfg, hf_state, directory, dtype=torch.float32):
    """What the converter does: the plain local-spec TP=1 model holding the mapped HF weights, saved."""
    model = build_gpt_model(cfg, use_cpu_initialization=True, params_dtype=dtype)
    missing, unexpected = model.load_state_dict(hf_to_megatron(hf_state, cfg), strict=False)
    assert not unexpected and all(key.endswith("_extra_state") for key in missing)
    return save_torch_dist(model, directory)


def backend_model(cfg):
    """The train backend's model: local spec with packed attention and fp32-compute norms (CPU: fp32)."""
    from plugrl.plugins.backends.megatron.attention import (
        local_spec_with_packed_attention,
    )

    spec = local_spec_with_packed_attention(cfg.qk_layernorm, cfg.normalization, "sdpa", cfg.num_layers)
    return build_gpt_model(cfg, layer_spec=spec, use_cpu_initialization=True)


def assert_state_equals(model, expected):
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert state[name].dtype == torch.float32 and torch.equal(state[name], tensor.float()), name


def sharded_keys(model):
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    return sorted(v.key for v in nested_values(model.sharded_state_dict()) if hasattr(v, "key"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_saved_checkpoint_loads_into_the_backend_model(world, tmp_path, dtype):
    config, model = hf_model()
    cfg = derive_model_config(config)
    hf_state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    saved_model(cfg, hf_state, tmp_path / "ckpt", dtype)
    metadata = json.loads((tmp_path / "ckpt" / "metadata.json").read_text())
    assert metadata["sharded_backend"] == "torch_dist" and is_torch_dist(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / ".metadata").exists() and list((tmp_path / "ckpt").glob("__*.distcp"))

    target = backend_model(cfg)
    assert sharded_keys(target) == sharded_keys(build_gpt_model(cfg, use_cpu_initialization=True))
    assert load_torch_dist(target, tmp_path / "ckpt") == tmp_path / "ckpt"
    assert_state_equals(target, hf_to_megatron(hf_state, cfg))


def test_load_refuses_a_different_architecture(world, tmp_path):
    config, model = hf_model(tied=False)
    saved_model(derive_model_config(config), model.state_dict(), tmp_path / "untied")
    tied_config, _ = hf_model(tied=True)
    with pytest.raises(ValueError, match=r"untied: .*not in the model: \['output_layer.weight'\]"):
        load_torch_dist(build_gpt_model(derive_model_config(tied_config), use_cpu_initialization=True),
                        tmp_path / "untied")
    wider = derive_model_config({**config.to_dict(), "intermediate_size": 128})
    with pytest.raises(ValueError, match="does not fit the model"):
        load_torch_dist(build_gpt_model(wider, use_cpu_initialization=True), tmp_path / "untied")


def test_paths_errors_and_megatron_lm_roots(world, tmp_path):
    config, model = hf_model()
    model_cfg = derive_model_config(config)
    with pytest.raises(FileNotFoundError, match="is not a torch_dist checkpoint: no .*metadata.json"):
        load_torch_dist(build_gpt_model(model_cfg, use_cpu_initialization=True), tmp_path)
    assert not is_torch_dist(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    assert not is_torch_dist(tmp_path / "other")

    # A Megatron-LM save root: the tracker names the iteration directory.
    root = tmp_path / "root"
    saved_model(model_cfg, model.state_dict(), root / "iter_0000020")
    (root / "latest_checkpointed_iteration.txt").write_text("20\n")
    assert checkpoint_dir(root) == root / "iter_0000020" and is_torch_dist(root)
    target = backend_model(model_cfg)
    assert load_torch_dist(target, root) == root / "iter_0000020"
    assert_state_equals(target, hf_to_megatron(model.state_dict(), model_cfg))
    with pytest.raises(FileExistsError, match="iter_0000020 is not empty"):
        save_torch_dist(target, root / "iter_0000020")


# One TP=2 rank: load the TP=1 checkpoint, record its shard and logits, save a TP=2 checkpoint.
WORKER = r"""
import sys, warnings
warnings.simplefilter("ignore")
import torch, torch.distributed as dist
rank, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.cuda.current_device = lambda: "cpu"  # RoPE's inv_freq device (as in test_megatron_tp.py)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import initialize_rng_tracker
from plugrl.plugins.backends.megatron.config_bridge import MegatronModelConfig, build_gpt_model
from plugrl.plugins.backends.megatron.dist_ckpt import load_torch_dist, save_torch_dist
import json
parallel_state.initialize_model_parallel(2, 1)
initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
cfg = MegatronModelConfig.from_dict(json.load(open(f"{workdir}/cfg_tp2.json")))
model = build_gpt_model(cfg, use_cpu_initialization=True).eval()
load_torch_dist(model, f"{workdir}/tp1")
torch.save({k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}, f"{workdir}/shard{rank}.pt")
ids = torch.load(f"{workdir}/ids.pt")
seq = ids.shape[1]
mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
with torch.no_grad():
    torch.save(model(input_ids=ids, position_ids=torch.arange(seq)[None], attention_mask=mask), f"{workdir}/logits{rank}.pt")
save_torch_dist(model, f"{workdir}/tp2")
parallel_state.destroy_model_parallel()
dist.destroy_process_group()
"""


def test_tp1_checkpoint_loads_at_tp2_and_back(world, tmp_path):
    config, model = hf_model(seed=5)
    hf_state = model.state_dict()
    cfg1 = derive_model_config(config)
    cfg2 = derive_model_config(config, SimpleNamespace(tensor_model_parallel_size=2))
    assert cfg1.padded_vocab_size != cfg2.padded_vocab_size  # 384 vs 512: megatron re-pads on load
    saved_model(cfg1, hf_state, tmp_path / "tp1")
    (tmp_path / "cfg_tp2.json").write_text(json.dumps(cfg2.to_dict()))
    ids = torch.randint(0, config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "worker.py").write_text(WORKER)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(r), port, str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]

    for rank in range(2):  # padding rows included: zeros in the mapping, zero-filled by the load
        expected = hf_to_megatron(hf_state, cfg2, tp_size=2, tp_rank=rank)
        shard = torch.load(tmp_path / f"shard{rank}.pt")
        assert shard.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(shard[name], tensor), (rank, name)
    logits = torch.cat([torch.load(tmp_path / f"logits{r}.pt") for r in range(2)], dim=-1)[..., : config.vocab_size]
    with torch.no_grad():
        torch.testing.assert_close(logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)

    # The TP=2 checkpoint (vocabulary padded to 512) back into one TP=1 model (384)
    target = backend_model(cfg1)
    load_torch_dist(target, tmp_path / "tp2")
    assert_state_equals(target, hf_to_megatron(hf_state, cfg1))

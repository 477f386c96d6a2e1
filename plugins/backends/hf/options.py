"""The ``hf`` rollout engine's own flags (``--rollout-backend hf``, the default); the rollout manager
hands them to ``HFRolloutEngine`` (and through an engine pool to every engine actor) as engine
options (``engine_options``). Giving one selects the hf engine. Unset flags keep the engine's defaults.
"""

from __future__ import annotations

from plugrl.core import hookimpl

ON_OFF = {"on": True, "off": False}
# flag dest -> engine option, and how the flag's word becomes the option's value
_FLAG_TO_OPTION = {
    "hf_decode_attention": ("decode_attention", str),
    "hf_compile_decode": ("compile_decode", lambda word: "auto" if word == "auto" else ON_OFF[word]),
    "hf_cuda_graphs": ("cuda_graphs", ON_OFF.__getitem__),
    "hf_fast_decode": ("fast_decode", ON_OFF.__getitem__),
    "hf_max_prefill_tokens": ("max_prefill_tokens", int),
    "hf_kv_bucket": ("kv_bucket", int),
}


@hookimpl
def plugrl_add_options(parser):
    g = parser.add_plugin_group("hf engine", "Owned by --rollout-backend hf (the embedded rollout engine).",
                                kind="rollout_backend", name="hf")
    g.add_argument(
        "--hf-decode-attention", choices=("sdpa", "matmul", "flash"), default=None,
        help="attention of the engine's fast decode path over its slot KV cache "
             "(plugins/backends/hf/decode_attention.py): 'sdpa' (default), 'matmul', or 'flash' (CUDA, bf16/fp16)",
    )
    g.add_argument(
        "--hf-compile-decode", choices=("auto", "on", "off"), default=None,
        help="the fast path's norms, RoPE, residual adds and SiLU as torch.compile'd fused kernels "
             "(plugins/backends/hf/fused_decode_ops.py): 'auto' (default) on CUDA, 'on' everywhere (CPU needs a "
             "C++ compiler), 'off' runs them eagerly; a failed compile falls back to eager with a warning",
    )
    g.add_argument(
        "--hf-cuda-graphs", choices=("on", "off"), default=None,
        help="replay the fast path's decode steps as CUDA graphs (default on; CUDA only)",
    )
    g.add_argument(
        "--hf-fast-decode", choices=("on", "off"), default=None,
        help="decode Llama-family models (Qwen2/3, Llama) through the engine's own forward over a "
             "preallocated slot KV cache (default on); 'off' decodes through transformers' forward",
    )
    g.add_argument(
        "--hf-max-prefill-tokens", type=int, default=None, metavar="N",
        help="padded prompt tokens per prefill forward (default 16384); lower it when prefill runs out of memory",
    )
    g.add_argument(
        "--hf-kv-bucket", type=int, default=None, metavar="N",
        help="the fast path's smallest KV-length bucket (default 256): each decode step attends over the "
             "longest row's length rounded up to it (coarser past 4N), one CUDA graph per bucket; smaller "
             "reads less of the KV cache per step and captures more graphs",
    )


def engine_options(config) -> dict:
    """The engine options that the flags given in ``config`` (the engine's view of the run config) set."""
    options = {}
    for dest, (option, convert) in _FLAG_TO_OPTION.items():
        value = getattr(config, dest, None)
        if value is not None:
            options[option] = convert(value)
    return options


def backend_problems(config) -> list[str]:
    """The hf engine's config check, on the driver (``--dry-run`` too)."""
    problems = []
    tokens = getattr(config, "hf_max_prefill_tokens", None)
    if tokens is not None and tokens < 1:
        problems.append(f"--hf-max-prefill-tokens {tokens}: must be >= 1")
    bucket = getattr(config, "hf_kv_bucket", None)
    if bucket is not None and bucket < 1:
        problems.append(f"--hf-kv-bucket {bucket}: must be >= 1 (positions; the default is 256)")
    per_engine = getattr(config, "rollout_num_gpus_per_engine", None)
    if per_engine is not None and per_engine > 1:
        # one engine per engine bundle runs on its first GPU: the others would generate nothing
        problems.append(f"--rollout-num-gpus-per-engine {per_engine}: the hf engine runs on one GPU (no tensor "
                        "parallelism); pass --rollout-num-gpus-per-engine 1 for one engine per rollout GPU")
    on_cpu = getattr(config, "device", None) == "cpu"
    if on_cpu and getattr(config, "hf_decode_attention", None) == "flash":
        problems.append("--hf-decode-attention flash needs a CUDA device (--device cpu given); use sdpa or matmul")
    if on_cpu and getattr(config, "hf_cuda_graphs", None) == "on":
        problems.append("--hf-cuda-graphs on needs a CUDA device (--device cpu given); leave it unset or off")
    if getattr(config, "hf_fast_decode", None) == "off":
        given = [f"--{dest.replace('_', '-')}" for dest in ("hf_decode_attention", "hf_compile_decode", "hf_cuda_graphs",
                                                             "hf_kv_bucket")
                 if getattr(config, dest, None) is not None]
        if given:
            problems.append(f"{', '.join(given)} set the fast decode path, which --hf-fast-decode off turns off; "
                            "drop one or the other")
    return problems

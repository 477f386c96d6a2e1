"""SGLang's own code, run against what plugrl sends. SGLang cannot be imported here (its package
``__init__`` needs CUDA-era dependencies), so single modules and functions are loaded from the
installed ``sglang`` wheel's source (``pip install --no-deps sglang==0.5.15.post1``) without running
that ``__init__``; the tests skip when no SGLang source is installed. The loaders are shared with
the other ``test_sglang_*`` files."""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest


def sglang_root() -> Path | None:
    """The installed ``sglang`` package directory, found without importing it."""
    try:
        spec = importlib.util.find_spec("sglang")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    return root if (root / "srt" / "utils" / "common.py").is_file() else None


def require_sglang() -> Path:
    root = sglang_root()
    if root is None:
        pytest.skip("SGLang's source is not installed (pip install --no-deps sglang==0.5.15.post1)")
    return root


@contextlib.contextmanager
def _packages(root: Path, stubs: dict[str, types.ModuleType]):
    """Empty ``sglang``/``sglang.srt``/... packages (their __init__ is not run) plus ``stubs``, for
    the duration; sys.modules is restored afterwards so other tests see no half-imported sglang."""
    saved = {k: v for k, v in sys.modules.items() if k == "sglang" or k.startswith("sglang.")}
    for name in saved:
        del sys.modules[name]
    try:
        for name in ("sglang", "sglang.srt", "sglang.srt.utils", "sglang.srt.managers",
                     "sglang.srt.managers.scheduler_components", "sglang.srt.disaggregation",
                     "sglang.srt.weight_sync"):
            package = types.ModuleType(name)
            package.__path__ = [str(root.parent / name.replace(".", "/"))]
            sys.modules[name] = package
        sys.modules.update(stubs)
        yield
    finally:
        for name in [k for k in sys.modules if k == "sglang" or k.startswith("sglang.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def sglang_module(name: str, stubs: dict[str, types.ModuleType] | None = None) -> types.ModuleType:
    """Import SGLang module ``name`` from its source, with ``stubs`` standing in for modules whose
    imports need GPUs or missing dependencies."""
    root = require_sglang()
    with _packages(root, stubs or {}):
        return importlib.import_module(name)


def sglang_definitions(relpath: str, names: list[str], namespace: dict) -> dict:
    """Execute the top-level definitions ``names`` (functions, classes) of SGLang's file
    ``relpath`` (under ``sglang/``) in ``namespace``: SGLang's code, without the file's imports."""
    root = require_sglang()
    tree = ast.parse((root / relpath).read_text())
    nodes = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]
    missing = set(names) - {n.name for n in nodes}
    assert not missing, f"{relpath} no longer defines {sorted(missing)}: re-check plugrl against this SGLang"
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(root / relpath), "exec"), namespace)  # noqa: S102
    return namespace


def sglang_serializer():
    """SGLang's ``MultiprocessingSerializer`` and ``SafeUnpickler`` (utils/common.py)."""
    import base64
    import io
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (torch's reductions, as SGLang's process has them)

    pybase64 = types.SimpleNamespace(b64encode=base64.b64encode, b64decode=base64.b64decode)  # same API
    ns = sglang_definitions("srt/utils/common.py", ["SafeUnpickler", "MultiprocessingSerializer"],
                            {"pickle": pickle, "io": io, "ForkingPickler": ForkingPickler, "pybase64": pybase64,
                             "__name__": "sglang.srt.utils.common"})
    return ns["MultiprocessingSerializer"]


def test_sglangs_decoder_rebuilds_plugrls_flattened_buckets():
    """What an SGLang TP worker does with each ``serialized_named_tensors`` entry (tp_worker.py picks
    entry ``tp_rank``; model_runner.py ``_update_weights_from_flattened_bucket``): deserialize with
    ``SafeUnpickler``, rebuild with ``FlattenedTensorBucket``. Every rank's entry must give back the
    sent tensors bit for bit."""
    torch = pytest.importorskip("torch")
    from plugrl.plugins.backends.sglang import wire

    serializer = sglang_serializer()
    bucket_module = sglang_module("sglang.srt.weight_sync.tensor_bucket")
    g = torch.Generator().manual_seed(0)
    sent = [("a.weight", torch.randn(3, 5, generator=g).to(torch.bfloat16)), ("b.bias", torch.randn(7, generator=g)),
            ("c.weight", torch.randn(4, 2, generator=g).to(torch.bfloat16)), ("d.idx", torch.arange(6).reshape(2, 3))]
    shared = wire.SharedBucket(sent)
    try:
        received = {}
        for part in shared.parts:
            entries = shared.entries(part, 2)  # an engine of two TP ranks
            assert len(entries) == 2
            for tp_rank, entry in enumerate(entries):
                obj = serializer.deserialize(entry)
                bucket = bucket_module.FlattenedTensorBucket(flattened_tensor=obj["flattened_tensor"],
                                                             metadata=obj["metadata"])
                for name, tensor in bucket.reconstruct_tensors():
                    received.setdefault(name, []).append(tensor.clone())
                del obj, bucket
    finally:
        shared.release()
    for name, tensor in sent:
        assert len(received[name]) == 2, name
        for got in received[name]:
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), name


def test_sglangs_unpickler_refuses_what_plugrls_refuses():
    """plugrl serve's payload unpickler is at least as strict as SGLang's for a foreign callable."""
    import base64
    import os
    import pickle

    from plugrl.plugins.backends.sglang import wire

    serializer = sglang_serializer()
    entry = base64.b64encode(pickle.dumps({"flattened_tensor": os.system, "metadata": []})).decode()
    with pytest.raises(RuntimeError, match="Blocked unsafe (class loading|global)"):  # SGLang's refusal (0.5.15 | 0.5.23)
        serializer.deserialize(entry)
    with pytest.raises(pickle.UnpicklingError, match="refused to unpickle"):
        wire.deserialize(entry)

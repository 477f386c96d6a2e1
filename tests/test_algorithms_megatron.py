"""The megatron backend (CPU, one process) runs CISPO, Dr.GRPO and rejection sampling exactly as the
torch backend does: two optimizer steps at a real learning rate (so the second step's ratios are not
1), same metrics and same updated weights. Both backends share ``core/rl_step.py``; this checks the
megatron path hands it the same things."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core not installed (plugrl[megatron])")

from plugrl.plugins.backends.torch_trainer import TorchTrainBackend  # noqa: E402
from plugrl.plugins.estimators.cispo import CISPOEstimator  # noqa: E402
from plugrl.plugins.estimators.dr_grpo import DrGRPOEstimator  # noqa: E402
from plugrl.plugins.estimators.grpo import GRPOEstimator  # noqa: E402

from .test_algorithms_backend import checkpoint, make_args, make_data  # noqa: E402,F401
from .test_megatron_gpu import one_process_world  # noqa: E402,F401  (autouse: tears the world of one down)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")

REWARDS = [1.0, -1.0, 0.5, -0.5, 0.25, -0.25]
CASES = {
    "cispo": (CISPOEstimator, dict(eps_clip=1.0, eps_clip_high=0.01)),  # tight: the 2nd step's weights clip
    "dr_grpo": (DrGRPOEstimator, {}),
    "rs_token": (GRPOEstimator, dict(use_tis=True, use_rs=True, rs_lower_bound=0.9, rs_upper_bound=1.1)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_megatron_step_equals_the_torch_backend(checkpoint, name):  # noqa: F811
    from plugrl.plugins.backends.megatron.backend import MegatronTrainBackend

    estimator_cls, flags = CASES[name]
    args = make_args(checkpoint, lr=1e-3, global_batch_size=3, micro_batch_size=1, **flags)
    data = make_data(REWARDS)
    probe = TorchTrainBackend(args, estimator=estimator_cls(args))
    with torch.no_grad():
        lp, _ = probe._forward_response(probe.model, data["tokens"], data["response_lengths"], with_entropy=False)
    # rollout log-probs off the model's by up to ±0.2 nat per token: some tokens leave [0.9, 1.1]
    gen = torch.Generator().manual_seed(5)
    data["rollout_log_probs"] = [(p + 0.2 * (2 * torch.rand(p.numel(), generator=gen, dtype=p.dtype) - 1)).tolist()
                                 for p in lp.split(data["response_lengths"])]
    reference = TorchTrainBackend(args, estimator=estimator_cls(args))
    expected = reference.train(0, data)
    backend = MegatronTrainBackend(args, estimator=estimator_cls(args))
    got = backend.train(0, data)
    assert set(got) >= {k for k in expected if k.startswith("train/") and k != "train/tokens"} - {"train/lr"}
    for key, value in expected.items():
        # perf/ keys are wall-clock timers: they differ run to run
        if key in got and isinstance(value, float) and key != "train/lr" and not key.startswith("perf/"):
            assert got[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
    if name == "cispo":
        assert expected["train/pg_clipfrac"] > 0  # the second step's ratios left the band
    if name == "rs_token":
        assert expected["train/rs_masked_tokens"] >= 1
    exported = backend.export_weights(None)[0]
    for param, tensor in reference.model.state_dict().items():
        if param == "lm_head.weight" and param not in exported:  # tied embeddings travel once
            continue
        torch.testing.assert_close(exported[param].float(), tensor.float(), atol=5e-5, rtol=1e-3, msg=param)

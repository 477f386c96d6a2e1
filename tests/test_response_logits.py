"""The torch backend projects only the positions it scores onto the vocabulary (`logits_to_keep`): the
logits, log-probs and gradients equal those of the full row indexed afterwards (the reference), the LM
head sees only those rows, and a model whose forward lacks the argument still works."""

import pytest
import torch

from plugrl.plugins.backends.torch_trainer import TorchTrainBackend, packed_inputs, response_logits, response_slices
from plugrl.plugins.estimators.grpo import GRPOEstimator

from .test_torch_trainer import checkpoint, make_args, random_sequences  # noqa: F401  (fixture)


def _index(seqs, resp):
    return torch.cat([torch.arange(s, e) for s, e in response_slices(seqs, resp)])


def test_response_logits_equal_the_full_row_indexed_and_the_head_sees_only_those_rows(checkpoint):
    backend = TorchTrainBackend(make_args(checkpoint), estimator=GRPOEstimator(None))
    model = backend.model
    seqs, resp = random_sequences(count=6)
    inputs = packed_inputs(seqs, backend.device)
    index = _index(seqs, resp)
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape[-2]))
    try:
        with torch.no_grad():
            kept = response_logits(model, inputs, index)
            full = model(**inputs).logits[0]
    finally:
        hook.remove()
    assert rows == [len(index), sum(len(s) for s in seqs)]  # the head projected only the response positions
    assert kept.shape == (len(index), model.config.vocab_size)
    torch.testing.assert_close(kept, full[index], rtol=1e-5, atol=1e-5)


def test_gradients_through_the_kept_positions_equal_the_full_row_reference(checkpoint):
    backend = TorchTrainBackend(make_args(checkpoint), estimator=GRPOEstimator(None))
    model = backend.model
    seqs, resp = random_sequences(seed=3, count=4)
    inputs = packed_inputs(seqs, backend.device)
    index = _index(seqs, resp)
    targets = inputs["input_ids"][0][index + 1]
    weights = torch.linspace(0.5, 1.5, len(index))

    def grads(logits_fn):
        model.zero_grad(set_to_none=True)
        lp = torch.log_softmax(logits_fn().float(), -1).gather(1, targets[:, None])[:, 0]
        (lp * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    kept = grads(lambda: response_logits(model, inputs, index))
    reference = grads(lambda: model(**inputs).logits[0][index])
    assert kept.keys() == reference.keys() and len(kept) > 10
    for name in kept:
        torch.testing.assert_close(kept[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_model_without_logits_to_keep_gets_the_full_row_indexed(checkpoint):
    backend = TorchTrainBackend(make_args(checkpoint), estimator=GRPOEstimator(None))
    inner = backend.model

    class OldStyle(torch.nn.Module):  # a causal LM whose forward predates logits_to_keep
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, position_ids=None, **kwargs):
            return inner(input_ids=input_ids, position_ids=position_ids, **kwargs)

    seqs, resp = random_sequences(count=3)
    inputs = packed_inputs(seqs, backend.device)
    index = _index(seqs, resp)
    with torch.no_grad():
        torch.testing.assert_close(response_logits(OldStyle(), inputs, index), inner(**inputs).logits[0][index])


@pytest.mark.parametrize("with_entropy", [False, True])
def test_the_backends_response_log_probs_are_unchanged(checkpoint, with_entropy):
    """_forward_response (now through logits_to_keep) against log_softmax of the full row."""
    backend = TorchTrainBackend(make_args(checkpoint, rollout_temperature=0.7), estimator=GRPOEstimator(None))
    seqs, resp = random_sequences(seed=5)
    with torch.no_grad():
        lp, entropy = backend._forward_response(backend.model, seqs, resp, with_entropy=with_entropy)
        inputs = packed_inputs(seqs, backend.device)
        index = _index(seqs, resp)
        z = backend.model(**inputs).logits[0][index].float() / 0.7
        reference = torch.log_softmax(z, -1).gather(1, inputs["input_ids"][0][index + 1][:, None])[:, 0]
    torch.testing.assert_close(lp, reference, rtol=1e-5, atol=1e-5)
    if with_entropy:
        p = torch.softmax(z, -1)
        torch.testing.assert_close(entropy, -(p * torch.log_softmax(z, -1)).sum(-1), rtol=1e-5, atol=1e-5)
    else:
        assert entropy is None

"""The real default model (SmolLM2-135M from its packaged GGUF): recorded weights and metrics equal an
independent float64 eager computation on the same token ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference import eager_maps, reference_metrics
from sa_analysis.capture import AttentionMaps, capture_attention
from sa_analysis.data import token_batch
from sa_analysis.pipeline import analyse, sequence_stats

pytestmark = pytest.mark.slow
LAYERS = [0, 1, 14, 15, 28, 29]  # shallow, middle and deep layers for the pair-by-pair reference


@pytest.fixture(scope="module")
def tokens(default_model):
    batch = token_batch(default_model.tokenizer, n_seqs=2, seq_len=40)
    return batch


def test_weights_equal_float64_eager(default_model, tokens):
    ids = tokens.input_ids[:1]
    maps = AttentionMaps()
    with torch.no_grad(), capture_attention(default_model.model, maps):
        out = default_model.model(input_ids=ids)
    reference = eager_maps(default_model.model, ids)  # float64 eager copy
    for layer in range(30):
        np.testing.assert_allclose(maps.probs(layer).numpy(), reference[layer], atol=2e-5, err_msg=f"layer {layer}")
    with torch.no_grad():
        plain = default_model.model(input_ids=ids).logits
    assert torch.equal(out.logits, plain)


def test_metrics_equal_float64_reference(default_model, tokens):
    ids = tokens.input_ids[1:2]
    got, _ = sequence_stats(default_model.model, ids, exclude_first=1)
    want = reference_metrics(eager_maps(default_model.model, ids)[LAYERS, 0], exclude_first=1)
    index = np.ix_(LAYERS, range(9), LAYERS, range(9))
    for name in ("cosine_flat", "cosine_row", "kl"):
        np.testing.assert_allclose(getattr(got, name).numpy()[index], want[name], atol=1e-4, rtol=1e-4, err_msg=name)
    np.testing.assert_allclose(got.entropy.numpy()[LAYERS], want["entropy"], atol=1e-4, rtol=1e-4)


def test_report_summarises_sequences(default_model, tokens):
    report = analyse(default_model, tokens)
    layers = report.array("cosine_flat_layers")
    assert layers.shape == (2, 30, 30) and np.allclose(np.diagonal(layers, axis1=1, axis2=2), 1, atol=1e-5)
    kl = report.layer_matrix("kl")
    assert (kl >= 0).all() and np.allclose(np.diag(kl), 0, atol=1e-5)
    curve = report.isotropy_curve("cosine_flat")
    assert np.isnan(curve[-1]) and np.all((curve[:-1] > 0) & (curve[:-1] <= 1))
    assert report.meta["data"]["split"] == "calibration" and report.meta["model"]["n_kv_heads"] == 3

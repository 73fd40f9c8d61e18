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


def _paragraphs_text() -> str:
    """A plain-text file of paragraphs: CPython's own licence where this Python ships it, else documentation topics."""
    import sys
    from pathlib import Path

    licence = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "LICENSE.txt"
    if licence.is_file():
        return licence.read_text()
    from pydoc_data.topics import topics

    return "\n\n".join(body for _, body in sorted(topics.items())[:20])


def test_a_plain_text_file_is_measured_as_written(default_model, tmp_path):
    """Issue 36: a text file of paragraphs is one document: its ids are the tokenizer's ids of its text (no
    `<|endoftext|>` after each paragraph), and the head-mean cosine matrix measured on them equals an independent
    float64 eager computation on those ids."""
    from sa_analysis.data import one_document_cut

    path = tmp_path / "LICENSE.txt"
    path.write_text(_paragraphs_text())
    text = path.read_text()
    assert text.count("\n\n") > 10
    tokenizer = default_model.tokenizer
    batch = token_batch(tokenizer, text=path, n_seqs=2, seq_len=64)
    ids = batch.input_ids.flatten().tolist()
    assert ids == tokenizer(text[:one_document_cut(text)], add_special_tokens=False)["input_ids"][:128]
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") not in ids and batch.describe()["n_documents"] == 1
    report = analyse(default_model, batch)
    maps = eager_maps(default_model.model, batch.input_ids)  # [L, S, H, Q, K] float64
    flat = maps.reshape(*maps.shape[:3], -1)  # [L, S, H, Q*K]
    gram = np.einsum("lshx,mshx->slmh", flat, flat)  # [S, L, L, H]
    norms = np.sqrt(np.einsum("lshx,lshx->slh", flat, flat))  # [S, L, H]
    cosine = gram / (norms[:, :, None, :] * norms[:, None, :, :])
    want = cosine.mean(axis=3).mean(axis=0)  # head mean, then sequence mean: [L, L]
    assert np.abs(report.layer_matrix("cosine_flat") - want).max() < 1e-3

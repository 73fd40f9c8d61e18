"""Capture: recorded attention equals eager float64 attention, and the model's output does not change.

Every architecture shape we support is covered: GQA (Llama, Qwen 2), sliding windows (Mistral, Gemma 2/3),
attention-logit softcapping (Gemma 2), QK-norm (Qwen 3, Gemma 3), and GPT-2's fused projection.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_SHAPES, tiny_model
from reference import eager_maps
from sa_analysis.compat import attention_implementation
from sa_analysis.capture import AttentionMaps, capture_attention, measure_block_influence

ARCHS = list(TINY_SHAPES)
SEQ = 12  # longer than the tiny sliding windows (6), so windows bind


def _ids(batch=2, seq=SEQ, seed=1):
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_weights_equal_eager_float64(arch, device):
    model = tiny_model(arch, dtype=torch.float64, device=device)
    ids = _ids().to(device)
    maps = AttentionMaps()
    with torch.no_grad(), capture_attention(model, maps):
        model(input_ids=ids, use_cache=False)
    reference = eager_maps(model, ids)  # [L, B, H, Q, K]
    for layer in range(model.config.num_hidden_layers):
        got = maps.probs(layer).cpu().numpy()
        # eager takes the softmax of float64 logits in float32: |logit| ~ 20 leaves ~1e-6 relative error there
        np.testing.assert_allclose(got, reference[layer], atol=5e-6, err_msg=f"{arch} layer {layer}")


@pytest.mark.parametrize("arch", ARCHS)
def test_output_is_unchanged(arch, device):
    model = tiny_model(arch, dtype=torch.float32, device=device)
    ids = _ids().to(device)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with capture_attention(model, AttentionMaps(layers=[0, 3])):
            during = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert torch.equal(before, during), "capture changed the model's output"
    assert torch.equal(before, after), "capture left the model changed"


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2", "qwen3", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_the_unpadded_weights(arch, side, device):
    # float32: transformers' own float64 eager Gemma 2 turns left-padded rows into NaN that reach valid tokens
    model = tiny_model(arch, dtype=torch.float32, device=device)
    ids = _ids(batch=2).to(device)
    pad = 3
    mask = torch.ones_like(ids)
    if side == "left":
        mask[1, :pad] = 0
        valid = slice(pad, SEQ)
    else:
        mask[1, SEQ - pad:] = 0
        valid = slice(0, SEQ - pad)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    maps = AttentionMaps()
    with torch.no_grad(), capture_attention(model, maps):
        model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    unpadded = eager_maps(model, ids[1:2, valid])  # [L, 1, H, n, n]
    for layer in range(model.config.num_hidden_layers):
        got = maps.probs(layer)[1, :, valid, valid].cpu().numpy()
        np.testing.assert_allclose(got, unpadded[layer, 0], atol=2e-5, err_msg=f"{arch} {side} layer {layer}")


def test_chosen_layers_only_and_clean_exit():
    model = tiny_model("llama", dtype=torch.float32)
    maps = AttentionMaps(layers=[1, 2])
    with torch.no_grad(), capture_attention(model, maps):
        model(input_ids=_ids())
    assert sorted(maps.log_probs) == [1, 2]
    assert attention_implementation(model) == "sdpa"
    assert not any("_sa_capture" in m.__dict__ for m in model.modules())


def test_restores_after_an_exception():
    model = tiny_model("qwen2", dtype=torch.float32)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention(model, AttentionMaps()):
            raise RuntimeError("boom")
    assert attention_implementation(model) == "sdpa"
    assert not any("_sa_capture" in m.__dict__ for m in model.modules())


def test_unknown_layer_is_refused():
    model = tiny_model("llama", dtype=torch.float32)
    with pytest.raises(ValueError, match="do not exist"):
        with capture_attention(model, AttentionMaps(layers=[7])):
            pass


def test_block_influence_matches_hidden_states():
    """1 - cos(input, output) of each layer, checked against output_hidden_states (all but the last layer,
    whose output transformers reports after the final norm)."""
    model = tiny_model("llama", dtype=torch.float64)
    ids = _ids(batch=1)
    with torch.no_grad(), measure_block_influence(model) as influence:
        out = model(input_ids=ids, output_hidden_states=True)
    hidden = out.hidden_states
    for layer in range(model.config.num_hidden_layers - 1):
        cos = torch.nn.functional.cosine_similarity(hidden[layer], hidden[layer + 1], dim=-1)
        assert influence.values()[layer].item() == pytest.approx((1 - cos).mean().item(), abs=1e-10)

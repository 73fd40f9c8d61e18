"""Metrics: known answers, properties, and agreement with an independent float64 reference on tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import TINY_SHAPES, tiny_model
from reference import eager_maps, reference_metrics
from sa_analysis.metrics import PairStatistics, drop_first_keys, js_divergence, sequence_stats_from_maps
from sa_analysis.pipeline import sequence_stats

N = 6


def causal_log(p: torch.Tensor) -> torch.Tensor:
    """log of a map, -inf where it is zero (masked)."""
    return torch.where(p > 0, p.log(), torch.full_like(p, -math.inf))


def uniform_causal(n=N) -> torch.Tensor:
    return torch.tril(torch.ones(n, n, dtype=torch.float64)) / torch.arange(1, n + 1, dtype=torch.float64)[:, None]


def diagonal(n=N) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64)


def stats_of(*maps: torch.Tensor, exclude_first=0, block=2):
    """Statistics of one head per layer, from [n, n] maps."""
    log_probs = torch.stack([causal_log(m)[None] for m in maps])  # [L, 1, n, n]
    return sequence_stats_from_maps(log_probs, exclude_first=exclude_first, block=block)


# ----- known answers ------------------------------------------------------------------------------------------
def test_identical_layers():
    s = stats_of(uniform_causal(), uniform_causal())
    assert torch.allclose(s.cosine_flat, torch.ones_like(s.cosine_flat))
    assert torch.allclose(s.cosine_row, torch.ones_like(s.cosine_row))
    assert torch.allclose(s.kl, torch.zeros_like(s.kl))
    assert torch.allclose(s.js_adjacent, torch.zeros_like(s.js_adjacent))


def test_uniform_versus_diagonal():
    """Uniform causal rows vs attending to oneself: closed forms."""
    s = stats_of(uniform_causal(), diagonal())
    i = np.arange(1, N + 1)
    assert s.cosine_row[0, 0, 1, 0].item() == pytest.approx(np.mean(1 / np.sqrt(i)))
    flat = np.sum(1 / i) / math.sqrt(np.sum(1 / i) * N)
    assert s.cosine_flat[0, 0, 1, 0].item() == pytest.approx(flat)
    assert s.kl[1, 0, 0, 0].item() == pytest.approx(np.mean(np.log(i)))  # KL(diag || uniform)
    assert math.isinf(s.kl[0, 0, 1, 0].item())  # uniform attends where the diagonal has nothing
    assert s.entropy[0, 0].item() == pytest.approx(np.mean(np.log(i)))
    assert s.entropy[1, 0].item() == pytest.approx(0.0)


def test_js_closed_form_and_bound():
    p = torch.tensor([[0.0, 1.0]]).log()
    q = torch.tensor([[1.0, 0.0]]).log()
    assert js_divergence(p, q).item() == pytest.approx(math.log(2))


def test_excluding_sinks_renormalises():
    """Leaving key 0 out of a map that puts half its mass there gives the uniform map over the rest."""
    sinky = uniform_causal().clone()
    sinky[1:] *= 0.5
    sinky[1:, 0] += 0.5
    rest = stats_of(sinky, uniform_causal(), exclude_first=1)
    assert rest.kl[0, 0, 1, 0].item() == pytest.approx(0.0, abs=1e-12)
    assert rest.n_rows == N - 1  # row 0 saw only the sink
    with_sink = stats_of(sinky, uniform_causal())
    assert with_sink.kl[0, 0, 1, 0].item() > 0.05


def test_drop_first_keys_rows_sum_to_one():
    log_probs = torch.log_softmax(torch.randn(2, 3, 8, 8, dtype=torch.float64), -1)
    kept = drop_first_keys(log_probs, 2).exp().sum(-1)
    assert torch.allclose(kept, torch.ones_like(kept))


# ----- properties -------------------------------------------------------------------------------------------------
def random_maps(n_layers=3, n_heads=2, n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_layers, n_heads, n, n, generator=g, dtype=torch.float64) * 2
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    return torch.log_softmax(logits.masked_fill(~causal, -math.inf), -1)


def test_properties():
    s = sequence_stats_from_maps(random_maps())
    flat = s.cosine_flat.reshape(6, 6)
    assert torch.allclose(flat, flat.T) and torch.allclose(flat.diagonal(), torch.ones(6, dtype=flat.dtype))
    row = s.cosine_row.reshape(6, 6)
    assert torch.allclose(row, row.T) and (row <= 1 + 1e-12).all()
    kl = s.kl.reshape(6, 6)
    assert (kl >= 0).all() and torch.allclose(kl.diagonal(), torch.zeros(6, dtype=kl.dtype), atol=1e-12)
    assert not torch.allclose(kl, kl.T), "KL is not symmetric"
    assert ((s.js_adjacent >= 0) & (s.js_adjacent <= math.log(2))).all()


@pytest.mark.parametrize("block", [1, 4, 128])
def test_block_size_does_not_matter(block):
    maps = random_maps()
    a = sequence_stats_from_maps(maps, block=3)
    b = sequence_stats_from_maps(maps, block=block)
    for name in ("cosine_flat", "cosine_row", "kl", "entropy", "js_adjacent"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-12), name


def test_head_permutation_permutes_results():
    maps = random_maps(n_heads=3)
    perm = torch.tensor([2, 0, 1])
    a = sequence_stats_from_maps(maps)
    b = sequence_stats_from_maps(maps[:, perm])
    assert torch.allclose(b.kl, a.kl[:, perm][:, :, :, perm])


def test_bf16_operands_stay_close():
    maps = random_maps(n=32).float()
    exact = sequence_stats_from_maps(maps)
    fast = sequence_stats_from_maps(maps, operand_dtype=torch.bfloat16)
    assert torch.allclose(exact.cosine_flat, fast.cosine_flat, atol=5e-3)


def test_fully_masked_rows_are_skipped():
    stats = PairStatistics(1, 1, dtype=torch.float64)
    block = causal_log(uniform_causal())[None, None].clone()
    block[..., 2, :] = -math.inf  # a padding row
    stats.add(block)
    assert stats.n_rows == N - 1


# ----- against the independent reference --------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(TINY_SHAPES))
@pytest.mark.parametrize("exclude_first", [0, 2])
def test_pipeline_equals_float64_reference(arch, exclude_first, device):
    model = tiny_model(arch, dtype=torch.float64, device=device)
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(3)).to(device)
    got, _ = sequence_stats(model, ids, exclude_first=exclude_first)
    want = reference_metrics(eager_maps(model, ids)[:, 0], exclude_first=exclude_first)
    for name, value in want.items():
        np.testing.assert_allclose(getattr(got, name).cpu().numpy(), value, atol=1e-6, rtol=1e-6, err_msg=f"{arch} {name}")
    if arch in ("mistral",):  # every layer slides the same window: no infinite KL
        assert np.isfinite(want["kl"]).all()
    if arch in ("gemma2", "gemma3_text") and exclude_first == 0:  # sliding vs global: infinite KL, reported
        assert np.isinf(want["kl"]).any() and np.isinf(getattr(got, "kl").cpu().numpy()).any()


def test_float32_model_close_to_float64_reference():
    model = tiny_model("llama", dtype=torch.float32)
    ids = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(4))
    got, _ = sequence_stats(model, ids)
    want = reference_metrics(eager_maps(model, ids)[:, 0])
    for name, value in want.items():
        np.testing.assert_allclose(getattr(got, name).numpy(), value, atol=1e-4, rtol=1e-4, err_msg=name)

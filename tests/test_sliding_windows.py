"""Sliding-window models: an analysis shorter than the window calls windowed and global layers alike, a longer one
gives infinite KL between them; either way the planner keeps such pairs apart and says why (tiny Gemma 3 with a
40-token window, five sliding layers then a global one, as Gemma 3 orders them)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_model
from sa_analysis.errors import UserError
from sa_analysis.loading import LoadedModel, describe
from sa_analysis.pipeline import analyse
from sa_analysis.planner import plan_spans
from sa_analysis.shapes import analysis_length

WINDOW = 40


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gemma():
    model = tiny_model("gemma3_text", dtype=torch.float32, n_layers=6, sliding_window=WINDOW, max_position_embeddings=256,
                       layer_types=["sliding_attention"] * 5 + ["full_attention"])
    return LoadedModel(model, None, describe(model, "tiny-gemma3", "tiny-gemma3", "random-init"))


def _report(loaded, seq_len):
    from sa_analysis.data import TokenBatch

    ids = torch.randint(3, 128, (2, seq_len), generator=torch.Generator().manual_seed(seq_len))  # [S, T]
    return analyse(loaded, TokenBatch(ids, "random", "calibration", 1))


def test_the_default_length_exposes_the_window_and_the_pairs_diverge(gemma):
    info = gemma.info
    seq_len, note = analysis_length(None, info.layer_types, info.sliding_window, info.max_positions, False, default=32)
    assert seq_len == 2 * WINDOW and "twice the 40-token sliding window" in note
    long = _report(gemma, seq_len).layer_matrix("kl")
    short = _report(gemma, WINDOW).layer_matrix("kl")
    sliding, full = 4, 5
    assert info.layer_types[sliding] == "sliding_attention" and info.layer_types[full] == "full_attention"
    assert np.isinf(long[full, sliding]) and np.isfinite(long[sliding, 3])  # same masks stay comparable
    assert np.isfinite(short[full, sliding])  # within the window both masks are the same causal triangle


def test_the_planner_keeps_windowed_and_global_layers_apart_at_any_length(gemma):
    short = _report(gemma, WINDOW)
    assert np.isfinite(short.layer_matrix("kl")[5, 4])
    plan = plan_spans(short, budget=2, stability_resamples=0)
    assert 5 not in plan.followers and plan.mask_notes == {}
    assert any("no longer than the sliding window" in note for note in plan.notes)
    with pytest.raises(UserError, match="--allow-mask-change"):
        plan_spans(short, budget=1, first_shareable=5, stability_resamples=0)
    mixed = plan_spans(short, budget=1, mask_change=True, first_shareable=5, stability_resamples=0)
    assert mixed.followers == [5] and "past 40 tokens layer 5 sees only the last 40" in mixed.mask_notes[5]


def test_validation_says_when_its_text_cannot_reach_the_window(gemma):
    from sa_analysis.data import TokenBatch
    from sa_analysis.validate import validate_plan

    def validate(seq_len):
        ids = torch.randint(3, 128, (2, seq_len), generator=torch.Generator().manual_seed(1))
        return validate_plan(gemma, {5: 4}, TokenBatch(ids, "random", "heldout", 1), measure_speed=False)

    short, long = validate(WINDOW), validate(2 * WINDOW)
    assert len(short.meta["notes"]) == 1 and "past 40 tokens layer 5 sees only the last 40" in short.meta["notes"][0]
    assert "cannot see it (validate with --seq-len 80" in short.meta["notes"][0]
    assert "cannot see" not in long.meta["notes"][0]
    assert "notes" not in validate_plan(gemma, {2: 1}, TokenBatch(torch.randint(3, 128, (2, 16)), "random", "heldout", 1),
                                        measure_speed=False).meta  # both sliding: the same mask

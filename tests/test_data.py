"""Data: deterministic windows, a calibration / held-out split that never overlaps, user files, clear errors."""

from __future__ import annotations

import json

import pytest

from sa_analysis.data import load_documents, split_documents, token_batch
from sa_analysis.errors import UserError


class CharTokenizer:
    """One token per character: enough to test windowing without a model."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 500 + 1 for c in text]}


def test_default_corpus_split_is_deterministic_and_disjoint():
    docs, source = load_documents(None)
    calibration = split_documents(docs, "calibration")
    heldout = split_documents(docs, "heldout")
    assert source == "pydoc_data.topics"
    assert {n for n, _ in calibration}.isdisjoint({n for n, _ in heldout})
    assert len(calibration) + len(heldout) == len(docs) and 0.1 < len(heldout) / len(docs) < 0.3
    a = token_batch(CharTokenizer(), n_seqs=3, seq_len=50)
    b = token_batch(CharTokenizer(), n_seqs=3, seq_len=50)
    assert a.input_ids.equal(b.input_ids) and a.input_ids.shape == (3, 50)
    h = token_batch(CharTokenizer(), split="heldout", n_seqs=3, seq_len=50)
    assert not h.input_ids.equal(a.input_ids)


def test_text_and_jsonl_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(f"paragraph {i} " * 20 for i in range(20)))
    batch = token_batch(CharTokenizer(), text=text, n_seqs=2, seq_len=40)
    assert batch.source == str(text) and batch.input_ids.shape == (2, 40)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"text": f"row {i} " * 30, "id": i}) for i in range(20)))
    assert token_batch(CharTokenizer(), text=rows, n_seqs=2, seq_len=40).input_ids.shape == (2, 40)


def test_vocab_folding_for_random_init_models():
    batch = token_batch(CharTokenizer(), n_seqs=2, seq_len=30, vocab_size=7)
    assert int(batch.input_ids.max()) < 7


@pytest.mark.parametrize("content, message", [
    ("", "contains no text"),
    ("tiny text", "fewer than"),
])
def test_too_little_text(tmp_path, content, message):
    path = tmp_path / "small.txt"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        token_batch(CharTokenizer(), text=path, n_seqs=4, seq_len=100)


def test_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        token_batch(CharTokenizer(), text=tmp_path / "nope.txt")
    with pytest.raises(UserError, match="longer than this model's context"):
        token_batch(CharTokenizer(), seq_len=9000, max_positions=8192)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(UserError, match="Line 2"):
        token_batch(CharTokenizer(), text=bad)

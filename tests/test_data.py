"""Data: deterministic windows, a calibration / held-out split that never overlaps, user files, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from sa_analysis.data import (document_separator, join_documents, load_documents, one_document_cut, split_documents,
                              token_batch)
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


class VocabTokenizer(CharTokenizer):
    """A character tokenizer with a vocabulary of special tokens (ids above the characters' 1..500) and the ids a
    chat model's tokenizer sets."""

    def __init__(self, vocab: dict[str, int], bos: int | None = None, eos: int | None = None):
        self.vocab, self.bos_token_id, self.eos_token_id = vocab, bos, eos

    def get_vocab(self):
        return dict(self.vocab)

    def convert_ids_to_tokens(self, token_id):
        return {v: k for k, v in self.vocab.items()}[token_id]


@pytest.mark.parametrize("vocab, bos, eos, expected", [
    ({"<|endoftext|>": 503, "<|im_start|>": 504, "<|im_end|>": 505}, 504, 505, 503),  # SmolLM2-Instruct, Qwen-Instruct: not a chat token
    ({"<bos>": 502, "<eos>": 501, "<end_of_turn>": 606}, 502, 606, 502),  # Gemma-style: documents begin with BOS
    ({"</s>": 507}, None, 507, 507),  # neither: EOS
    ({}, None, None, None),
])
def test_document_separator_is_the_pretraining_boundary_not_a_chat_token(vocab, bos, eos, expected):
    tokenizer = VocabTokenizer(vocab, bos, eos)
    assert document_separator(tokenizer) == expected
    batch = token_batch(tokenizer, n_seqs=4, seq_len=400)
    ids = batch.input_ids.flatten().tolist()
    specials = set(vocab.values())
    assert {i for i in ids if i in specials} == ({expected} if expected is not None else set())
    assert batch.describe()["separator"] == (None if expected is None else tokenizer.convert_ids_to_tokens(expected))


def test_heal_text_joins_documents_as_the_measurements_do():
    from sa_analysis.heal.data import load_heal_data

    tokenizer = VocabTokenizer({"<|endoftext|>": 503, "<|im_end|>": 505}, None, 505)
    data = load_heal_data(None, tokenizer, seq_len=200, max_examples=40)
    stream = [int(i) for ids, _labels in data.examples for i in ids]
    assert 503 in stream and 505 not in stream


def test_default_model_joins_documents_with_endoftext(default_tokenizer):
    """SmolLM2's GGUF (an instruct build) says EOS is `<|im_end|>` under transformers 5.24 and BOS `<|im_start|>`:
    neither may land in the measured text."""
    batch = token_batch(default_tokenizer, n_seqs=4, seq_len=256)
    assert batch.separator == "<|endoftext|>"
    chat = {default_tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")}
    assert not chat & set(batch.input_ids.flatten().tolist())


# A plain-text file is the user's text as written (issue 36): one document, no separator inside it.
ENDOFTEXT = 503
GPT2_STYLE = {"<|endoftext|>": ENDOFTEXT, "<|im_end|>": 505}


def paragraphs_file(tmp_path, n: int = 40):
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: " + "words of the user's text, " * 6 for i in range(n)) + "\n")
    return path


def test_a_plain_text_file_is_one_document_tokenized_as_written(tmp_path):
    path = paragraphs_file(tmp_path)
    tokenizer = VocabTokenizer(GPT2_STYLE, None, 505)
    docs, _ = load_documents(path)
    assert docs == [(path.name, path.read_text())]
    text = path.read_text()
    cut = one_document_cut(text)
    calibration, heldout = text[:cut], text[cut:]
    assert calibration + heldout == text and calibration.endswith("\n") and 0.7 < cut / len(text) <= 0.8
    for split, part in (("calibration", calibration), ("heldout", heldout)):
        batch = token_batch(tokenizer, text=path, split=split, n_seqs=2, seq_len=100)
        ids = batch.input_ids.flatten().tolist()
        assert ENDOFTEXT not in ids and ids == tokenizer(part)["input_ids"][:200]
        described = batch.describe()
        assert described["n_documents"] == 1 and described["separator"] is None
    again = token_batch(tokenizer, text=path, n_seqs=2, seq_len=100)
    assert again.describe()["token_sha1"] == token_batch(tokenizer, text=path, n_seqs=2, seq_len=100).describe()["token_sha1"]


def test_one_document_cut_keeps_lines_whole():
    assert one_document_cut("a" * 100) == 80  # no line break: the 80 % mark
    body = "line\n" * 30
    cut = one_document_cut(body)
    assert body[cut - 1] == "\n" and cut <= 0.8 * len(body)


def test_separators_only_between_genuine_documents(tmp_path):
    tokenizer = VocabTokenizer(GPT2_STYLE, None, 505)
    assert join_documents(tokenizer, [("a", "xy"), ("b", "z")], ENDOFTEXT) == [ord("x") + 1, ord("y") + 1, ENDOFTEXT, ord("z") + 1]
    assert join_documents(tokenizer, [("a", "xy")], ENDOFTEXT) == [ord("x") + 1, ord("y") + 1]  # none after the last
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"text": f"row {i} " * 30}) for i in range(30)))
    batch = token_batch(tokenizer, text=rows, n_seqs=2, seq_len=200)
    assert ENDOFTEXT in batch.input_ids.flatten().tolist() and batch.describe()["separator"] == "<|endoftext|>"


def test_a_folder_is_one_document_per_file(tmp_path):
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    for i in range(12):
        (folder / ("sub" if i % 2 else "") / f"note{i:02d}.txt").write_text(f"note {i}\n\n" + "text " * 40)
    (folder / ".hidden").write_text("never read")
    (folder / "empty.txt").write_text("  \n")
    docs, source = load_documents(folder)
    assert source == str(folder) and len(docs) == 12 and all("never read" not in body for _, body in docs)
    assert [name for name, _ in docs] == sorted(name for name, _ in docs) and "sub/note01.txt" in dict(docs)
    calibration = token_batch(VocabTokenizer(GPT2_STYLE, None, 505), text=folder, n_seqs=2, seq_len=150)
    assert calibration.describe()["n_documents"] == len(split_documents(docs, "calibration")) > 1
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(UserError, match="folder .* contains no text"):
        load_documents(empty)


def test_heal_data_reads_text_through_the_same_loader(tmp_path):
    from sa_analysis.heal.data import load_heal_data

    path = paragraphs_file(tmp_path, 80)
    tokenizer = VocabTokenizer(GPT2_STYLE, None, 505)
    data = load_heal_data(path, tokenizer, seq_len=100)
    stream = [int(i) for ids, _labels in data.examples for i in ids]
    calibration = split_documents(load_documents(path)[0], "calibration")[0][1]
    assert ENDOFTEXT not in stream and stream == tokenizer(calibration)["input_ids"][:len(stream)]
    assert len(stream) == 100 * (len(tokenizer(calibration)["input_ids"]) // 100)
    heldout = token_batch(tokenizer, text=path, split="heldout", n_seqs=1, seq_len=100).input_ids[0].tolist()
    assert heldout == tokenizer(path.read_text()[len(calibration):])["input_ids"][:100]  # what the heal is judged on
    with pytest.raises(UserError, match="data file .* has no usable rows: it holds no text"):
        (tmp_path / "blank.txt").write_text("\n\n")
        load_heal_data(tmp_path / "blank.txt", tokenizer, seq_len=100)


@pytest.mark.parametrize("text", [None, "python-source"])
def test_the_built_in_texts_keep_their_tokens(default_tokenizer, text):
    """Every published number on the default text and `python-source` stands: their tokens are the ones the joining
    before issue 36 made (each document followed by the separator), rebuilt here independently."""
    for split in ("calibration", "heldout"):
        batch = token_batch(default_tokenizer, text=text, split=split, n_seqs=8, seq_len=256)
        separator = document_separator(default_tokenizer)
        before: list[int] = []
        for _, body in split_documents(load_documents(text)[0], split):
            before += default_tokenizer(body, add_special_tokens=False)["input_ids"] + [separator]
            if len(before) >= 8 * 256:
                break
        assert batch.input_ids.flatten().tolist() == before[:8 * 256]
        assert batch.describe()["n_documents"] > 1 and batch.describe()["separator"] == "<|endoftext|>"


def test_a_mixture_is_measured_on_every_kind_in_turn(default_tokenizer):
    """A mixture's batch takes window i from source i mod 2, each source's windows as that source alone gives them:
    a short held-out batch of docs + code holds both kinds (joined in one stream it held code only)."""
    mixed = token_batch(default_tokenizer, text="pydoc_data.topics+python-source", split="heldout", n_seqs=4, seq_len=64)
    docs = token_batch(default_tokenizer, text="pydoc_data.topics", split="heldout", n_seqs=2, seq_len=64)
    code = token_batch(default_tokenizer, text="python-source", split="heldout", n_seqs=2, seq_len=64)
    assert torch.equal(mixed.input_ids[0::2], docs.input_ids) and torch.equal(mixed.input_ids[1::2], code.input_ids)
    assert mixed.source == "pydoc_data.topics+python-source" and mixed.split == "heldout"


def test_a_mixture_of_kinds_keeps_each_source_split_as_it_is_alone(tmp_path):
    """Distillation needs no labels, so a heal may read several kinds of text at once ("a+b"): each source keeps its
    own documents and its own calibration / held-out split."""
    from sa_analysis.prechecks import heal_other_text

    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"text": f"row {i} " * 30}) for i in range(30)))
    mixed, source = load_documents(f"pydoc_data.topics+{rows}")
    topics, _ = load_documents(None)
    own, _ = load_documents(rows)
    assert source == f"pydoc_data.topics+{rows}" and len(mixed) == len(topics) + len(own)
    for split in ("calibration", "heldout"):
        names = {n for n, _ in split_documents(mixed, split)}
        assert names == {n for n, _ in split_documents(topics, split)} | {n for n, _ in split_documents(own, split)}
    assert heal_other_text(f"pydoc_data.topics+{rows}", None) == "python-source"
    assert heal_other_text(None, None) == "python-source" and heal_other_text(rows, None) == "pydoc_data.topics"
    with pytest.raises(UserError, match="reads both built-in texts"):
        heal_other_text("pydoc_data.topics+python-source", None)
    one = tmp_path / "book.txt"
    one.write_text("a book " * 100)
    with pytest.raises(UserError, match="is one document"):
        load_documents(f"python-source+{one}")
    with pytest.raises(UserError, match="neither a file"):
        load_documents("pydoc_data.topics+python-sourc")

"""Calibration sources -> deterministic token windows, and clear errors for unusable data."""

from __future__ import annotations

import json
import shutil
from importlib import resources

import pytest
import torch

from mergequant.quant import calib

TEXT = "\n\n".join(
    f"Paragraph {i}: It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    f"must be in want of a wife. To be, or not to be, that is the question number {i}." for i in range(40))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    data = resources.files("mergequant") / "data"
    for f in ("tokenizer.json", "tokenizer_config.json"):
        with resources.as_file(data / f) as src:
            shutil.copyfile(src, d / f)
    return AutoTokenizer.from_pretrained(d)


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_txt_windows_are_slices_of_the_token_stream(tmp_path, tokenizer):
    f = tmp_path / "c.txt"
    f.write_text(TEXT)
    batch = calib.calibration_batch(str(f), tokenizer, samples=8, seqlen=32, seed=3)
    assert batch.shape == (8, 32) and batch.dtype == torch.long
    # the independent stream: documents split on blank lines, EOS after each
    stream = []
    for doc in TEXT.split("\n\n"):
        stream += _ids(tokenizer, doc) + [tokenizer.eos_token_id]
    s = torch.tensor(stream)
    for row in batch:
        hits = [i for i in range(len(stream) - 31) if torch.equal(s[i:i + 32], row)]
        assert hits, "window is not a contiguous slice of the stream"


def test_deterministic_for_a_seed(tmp_path, tokenizer):
    f = tmp_path / "c.txt"
    f.write_text(TEXT)
    a = calib.calibration_batch(str(f), tokenizer, samples=6, seqlen=16, seed=1)
    b = calib.calibration_batch(str(f), tokenizer, samples=6, seqlen=16, seed=1)
    c = calib.calibration_batch(str(f), tokenizer, samples=6, seqlen=16, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_jsonl_text_and_messages(tmp_path, tokenizer):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"text": "hello world"}) + "\n\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    rendered = []
    docs = calib.load_documents(str(f), chat_template=lambda m: rendered.append(m) or "<user>hi</user>")
    assert docs == ["hello world", "<user>hi</user>"] and rendered == [[{"role": "user", "content": "hi"}]]
    with pytest.raises(calib.CalibrationError, match="chat template"):
        calib.load_documents(str(f))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": [1, 2], "text": ["first doc", "second doc"]}), f)
    assert calib.load_documents(str(f)) == ["first doc", "second doc"]
    g = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": [1], "a": ["x"], "b": ["y"]}), g)
    with pytest.raises(calib.CalibrationError, match="no 'text' column"):
        calib.load_documents(str(g))


@pytest.mark.parametrize("spec, expected", [
    ("hf:wikitext:wikitext-2-raw-v1:train", ("wikitext", "wikitext-2-raw-v1", "train", "text")),
    ("hf:allenai/c4:train[:1000]:text", ("allenai/c4", None, "train[:1000]", "text")),
    ("hf:org/ds:validation", ("org/ds", None, "validation", "text")),
    ("hf:org/ds:en:test:body", ("org/ds", "en", "test", "body")),
])
def test_parse_hub_source(spec, expected):
    s = calib.parse_hub_source(spec)
    assert (s.name, s.config, s.split, s.column) == expected


@pytest.mark.parametrize("content, match", [
    (b"", "empty"),
    (b"\n\n   \n\n", "empty"),
    (b"\xff\xfe\x00bad", "not UTF-8"),
])
def test_unusable_files(tmp_path, content, match):
    f = tmp_path / "c.txt"
    f.write_bytes(content)
    with pytest.raises(calib.CalibrationError, match=match) as e:
        calib.load_documents(str(f))
    assert str(f) in str(e.value)


def test_bad_jsonl_line_is_named(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(calib.CalibrationError, match=r"c.jsonl:2: invalid JSON"):
        calib.load_documents(str(f))


def test_too_short_and_missing(tmp_path, tokenizer):
    f = tmp_path / "c.txt"
    f.write_text("just a few words")
    with pytest.raises(calib.CalibrationError, match="fewer than --seqlen 2048"):
        calib.calibration_batch(str(f), tokenizer, samples=4, seqlen=2048)
    with pytest.raises(calib.CalibrationError, match="not found"):
        calib.load_documents(str(tmp_path / "nope.txt"))

"""Bad input is one clear UserError line, or with on_bad_record: skip a counted skip: never
a silent drop."""

import json
import logging

import numpy as np
import pydantic
import pytest

from maxtrain.data import DataConfig, build_pipeline, build_tokenizer
from maxtrain.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from maxtrain.errors import UserError

LETTERS = "abcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def tok():
    return SentencePieceTokenizer(train_sentencepiece([LETTERS * 3 + " 0123456789"] * 50, vocab_size=64, model_type="char"))


def batches(cfg, tok, n=1):
    with build_pipeline(cfg, tok, split="train", seq_len=64, global_batch=2, seed=0) as it:
        out = [next(it) for _ in range(n)]
        return out, it.skipped_records


def eval_documents(cfg, tok):
    """All documents of the (finite) eval split, decoded, and the count of skipped records."""
    with build_pipeline(cfg, tok, split="eval", seq_len=16, global_batch=2, seed=0) as it:
        out = list(it)
        skipped = it.skipped_records
    stream = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in out])
    return [tok.decode(d) for d in np.split(stream, np.flatnonzero(stream == tok.bos_id))[1:]], skipped


def one_line(e):
    msg = str(e.value)
    assert "\n" not in msg and ";" in msg, msg  # "<problem>; <fix>"
    return msg


def test_missing_path_and_empty_sources(tmp_path, tok):
    with pytest.raises(UserError, match=r"data.sources\[0\] \(jsonl\): no file matches .*nope") as e:
        batches(DataConfig(sources=[{"type": "jsonl", "path": str(tmp_path / "nope/*.jsonl")}]), tok)
    one_line(e)
    (tmp_path / "empty.jsonl").write_text("\n \n")
    with pytest.raises(UserError, match=r"has no documents") as e:
        batches(DataConfig(sources=[{"type": "jsonl", "path": str(tmp_path / "empty.jsonl")}]), tok)
    one_line(e)
    with pytest.raises(UserError, match="tokenizer '.*missing.model' does not exist"):
        build_tokenizer(DataConfig(tokenizer={"path": str(tmp_path / "missing.model")}), vocab_size=64)


def test_held_out_everything(tmp_path, tok):
    (tmp_path / "one.txt").write_text("just one document")
    with pytest.raises(UserError, match=r"has no eval documents \(1 in all, eval_fraction=0.0\); add documents or change"):
        build_pipeline(DataConfig(sources=[{"type": "text", "path": str(tmp_path / "one.txt")}], eval_fraction=0.0),
                       tok, split="eval", seq_len=8, global_batch=1, seed=0)


def test_undecodable_bytes_error_or_counted_skip(tmp_path, tok, caplog):
    (tmp_path / "a.txt").write_text("good text one")
    (tmp_path / "b.txt").write_bytes(b"bad \xff\xfe bytes")
    (tmp_path / "c.txt").write_text("good text two")
    src = {"type": "text", "path": str(tmp_path / "*.txt")}
    with pytest.raises(UserError, match=r"b.txt: bytes are not valid UTF-8 \(byte 0xff at offset 4\); .*on_bad_record: skip") as e:
        batches(DataConfig(sources=[src], eval_fraction=0.0, shuffle=False), tok)
    one_line(e)
    # eval_fraction 0.999 holds out all three files, and eval is finite: exact counts.
    with caplog.at_level(logging.WARNING, logger="maxtrain.data"):
        docs, skipped = eval_documents(DataConfig(sources=[src], eval_fraction=0.999, on_bad_record="skip"), tok)
    assert docs == ["good text one", "good text two"] and skipped == 1
    assert "skipped bad record 1 in" in caplog.text and "b.txt: bytes are not valid UTF-8" in caplog.text
    # Train repeats: 3 batches of 128 tokens are several epochs, each skip counted again.
    out, skipped = batches(DataConfig(sources=[src], eval_fraction=0.0, shuffle=False, on_bad_record="skip"), tok, n=3)
    stream = np.concatenate([b["tokens"].reshape(-1) for b in out])
    assert skipped == int((stream == tok.bos_id).sum()) // 2  # One skip between each a and c.


def test_jsonl_field_missing_not_string_invalid_or_empty(tmp_path, tok):
    lines = ['{"text": "fine"}', '{"body": "x"}', '{"text": 3}', "{not json", '{"text": "   "}', '["text"]']
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    src = {"type": "jsonl", "path": str(tmp_path / "d.jsonl")}
    cfg = DataConfig(sources=[src], eval_fraction=0.0, shuffle=False)
    fine = [tok.bos_id] + tok.encode("fine") + [tok.eos_id]
    with build_pipeline(cfg, tok, split="train", seq_len=len(fine), global_batch=1, seed=0) as it:
        assert next(it)["tokens"][0].tolist() == fine  # The good record comes through first.
        with pytest.raises(UserError, match=r"d.jsonl \(record 2, byte 17\): field 'text' is missing; fix the data") as e:
            next(it)
    one_line(e)
    from maxtrain.data.sources import SpanDocuments

    reasons = [SpanDocuments(DataConfig(sources=[src]).sources[0], "s")[i] for i in range(1, 6)]
    assert [r.reason for r in reasons] == [
        "field 'text' is missing", "field 'text' is int, not a string", "invalid JSON (Expecting property name enclosed in double quotes)",
        "empty document", "field 'text' is missing"]
    # Skip: the 6 lines yield 1 document and 5 counted skips.
    docs, skipped = eval_documents(DataConfig(sources=[src], eval_fraction=0.999, on_bad_record="skip"), tok)
    assert docs == ["fine"] and skipped == 5


def test_config_mistakes_are_rejected(tok):
    with pytest.raises(pydantic.ValidationError, match="extra_forbidden|Extra inputs"):
        DataConfig(**{"sources": [{"type": "embedded"}], "shufle": False})
    with pytest.raises(pydantic.ValidationError, match="does not match any of the expected tags|union_tag_invalid"):
        DataConfig(sources=[{"type": "csv", "path": "x.csv"}])
    with pytest.raises(pydantic.ValidationError):
        DataConfig(sources=[{"type": "jsonl", "path": "x", "colum": "t"}])
    with pytest.raises(pydantic.ValidationError):
        DataConfig(sources=[])


def test_tokenizer_larger_than_model_vocab(tmp_path, tok):
    path = tmp_path / "t.model"
    path.write_bytes(tok._bytes)
    with pytest.raises(UserError, match=rf"tokenizer has {tok.vocab_size} pieces but model.vocab_size is 16; raise model.vocab_size") as e:
        build_tokenizer(DataConfig(tokenizer={"path": str(path)}), vocab_size=16)
    one_line(e)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="is not a sentencepiece model"):
        build_tokenizer(DataConfig(tokenizer={"path": str(tmp_path / "junk.model")}), vocab_size=64)

"""SFT data: prompt tokens carry zero loss weight, each reply ends in a weighted EOS, packing keeps the masks."""

import json

import numpy as np
import pytest

from maxtrain.config import load_config
from maxtrain.data import build_pipeline
from maxtrain.data.config import DataConfig, SftFormat
from maxtrain.data.formats import RecordEncoder, prompt_and_reference, template_for
from maxtrain.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from maxtrain.errors import UserError

TEXT = "abcdefghijklmnopqrstuvwxyz0123456789 :+=\nUSERAsistn"


@pytest.fixture(scope="module")
def tok():
    return SentencePieceTokenizer(train_sentencepiece([TEXT * 3] * 20, vocab_size=80, model_type="char"))


def _weighted_text(tok, doc):
    ids = doc["tokens"][1:][doc["weights"][:-1] > 0]  # the targets that carry loss
    return ids


def test_alpaca_record_weights_only_the_reply_and_its_eos(tok):
    enc = RecordEncoder(SftFormat(template="plain"), tok)
    doc = enc({"instruction": "sort: 3 1 2", "input": "", "output": "1 2 3"}, "r1")
    targets = _weighted_text(tok, doc)
    assert targets[-1] == tok.eos_id  # EOS after the reply is learned
    assert tok.decode(targets[:-1]).strip() == "1 2 3"  # sentencepiece folds the newline suffix into a space
    assert doc["weights"][-1] == 0  # nothing after EOS
    n_prompt = len(tok.encode("User: ")) + len(tok.encode("sort: 3 1 2")) + len(tok.encode("\n")) + len(tok.encode("Assistant: "))
    assert doc["weights"][: n_prompt].sum() == 0  # every prompt position (BOS + prompt) predicts nothing


def test_chat_records_weight_every_assistant_turn(tok):
    enc = RecordEncoder(SftFormat(template="plain"), tok)
    rec = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b c"},
                        {"role": "user", "content": "d"}, {"role": "assistant", "content": "e"}]}  # fmt: skip
    doc = enc(rec, "r")
    targets = _weighted_text(tok, doc)
    assert list(targets).count(tok.eos_id) == 2
    eos = np.flatnonzero(targets == tok.eos_id)
    assert tok.decode(targets[: eos[0]]).strip() == "b c" and tok.decode(targets[eos[0] + 1 : eos[1]]).strip() == "e"
    assert "bad" in enc({"messages": [{"role": "user", "content": "x"}]}, "r")  # nothing to learn: a bad record
    ids, ref = prompt_and_reference(rec, tok, template_for("plain"))
    assert ref == "e" and tok.decode(ids).rstrip().endswith("Assistant:")


def test_packing_keeps_reply_masks_across_rows(tok, tmp_path):
    rng = np.random.default_rng(0)
    recs = [{"instruction": "sort: " + " ".join(rng.choice(list("0123456789"), 4)), "output": " ".join(sorted("5" * i + "12"))}
            for i in range(1, 25)]  # fmt: skip
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = DataConfig(sources=[{"type": "jsonl", "path": str(tmp_path / "sft.jsonl")}], eval_fraction=0.0, shuffle=False,
                     prefetch=0, format={"type": "sft", "template": "plain", "rows": "split"})
    enc = RecordEncoder(cfg.format, tok)
    expected = np.concatenate([_weighted_text(tok, enc(r, "")) for r in recs])
    got = []
    with build_pipeline(cfg, tok, split="train", seq_len=16, global_batch=1, seed=0) as it:  # rows much shorter than records
        while sum(map(len, got)) < len(expected):
            b = next(it)
            got.append(b["targets"][b["loss_weights"] > 0])
            assert np.all(b["loss_weights"][b["segment_ids"] == 0] == 0)
    np.testing.assert_array_equal(np.concatenate(got)[: len(expected)], expected)


@pytest.mark.parametrize("preset,template", [("qwen3-0.6b", "chatml"), ("llama3.2-1b", "llama3"), ("tiny-gpt2", "plain")])
def test_chat_template_follows_the_model_family(preset, template):
    cfg = load_config(None, [f"model={preset}", "data.format.type=sft"])
    assert cfg.data.format.template == template


def _sft_records(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"instruction": "sort: " + " ".join(rng.choice(list("0123456789"), int(rng.integers(1, 12)))),
             "output": " ".join(sorted("5" * int(rng.integers(0, 8)) + "12"))} for _ in range(n)]  # fmt: skip


def test_whole_rows_keep_every_record_in_one_row_with_its_prompt(tok, tmp_path):
    recs = _sft_records(40)
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = DataConfig(sources=[{"type": "jsonl", "path": str(tmp_path / "sft.jsonl")}], eval_fraction=0.0, shuffle=False,
                     prefetch=0, format={"type": "sft", "template": "plain"})  # rows: whole is the default
    enc = RecordEncoder(cfg.format, tok)
    expected = [enc(r, "")["tokens"] for r in recs]
    seq_len = 80
    assert max(map(len, expected)) <= seq_len < 2 * max(map(len, expected))  # several rows hold 2+ records, not all
    with build_pipeline(cfg, tok, split="train", seq_len=seq_len, global_batch=2, seed=0) as it:
        batches = [next(it) for _ in range(30)]
    seen = {0: [], 1: []}
    padded_rows = 0
    for b in batches:
        for r in range(2):
            seg, toks = b["segment_ids"][r], b["tokens"][r]
            padded_rows += int((seg == 0).any())
            for s in range(1, seg.max() + 1):
                piece = toks[seg == s]
                assert piece[0] == tok.bos_id  # every piece is a whole record: it starts at its BOS ...
                assert b["positions"][r][seg == s][0] == 0
                seen[r].append(piece)
    for r in range(2):  # ... and is exactly the next record of its lane (documents r, r+2, ...)
        lane = expected[r::2] * 3
        assert len(seen[r]) >= 30  # past one epoch of the lane (20 records)
        for got, want in zip(seen[r], lane):
            np.testing.assert_array_equal(got, want)
    assert padded_rows > 0  # records that did not fit moved to the next row


def test_too_long_records_lose_prompt_from_the_left_or_are_refused(tok, tmp_path, caplog):
    recs = [{"instruction": "sort: " + "9 " * 30, "output": "1 2"}, {"instruction": "x", "output": "5 " * 40}]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    base = dict(sources=[{"type": "jsonl", "path": str(tmp_path / "long.jsonl")}], eval_fraction=0.0, shuffle=False, prefetch=0)
    cfg = DataConfig(**base, format={"type": "sft", "template": "plain"}, on_bad_record="skip")
    full = RecordEncoder(cfg.format, tok)(recs[0], "")
    with caplog.at_level("WARNING"), build_pipeline(cfg, tok, split="train", seq_len=32, global_batch=1, seed=0) as it:
        b = next(it)
        # Record 0 fits once prompt tokens are dropped after BOS: BOS, the prompt's tail, the whole reply.
        row = b["tokens"][0][b["segment_ids"][0] == 1]
        assert len(row) == 32 and row[0] == tok.bos_id
        np.testing.assert_array_equal(row[1:], full["tokens"][len(full["tokens"]) - 31 :])
        reply = full["tokens"][1:][full["weights"][:-1] > 0]
        np.testing.assert_array_equal(b["targets"][0][b["loss_weights"][0] > 0], reply)
        assert b["segment_ids"][0].max() == 1
        # Record 1's reply alone is longer than a row: skipped and counted, never silently cut.
        next(it)
        assert it.skipped_records >= 1
    assert "records longer than seq_len=32" in caplog.text and "its reply alone does not fit" in caplog.text
    refuse = DataConfig(**base, format={"type": "sft", "template": "plain", "too_long": "refuse"})
    with pytest.raises(UserError, match="does not fit in a row"), build_pipeline(refuse, tok, split="train", seq_len=32,
                                                                                 global_batch=1, seed=0) as it:
        next(it)

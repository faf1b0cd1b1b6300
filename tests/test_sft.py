"""SFT data: prompt tokens carry zero loss weight, each reply ends in a weighted EOS, packing keeps the masks."""

import json

import numpy as np
import pytest

from maxtrain.config import load_config
from maxtrain.data import build_pipeline
from maxtrain.data.config import DataConfig, SftFormat
from maxtrain.data.formats import RecordEncoder, prompt_and_reference, template_for
from maxtrain.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

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
                     prefetch=0, format={"type": "sft", "template": "plain"})
    enc = RecordEncoder(cfg.format, tok)
    expected = np.concatenate([_weighted_text(tok, enc(r, "")) for r in recs])
    got = []
    with build_pipeline(cfg, tok, split="train", seq_len=16, global_batch=2, seed=0) as it:  # rows much shorter than records
        while sum(map(len, got)) < len(expected):
            b = next(it)
            got.append(b["targets"][b["loss_weights"] > 0])
            assert np.all(b["loss_weights"][b["segment_ids"] == 0] == 0)
    np.testing.assert_array_equal(np.concatenate(got)[: len(expected)], expected)


@pytest.mark.parametrize("preset,template", [("qwen3-0.6b", "chatml"), ("llama3.2-1b", "llama3"), ("tiny-gpt2", "plain")])
def test_chat_template_follows_the_model_family(preset, template):
    cfg = load_config(None, [f"model={preset}", "data.format.type=sft"])
    assert cfg.data.format.template == template

"""Preference data: a pair is one element (two segments of one row), replies alone carry loss,
per-sequence fields land on last tokens, long pairs are cut by the documented policy, bad records fail clearly."""

import json

import numpy as np
import pytest

from maxtrain.data import build_pipeline
from maxtrain.data.config import DataConfig, PreferenceFormat
from maxtrain.data.formats import RecordEncoder
from maxtrain.data.preference import cut_sequences
from maxtrain.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from maxtrain.errors import UserError

TEXT = "abcdefghijklmnopqrstuvwxyz0123456789 :+=\nUSERAsistn"


@pytest.fixture(scope="module")
def tok():
    return SentencePieceTokenizer(train_sentencepiece([TEXT * 3] * 20, vocab_size=80, model_type="char"))


def _write(tmp_path, recs):
    (tmp_path / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(tmp_path / "pref.jsonl")


def test_pair_element_weights_only_the_replies(tok):
    enc = RecordEncoder(PreferenceFormat(template="plain"), tok)
    el = enc({"prompt": "2+2=", "chosen": "4", "rejected": "5", "margin": 0.5}, "r")
    segs, w, t = el["segments"], el["weights"], el["tokens"]
    assert set(segs) == {1, 2}
    for s, reply in ((1, "4"), (2, "5")):
        idx = np.flatnonzero(segs == s)
        seq, ws = t[idx], w[idx]
        targets = seq[1:][ws[:-1] > 0]
        assert targets[-1] == tok.eos_id and tok.decode(targets[:-1]).strip() == reply
        assert ws[-1] == 0
    c, r = (t[segs == s] for s in (1, 2))
    n = len(c) - 3  # shared prompt: everything before the reply, its end-of-turn and EOS
    assert np.array_equal(c[:n], r[:n])
    assert list(el["sequence_fields"]["sequence_margin"]) == [0.5, 0.0]
    # Conversational, implicit prompt: the same tokens.
    conv = {"chosen": [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}],
            "rejected": [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "5"}], "margin": 0.5}
    el2 = enc(conv, "r")
    assert np.array_equal(el2["tokens"], t) and np.array_equal(el2["weights"], w)


@pytest.mark.parametrize("rec,why", [
    ({"prompt": "a", "chosen": "b"}, "missing field 'rejected'"),
    ({"prompt": "a", "chosen": "", "rejected": "b"}, "'chosen' is empty"),
    ({"prompt": "a", "chosen": "b", "rejected": "b"}, "identical"),
    ({"prompt": "a", "chosen": 3, "rejected": "b"}, "must be a string"),
    ({"prompt": "a", "chosen": "b", "rejected": "c", "margin": "x"}, "not a number"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "z"}, {"role": "assistant", "content": "c"}]}, "share every message"),
])  # fmt: skip
def test_bad_records_name_the_problem(tok, rec, why):
    bad = RecordEncoder(PreferenceFormat(template="plain"), tok)(rec, "pref.jsonl:3")
    assert why in bad["bad"][1]


def test_batches_keep_pairs_in_one_row_with_fields(tok, tmp_path):
    recs = [{"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": str(2 * i + 1), "margin": float(i),
             "ref_chosen_logps": -1.0 - i, "ref_rejected_logps": -2.0 - i} for i in range(12)]  # fmt: skip
    cfg = DataConfig(sources=[{"type": "jsonl", "path": _write(tmp_path, recs)}], eval_fraction=0.0, shuffle=False,
                     prefetch=0, format={"type": "preference", "template": "plain"})
    with build_pipeline(cfg, tok, split="train", seq_len=64, global_batch=2, seed=0) as it:
        batch = next(it)
    seg, pos = batch["segment_ids"], batch["positions"]
    for row in range(2):
        ids = [s for s in np.unique(seg[row]) if s > 0]
        assert len(ids) % 2 == 0 and len(ids) >= 2  # whole pairs only
        for s in ids:
            idx = np.flatnonzero(seg[row] == s)
            assert np.array_equal(pos[row, idx], np.arange(len(idx)))  # each sequence restarts at 0
            last = idx[-1]
            assert batch["loss_weights"][row, last] == 0
            assert batch["reference_logps"][row, idx[:-1]].sum() == 0 and batch["reference_logps"][row, last] < 0
            if s % 2 == 0:
                assert batch["sequence_margin"][row, idx].sum() == 0
        # The pair's chosen/rejected reference values came through on the last tokens.
        first_c, first_r = (np.flatnonzero(seg[row] == s)[-1] for s in (1, 2))
        assert batch["reference_logps"][row, first_c] - batch["reference_logps"][row, first_r] == pytest.approx(1.0)
    assert set(batch) >= {"sequence_margin", "reference_logps"}


def test_long_pairs_lose_prompt_then_reply_tail(tok, tmp_path, caplog):
    enc = RecordEncoder(PreferenceFormat(template="plain"), tok)
    el = enc({"prompt": "abcdefghij" * 3, "chosen": "xyz", "rejected": "uvw"}, "r")
    n = len(el["tokens"])
    cut = cut_sequences(el, n - 10)
    assert len(cut["tokens"]) <= n - 10
    for s in (1, 2):  # replies intact, prompts shorter, BOS kept
        idx = np.flatnonzero(cut["segments"] == s)
        assert cut["tokens"][idx[0]] == tok.bos_id and cut["weights"][idx].sum() == el["weights"][el["segments"] == s].sum()
    tiny = cut_sequences(el, 12)  # only BOS + a few reply tokens fit: replies cut from the right
    assert tiny is not None and len(tiny["tokens"]) <= 12 and tiny["weights"][tiny["segments"] == 1].sum() > 0
    assert cut_sequences(el, 2) is None
    recs = [{"prompt": "abcdefghij" * 3, "chosen": "xyz", "rejected": "uvw"}] * 2
    cfg = DataConfig(sources=[{"type": "jsonl", "path": _write(tmp_path, recs)}], eval_fraction=0.0, shuffle=False,
                     prefetch=0, format={"type": "preference", "template": "plain"})
    with build_pipeline(cfg, tok, split="train", seq_len=n - 10, global_batch=1, seed=0) as it:
        next(it)
    assert "longer than seq_len" in caplog.text
    refuse = cfg.model_copy(update={"format": PreferenceFormat(template="plain", too_long="refuse")})
    with pytest.raises(UserError, match="does not fit"):
        with build_pipeline(refuse, tok, split="train", seq_len=n - 10, global_batch=1, seed=0) as it:
            next(it)


def test_bad_record_in_the_pipeline_is_one_clear_error(tok, tmp_path):
    cfg = DataConfig(sources=[{"type": "jsonl", "path": _write(tmp_path, [{"prompt": "a", "chosen": "b"}])}],
                     eval_fraction=0.0, shuffle=False, prefetch=0, format={"type": "preference", "template": "plain"})
    with pytest.raises(UserError, match="bad record.*missing field 'rejected'"):
        with build_pipeline(cfg, tok, split="train", seq_len=32, global_batch=1, seed=0) as it:
            next(it)


def test_task_suite_writes_pairs_with_the_right_answer_chosen(tok, tmp_path):
    from maxtrain.tasks.synthetic import write_suite

    paths = write_suite(tmp_path, train=200, eval=40, seed=0)
    sft = {r["instruction"]: r["output"] for r in map(json.loads, paths["train"].read_text().splitlines())}
    pairs = [json.loads(line) for line in paths["pref_train"].read_text().splitlines()]
    held = [json.loads(line) for line in paths["pref_eval"].read_text().splitlines()]
    assert len(pairs) == 200 and len(held) == 40 and not {p["prompt"] for p in pairs} & {p["prompt"] for p in held}
    enc = RecordEncoder(PreferenceFormat(template="plain"), tok)
    for p in pairs:
        assert p["chosen"] == sft[p["prompt"]] and p["rejected"] != p["chosen"] and p["rejected"]
        assert "bad" not in enc(p, "pairs")
    assert {p["task"] for p in pairs} == {"reverse", "sort", "add", "lookup"}

"""Packing: every token is an input once and a target once (BOS never), segment ids,
positions and loss weights match a direct reading of each lane's document stream (row r of
every batch reads documents r, r + B, r + 2B, ...)."""

import json

import numpy as np
import pytest

from maxtrain.data import DataConfig, build_pipeline
from maxtrain.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

ALPHABET = "abcdefghijklmnopqrstuvwxyz ,."


@pytest.fixture(scope="module")
def tok():
    model = train_sentencepiece([ALPHABET * 3] * 50, vocab_size=64, model_type="char")
    return SentencePieceTokenizer(model)


def write_docs(path, n, seed=0):
    """n JSONL documents of random length 1..150 (some longer than a row), returned as texts."""
    rng = np.random.default_rng(seed)
    texts = ["".join(rng.choice(list(ALPHABET[:26]), size=rng.integers(1, 150))) for _ in range(n)]
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    return texts


def reference_rows(docs, seq_len, n_tokens):
    """Expected fields for the first n_tokens of the stream, computed token by token."""
    tokens, targets, weights, segments, positions = [], [], [], [], []
    col, segment, pos = 0, 0, 0
    for doc in docs:
        for k, t in enumerate(doc):
            if col == 0 or k == 0:
                segment, pos = (1 if col == 0 else segment + 1), 0
            tokens.append(t)
            targets.append(doc[k + 1] if k + 1 < len(doc) else None)
            weights.append(0.0 if k + 1 == len(doc) else 1.0)
            segments.append(segment)
            positions.append(pos)
            pos += 1
            col = (col + 1) % seq_len
            if len(tokens) == n_tokens:
                return tokens, targets, weights, segments, positions
    raise AssertionError("not enough documents")


def test_packing_counts_every_token_once(tmp_path, tok):
    texts = write_docs(tmp_path / "d.jsonl", 60)
    docs = [[tok.bos_id] + tok.encode(t) + [tok.eos_id] for t in texts]
    total = sum(map(len, docs))
    cfg = DataConfig(sources=[{"type": "jsonl", "path": str(tmp_path / "d.jsonl")}], eval_fraction=0.0, shuffle=False)
    seq_len, rows = 64, 4
    with build_pipeline(cfg, tok, split="train", seq_len=seq_len, global_batch=rows, seed=0) as it:
        batches = [next(it) for _ in range(total // (seq_len * rows) + 8)]
    for k, dtype in [("tokens", np.int32), ("targets", np.int32), ("loss_weights", np.float32), ("segment_ids", np.int32), ("positions", np.int32)]:
        assert batches[0][k].shape == (rows, seq_len) and batches[0][k].dtype == dtype
    for r in range(rows):
        lane_docs = docs[r::rows]  # one epoch, no shuffle: the lane's documents laid end to end
        n = sum(map(len, lane_docs))
        flat = {k: np.concatenate([b[k][r] for b in batches])[:n] for k in batches[0]}
        stream = np.concatenate(lane_docs)
        np.testing.assert_array_equal(flat["tokens"], stream)
        exp_tokens, exp_targets, exp_w, exp_seg, exp_pos = reference_rows(lane_docs, seq_len, n)
        np.testing.assert_array_equal(flat["loss_weights"], exp_w)
        np.testing.assert_array_equal(flat["segment_ids"], exp_seg)
        np.testing.assert_array_equal(flat["positions"], exp_pos)
        w = flat["loss_weights"] > 0
        np.testing.assert_array_equal(flat["targets"][w], [t for t in exp_targets if t is not None])
        # Counting: targets are every token but each document's BOS, each exactly once.
        assert w.sum() == n - len(lane_docs)
        target_counts = np.bincount(flat["targets"][w], minlength=tok.vocab_size)
        stream_counts = np.bincount(stream, minlength=tok.vocab_size)
        stream_counts[tok.bos_id] -= len(lane_docs)
        np.testing.assert_array_equal(target_counts, stream_counts)
        assert target_counts[tok.bos_id] == 0
    # Training rows are full: no padding anywhere.
    assert all((b["segment_ids"] > 0).all() for b in batches)


def test_eval_is_finite_and_pads_the_last_batch(tmp_path, tok):
    texts = write_docs(tmp_path / "d.jsonl", 30, seed=1)
    cfg = DataConfig(sources=[{"type": "jsonl", "path": str(tmp_path / "d.jsonl")}], eval_fraction=0.5, shuffle=False)
    with build_pipeline(cfg, tok, split="eval", seq_len=32, global_batch=4, seed=0) as it:
        batches = list(it)
    decoded, n_docs = [], 0
    for r in range(4):
        flat = {k: np.concatenate([b[k][r] for b in batches]) for k in batches[0]}
        real = flat["segment_ids"] > 0
        stream = flat["tokens"][real]
        n = int((stream == tok.bos_id).sum())
        n_docs += n
        decoded += [tok.decode(d) for d in np.split(stream, np.flatnonzero(stream == tok.bos_id)[1:])]
        # Padding only at the end of the lane, and it carries no loss.
        assert not real[np.argmin(real):].any()
        assert (flat["loss_weights"][~real] == 0).all() and (flat["tokens"][~real] == tok.pad_id).all()
        assert flat["loss_weights"].sum() == real.sum() - n
    assert 5 <= n_docs <= 25  # About half of 30 are held out.
    assert set(decoded) <= set(texts) and len(set(decoded)) == n_docs
    # The last batch still has a real token in some row.
    assert (batches[-1]["segment_ids"] > 0).any()
    # Rebuilt, the eval split gives the same batches.
    with build_pipeline(cfg, tok, split="eval", seq_len=32, global_batch=4, seed=7) as it:
        again = list(it)
    assert len(again) == len(batches)
    for a, b in zip(batches, again):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])

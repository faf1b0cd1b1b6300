"""The corpus classification task's `replace` corruption (label 0: a share of the words replaced by
corpus words drawn by frequency) and held-out sentences from the documents a pretraining run's
data.eval_fraction holds out."""

import random
from collections import Counter

import pytest

from maxtrain.tasks.corpus import _replaced, heldout_documents, sentences, word_order_records


def test_replaced_words_keep_length_and_change_the_share():
    train, held = word_order_records(300, 60, seed=1, corruption="replace", share=0.3)
    assert Counter(r["label"] for r in train) == {1: 150, 0: 150}
    assert all(8 <= len(r["text"].split()) <= 24 for r in train + held)
    rng, vocabulary = random.Random(0), "the a of to is in for list value".split()
    sentence = "return a new list of the keys in the order they were inserted into the dictionary"
    for share, changed in ((0.0, 1), (0.3, 5), (0.5, 8)):
        words = _replaced(rng, sentence, vocabulary, share).split()
        assert len(words) == 16 and sum(a != b for a, b in zip(words, sentence.split())) == changed


def test_held_out_sentences_come_from_the_runs_held_out_documents():
    train, held = word_order_records(200, 100, seed=0, corruption="replace", share=0.3, heldout_fraction=0.05)
    pool = {s[:1].lower() + s[1:].rstrip(".") for s in sentences(heldout_documents(0.05))}
    assert all(r["text"] in pool for r in held if r["label"] == 1)
    assert not {r["text"] for r in train if r["label"] == 1} & pool


def test_unknown_corruption_is_refused():
    with pytest.raises(ValueError, match="corruption"):
        word_order_records(10, 10, corruption="shuffle")

"""Tasks made from the embedded corpus: word order (balanced, same bag of words, held-out
sentences from other documents) and continuations (the label is the true ending)."""

from collections import Counter

from maxtrain.tasks.corpus import continuation_records, heldout_documents, word_order_records


def test_word_order_pairs_differ_only_in_order():
    train, held = word_order_records(400, 100, seed=1)
    assert Counter(r["label"] for r in train) == {1: 200, 0: 200}
    for r in train + held:
        if r["label"] == 1:  # neither end of a sentence as written gives the answer away
            assert not r["text"].endswith(".") and not r["text"][:1].isupper()
    originals = {r["text"] for r in train if r["label"] == 1}
    assert not originals & {r["text"] for r in held}
    swapped = [r["text"].split() for r in train if r["label"] == 0]
    assert all(len(w) >= 8 for w in swapped)


def test_continuations_label_the_true_ending():
    records = continuation_records(40, seed=2)
    held = " ".join(" ".join(d.split()) for d in heldout_documents())
    for r in records:
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        truth = r["choices"][r["label"]]
        assert f"{r['context']} {truth}" in held  # the real sentence, from a held-out document
        lengths = [len(c.split()) for c in r["choices"]]
        assert max(lengths) - min(lengths) <= 4
    assert len({r["label"] for r in records}) == 4  # the answer's place is shuffled

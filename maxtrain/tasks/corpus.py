"""Tasks made from the embedded corpus: word order (classification) and continuations (multiple choice).

Word order: is this sentence in its original word order?

Label 1: a sentence as written; label 0: the same sentence with two of its words swapped.
Both are lower-cased at the start and lose the final period, so neither end gives the
answer away, and both have the same bag of words: only word order tells them apart,
knowledge a language model pretrained on
the corpus has and a randomly initialised one must learn from the labelled examples alone,
which makes the task a measure of transfer (README "Masked-LM pretraining").
Held-out sentences come from other documents than training ones.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np

_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def sentences(texts, *, min_words: int = 8, max_words: int = 24) -> list[str]:
    """Prose sentences of min..max words (no code lines), one line each, in corpus order."""
    out = []
    for text in texts:
        for paragraph in re.split(r"\n\s*\n", text):
            if paragraph.startswith((" ", "\t", ">>>")):
                continue  # indented code and examples
            for s in _SENTENCE.split(" ".join(paragraph.split())):
                words = s.split()
                if min_words <= len(words) <= max_words and s[:1].isupper() and s.endswith("."):
                    out.append(s)
    return out


def _plain(sentence: str) -> str:
    return (sentence[:1].lower() + sentence[1:]).rstrip(".")


def _swapped(rng: random.Random, sentence: str) -> str:
    words = sentence.split()
    while True:
        i, j = rng.sample(range(len(words)), 2)
        if words[i] != words[j]:
            words[i], words[j] = words[j], words[i]
            return " ".join(words)


def _replaced(rng: random.Random, sentence: str, vocabulary: list[str], share: float) -> str:
    words = sentence.split()
    for i in rng.sample(range(len(words)), max(1, round(share * len(words)))):
        while True:
            w = rng.choice(vocabulary)  # drawn by corpus frequency, so a rare word does not give the answer away
            if w != words[i]:
                words[i] = w
                break
    return " ".join(words)


CORRUPTIONS = ("swap", "replace")


def word_order_records(n_train: int, n_eval: int, seed: int = 0, *, corruption: str = "swap", share: float = 0.0,
                       heldout_fraction: float | None = None) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """(train, eval) records {text, label}, balanced; eval sentences come from other documents.

    corruption: `swap` (label 0: two words swapped) or `replace` (label 0: `share` of the words,
    at least one, replaced by words drawn from the split's sentences by frequency, as in ELECTRA's
    replaced-token detection).
    heldout_fraction: eval sentences come from the documents that `data.eval_fraction` at this
    value holds out of a run on the embedded corpus (so a masked LM pretrained with it never saw
    them); None: a random fifth of the documents.
    """
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; choose from {', '.join(CORRUPTIONS)}")
    from maxtrain.data.embedded import embedded_documents

    docs = [text for _, text in embedded_documents()]
    rng = random.Random(seed)
    if heldout_fraction is None:
        rng.shuffle(docs)
        cut = len(docs) // 5  # a fifth of the documents give the held-out sentences
        held, rest = docs[:cut], docs[cut:]
    else:
        held = heldout_documents(heldout_fraction)
        rest = [d for d in docs if d not in set(held)]
    held_out = list(dict.fromkeys(sentences(held)))
    seen = set(held_out)  # a sentence some held-out document shares with a training one stays held out
    pools = {"eval": held_out, "train": [s for s in dict.fromkeys(sentences(rest)) if s not in seen]}
    out = {}
    for split, n in (("train", n_train), ("eval", n_eval)):
        pool = pools[split]
        if len(pool) < n:
            raise ValueError(f"the corpus has {len(pool)} {split} sentences, fewer than {n}")
        picked = rng.sample(pool, n)
        if corruption == "swap":
            corrupt = lambda s: _swapped(rng, s)  # noqa: E731
        else:
            vocabulary = [w for s in pool for w in _plain(s).split()]
            corrupt = lambda s: _replaced(rng, s, vocabulary, share)  # noqa: E731
        out[split] = [{"text": _plain(s), "label": 1} if i % 2 == 0 else {"text": corrupt(_plain(s)), "label": 0}
                      for i, s in enumerate(picked)]  # fmt: skip
    return out["train"], out["eval"]


def write_word_order(out_dir: str | Path, *, train: int, eval: int, seed: int = 0, corruption: str = "swap",
                     share: float = 0.0, heldout_fraction: float | None = None) -> dict[str, Path]:  # fmt: skip
    """Write word_order_train.jsonl / word_order_eval.jsonl under out_dir; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    recs = word_order_records(train, eval, seed, corruption=corruption, share=share, heldout_fraction=heldout_fraction)
    for name, recs in zip(("word_order_train", "word_order_eval"), recs):
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in recs))
    return paths


def heldout_documents(eval_fraction: float = 0.02) -> list[str]:
    """The embedded corpus' documents that data.eval_fraction holds out of training (the demo's)."""
    from maxtrain.data.documents import eval_mask
    from maxtrain.data.sources import EmbeddedDocuments

    src = EmbeddedDocuments()
    return [src[int(i)] for i in np.flatnonzero(eval_mask(src.doc_keys(), eval_fraction))]


def continuation_records(n: int, seed: int = 0, eval_fraction: float = 0.02, choices: int = 4) -> list[dict]:
    """Multiple-choice records {context, choices, label} from the demo's held-out documents.

    The context is a sentence's first half; the choices are its true second half and the
    second halves of other held-out sentences of about the same length (so length alone does
    not give the answer), in a shuffled order. Documents are held out by the same hash as
    data.eval_fraction, so a model pretrained on the embedded corpus never trained on them.
    """
    held = heldout_documents(eval_fraction)
    pool = [s.split() for s in dict.fromkeys(sentences(held, min_words=10, max_words=30))]
    rng = random.Random(seed)
    rng.shuffle(pool)
    records = []
    for words in pool:
        if len(records) == n:
            break
        cut = len(words) // 2
        context, truth = " ".join(words[:cut]), " ".join(words[cut:])
        others = [" ".join(w[len(w) // 2 :]) for w in pool if w is not words and abs(len(w) - len(words)) <= 2]
        others = [o for o in dict.fromkeys(others) if o != truth]
        if len(others) < choices - 1:
            continue
        options = rng.sample(others, choices - 1) + [truth]
        rng.shuffle(options)
        records.append({"context": context, "choices": options, "label": options.index(truth)})
    if len(records) < n:
        raise ValueError(f"the held-out documents give {len(records)} continuation records, fewer than {n}")
    return records

"""Masked-LM pretraining through the real pipeline raises masked-token accuracy, and the
pretrained encoder transfers: finetuned with a new classification layer on a word-order task,
it beats the same finetune from random initialisation at the same step budget.

The task: is a sentence of a small grammar as generated, or were two words of different
categories (determiner, adjective, noun, verb, preposition) swapped? The labelled training
sentences use half of each category's words, the held-out ones the other half: only a model
that learned the categories from unlabelled text (the masked LM) can tell an unseen noun from
an unseen verb."""

import json
import random

import pytest

from maxtrain.cli import main

DET, ADJ = ["the", "a", "every", "some", "this", "that"], ["green", "quick", "small", "heavy", "bright", "old"]
NOUN = ["dog", "parser", "river", "engine", "teacher", "window", "garden", "letter"]
VERB = ["sees", "builds", "moves", "follows", "opens", "paints", "finds", "keeps"]
PREP = ["with", "near", "under", "behind"]
CATEGORY = {w: c for c, ws in enumerate((DET, ADJ, NOUN, VERB, PREP)) for w in ws}


def sentence(rng, half=None):
    """Words of one sentence; half 0 or 1 draws from that half of each category only."""
    pick = (lambda ws: rng.choice(ws)) if half is None else (lambda ws: rng.choice(ws[half::2]))
    words = [pick(DET), pick(ADJ), pick(NOUN), pick(VERB), pick(DET), pick(NOUN)]
    if rng.random() < 0.5:
        words += [pick(PREP), pick(DET), pick(NOUN)]
    return words


def swapped(rng, words):
    """Two words of different categories swapped: the sentence is no longer grammatical."""
    while True:
        i, j = rng.sample(range(len(words)), 2)
        if CATEGORY[words[i]] != CATEGORY[words[j]]:
            words = list(words)
            words[i], words[j] = words[j], words[i]
            return words


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("grammar")
    rng = random.Random(0)
    docs = [". ".join(" ".join(sentence(rng)) for _ in range(8)) for _ in range(300)]
    (d / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    for half, (name, n) in enumerate((("train", 256), ("eval", 200))):
        recs = []
        for i in range(n):
            words = sentence(rng, half)
            recs.append({"text": " ".join(words), "label": 1} if i % 2 == 0 else {"text": " ".join(swapped(rng, words)), "label": 0})
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


COMMON = ["model=tiny-bert", "model.vocab_size=512", "log.every=10", "log.tensorboard=false", "checkpoint.every=0",
          "optimizer.warmup_steps=10"]  # fmt: skip


def _evals(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if any(k.startswith("eval_loss") for k in r)]


@pytest.mark.slow
def test_mlm_pretraining_learns_and_transfers_to_classification(data, tmp_path):
    base = tmp_path / "mlm"
    assert main(["train", *COMMON, f"run_dir={base}", "steps=200", "optimizer.lr=2e-3", "train.objective=masked_lm",
                 "train.seq_len=64", "train.global_batch=16", f"data.sources=[{{type: jsonl, path: '{data}/corpus.jsonl'}}]",
                 "data.eval_fraction=0.1", "data.format={type: mlm}", "data.tokenizer.model_type=bpe",
                 "eval.every=100"]) == 0  # fmt: skip
    evals = _evals(base)
    print("masked-token accuracy", [round(r["eval_accuracy"], 3) for r in evals])
    # A masked word is one of its category's 3-6 words at best (~0.2 accuracy): the model gets near that.
    assert evals[-1]["eval_accuracy"] > evals[0]["eval_accuracy"] + 0.1
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 2.0

    accuracy = {}
    for name, init in (("pretrained", str(base)), ("scratch", "null")):
        run_dir = tmp_path / name
        assert main(["train", *COMMON, f"run_dir={run_dir}", f"init_from={init}", "steps=60", "optimizer.lr=1e-3",
                     "train.objective=classification", "train.seq_len=16", "train.global_batch=32",
                     f"data.sources=[{{type: jsonl, path: '{data}/train.jsonl'}}]", "data.eval_fraction=0",
                     "data.format={type: classification, num_labels: 2}", f"data.tokenizer.path={base}/tokenizer.model",
                     "finetune.classifier={num_labels: 2, pooling: cls}", "eval.every=0",
                     f"eval.sets={{order: [{{type: jsonl, path: '{data}/eval.jsonl'}}]}}"]) == 0  # fmt: skip
        accuracy[name] = _evals(run_dir)[-1]["eval_accuracy/order"]
    print("word-order accuracy", accuracy)
    assert accuracy["pretrained"] > 0.85 and accuracy["pretrained"] > accuracy["scratch"] + 0.25

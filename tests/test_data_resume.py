"""Determinism and exact resumption: same seed same batches; a restored iterator continues
array for array like the uninterrupted run (across epochs, with workers, mixtures, skips)."""

import json

import numpy as np
import pytest

from maxtrain.data import DataConfig, build_pipeline
from maxtrain.errors import UserError

LETTERS = "abcdefghijklmnopqrstuvwxyz"  # the `tok` fixture (conftest) knows these characters


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two JSONL sources (the second with 2 bad lines) small enough that epochs roll over."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for name, n in [("a", 40), ("b", 25)]:
        lines = [json.dumps({"text": name + "".join(rng.choice(list(LETTERS), size=rng.integers(5, 90)))}) for _ in range(n)]
        if name == "b":
            lines[3], lines[11] = json.dumps({"txt": "no field"}), json.dumps({"text": 7})
        (d / f"{name}.jsonl").write_text("\n".join(lines))
    return d


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def config(corpus, **kw):
    sources = [{"type": "jsonl", "path": str(corpus / "a.jsonl"), "weight": 2.0}, {"type": "jsonl", "path": str(corpus / "b.jsonl")}]
    return DataConfig(sources=sources, eval_fraction=0.1, on_bad_record="skip", **kw)


def test_same_seed_same_batches_other_seed_differs(corpus, tok):
    cfg = config(corpus)
    runs = []
    for seed in (3, 3, 4):
        with build_pipeline(cfg, tok, split="train", seq_len=48, global_batch=4, seed=seed) as it:
            runs.append(take(it, 6))
    assert_same(runs[0], runs[1])
    assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(runs[0], runs[2]))


@pytest.mark.parametrize("workers,prefetch", [(0, 0), (0, 3), (2, 2)])
def test_restore_continues_exactly(corpus, tok, workers, prefetch):
    cfg = config(corpus, workers=workers, prefetch=prefetch)
    args = dict(split="train", seq_len=48, global_batch=4, seed=11)
    k, m = 7, 30  # 37 batches of 192 tokens cover several epochs of ~3000 tokens.
    with build_pipeline(cfg, tok, **args) as it:
        head = take(it, k)
        state = json.loads(json.dumps(it.get_state()))  # Must survive JSON.
        skipped_at_k = it.skipped_records
        uninterrupted = head + take(it, m)  # Saving state does not disturb the run.
    assert len(json.dumps(state)) < 2000, "state must stay small"
    with build_pipeline(cfg, tok, **args) as it:
        it.set_state(state)
        assert it.skipped_records == skipped_at_k
        resumed = take(it, m)
        # 2 bad lines in b, ~3 epochs of b read: every skip is counted.
        assert it.skipped_records >= 4
    assert_same(resumed, uninterrupted[k:])


def test_restore_eval_midway_and_at_end(corpus, tok):
    cfg = config(corpus, prefetch=0)
    args = dict(split="eval", seq_len=16, global_batch=2, seed=0)
    with build_pipeline(cfg, tok, **args) as it:
        full = list(it)
        end_state = it.get_state()
    assert len(full) >= 3
    with build_pipeline(cfg, tok, **args) as it:
        take(it, 2)
        state = it.get_state()
    with build_pipeline(cfg, tok, **args) as it:
        it.set_state(state)
        assert_same(list(it), full[2:])
        it.set_state(end_state)
        assert list(it) == []


def test_state_from_other_settings_is_refused(corpus, tok):
    cfg = config(corpus)
    with build_pipeline(cfg, tok, split="train", seq_len=48, global_batch=4, seed=1) as it:
        state = it.get_state()
    with build_pipeline(cfg, tok, split="train", seq_len=32, global_batch=4, seed=1) as it:
        with pytest.raises(UserError, match="different data settings"):
            it.set_state(state)

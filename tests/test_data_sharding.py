"""Per-process shares: 2 and 4 processes together read every document exactly once; local
batches have global_batch // process_count rows; make_global_batch assembles them."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maxtrain.data import DataConfig, build_pipeline, make_global_batch
from maxtrain.errors import UserError

LETTERS = "abcdefghijklmnopqrstuvwxyz"  # the `tok` fixture (conftest) knows these characters


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A text file per document (101 of them: not a multiple of 2 or 4)."""
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(1)
    texts = []
    for i in range(101):
        text = f"doc {i} " + "".join(rng.choice(list(LETTERS), size=rng.integers(3, 60)))
        (d / f"{i:03d}.txt").write_text(text)
        texts.append(text)
    return d, texts


def documents(batches, tok):
    """The documents of packed batches, decoded, in stream order (complete ones only)."""
    stream = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches])
    starts = np.flatnonzero(stream == tok.bos_id)
    pieces = np.split(stream, starts)[1:]
    return [tok.decode(p) for p in pieces if p[-1] == tok.eos_id]


@pytest.mark.parametrize("process_count", [2, 4])
def test_shares_cover_the_data_exactly_once(corpus, tok, process_count):
    d, texts = corpus
    cfg = DataConfig(sources=[{"type": "text", "path": str(d / "*.txt")}], eval_fraction=0.2)
    eval_docs, train_docs = [], []
    for p in range(process_count):
        kw = dict(seq_len=32, global_batch=8, seed=5, process_index=p, process_count=process_count)
        with build_pipeline(cfg, tok, split="eval", **kw) as it:
            batches = list(it)
        assert all(b["tokens"].shape == (8 // process_count, 32) for b in batches)
        eval_docs += documents(batches, tok)
        with build_pipeline(cfg, tok, split="train", **kw) as it:
            batches = [next(it) for _ in range(60)]
        train_docs.append(documents(batches, tok))
    n_eval = len(eval_docs)
    assert 10 <= n_eval <= 35 and len(set(eval_docs)) == n_eval
    n_train = len(texts) - n_eval
    # A train epoch is shared out round-robin: process p's first epoch is its first
    # len(range(p, n_train, process_count)) documents.
    first_epoch = [doc for p, docs in enumerate(train_docs) for doc in docs[: len(range(p, n_train, process_count))]]
    assert sorted(first_epoch + eval_docs) == sorted(texts)


def test_global_batch_must_divide(corpus, tok):
    d, _ = corpus
    cfg = DataConfig(sources=[{"type": "text", "path": str(d / "*.txt")}])
    with pytest.raises(UserError, match="not divisible by the 3 processes"):
        build_pipeline(cfg, tok, split="train", seq_len=32, global_batch=8, seed=0, process_index=0, process_count=3)


def test_make_global_batch_shards_over_batch_axes(corpus, tok):
    d, _ = corpus
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    cfg = DataConfig(sources=[{"type": "text", "path": str(d / "*.txt")}])
    with build_pipeline(cfg, tok, split="train", seq_len=32, global_batch=16, seed=0) as it:
        local = next(it)
    batch = make_global_batch(local, sharding)
    assert set(batch) == {"tokens", "targets", "loss_weights", "segment_ids", "positions"}
    for k, v in batch.items():
        assert v.shape == (16, 32) and v.dtype == local[k].dtype and v.sharding == sharding
        assert len(v.addressable_shards) == 8 and v.addressable_shards[0].data.shape == (2, 32)
        np.testing.assert_array_equal(np.asarray(v), local[k])

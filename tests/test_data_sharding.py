"""Global batches: 1, 2 and 4 processes build the same global batches (each its own rows),
a data position saved by one process count resumes on another, worker processes change
nothing; make_global_batch assembles the local rows."""

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


def local_batches(cfg, tok, split, n, process_index=0, process_count=1, state=None, **kw):
    """Up to n batches of one process (all of a finite split when n is None), optionally resumed from `state`."""
    args = dict(seq_len=32, global_batch=8, seed=5, process_index=process_index, process_count=process_count, **kw)
    with build_pipeline(cfg, tok, split=split, **args) as it:
        if state is not None:
            it.set_state(state)
        batches = list(it) if n is None else [next(it) for _ in range(n)]
        return batches, it.get_state()


def assemble(per_process, rows_each):
    """Global batches from each process's local batches (a process that ran out adds padding rows)."""
    count = max(map(len, per_process))
    out = []
    for t in range(count):
        parts = [p[t] if t < len(p) else {k: np.zeros_like(v) for k, v in per_process[0][0].items()} for p in per_process]
        out.append({k: np.concatenate([part[k] for part in parts]) for k in parts[0]})
        assert all(part["tokens"].shape[0] == rows_each for part in parts)
    return out


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("process_count", [2, 4])
def test_global_batches_do_not_depend_on_the_process_count(corpus, tok, process_count):
    d, texts = corpus
    cfg = DataConfig(sources=[{"type": "text", "path": str(d / "*.txt")}], eval_fraction=0.2)
    for split, n in (("train", 25), ("eval", None)):  # 25 train batches: more than one epoch
        whole, _ = local_batches(cfg, tok, split, n)
        parts = [local_batches(cfg, tok, split, n, p, process_count)[0] for p in range(process_count)]
        assert_batches_equal(assemble(parts, 8 // process_count), whole)
    # The eval split is every held-out document exactly once.
    stream = np.concatenate([b["tokens"][r][b["segment_ids"][r] > 0] for r in range(8) for b in whole])
    eval_docs = documents([{"tokens": stream[None], "segment_ids": np.ones((1, len(stream)), np.int32)}], tok)
    assert 10 <= len(eval_docs) <= 35 and len(set(eval_docs)) == len(eval_docs) and set(eval_docs) <= set(texts)


@pytest.mark.parametrize("saved_by, resumed_by", [(2, 1), (1, 4), (4, 2)])
def test_data_position_moves_across_process_counts(corpus, tok, saved_by, resumed_by):
    d, _ = corpus
    cfg = DataConfig(sources=[{"type": "text", "path": str(d / "*.txt")}], eval_fraction=0.2)
    uninterrupted, _ = local_batches(cfg, tok, "train", 12)
    states = [local_batches(cfg, tok, "train", 7, p, saved_by)[1] for p in range(saved_by)]  # a checkpoint's list
    parts = []
    for p in range(resumed_by):
        batches, _ = local_batches(cfg, tok, "train", 12, p, resumed_by, state=states)
        parts.append(batches[:5])
    assert_batches_equal(assemble(parts, 8 // resumed_by), uninterrupted[7:12])


def test_worker_processes_give_the_same_batches(corpus, tok):
    d, _ = corpus
    cfg = DataConfig(sources=[{"type": "text", "path": str(d / "*.txt")}])
    inline, state = local_batches(cfg, tok, "train", 6)
    pooled, pooled_state = local_batches(cfg.model_copy(update={"workers": 2}), tok, "train", 6)
    assert_batches_equal(pooled, inline)
    assert pooled_state == state


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

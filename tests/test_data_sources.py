"""Each source format yields exactly its documents; file:// URLs go through fsspec; the
embedded corpus is real text of useful size; mixtures follow their weights."""

import json

import numpy as np
import pytest

from maxtrain.data import DataConfig, build_pipeline
from maxtrain.data.prepare import prepare_corpus
from maxtrain.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from maxtrain.errors import UserError

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEXTS = [f"document {LETTERS[i % 26] * (i % 7 + 1)} number {i}" for i in range(23)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    model = train_sentencepiece([LETTERS * 3 + " 0123456789"] * 50, vocab_size=64, model_type="char")
    path = tmp_path_factory.mktemp("tok") / "char.model"
    path.write_bytes(model)
    return SentencePieceTokenizer(model), str(path)


def first_epoch(source, tok, n_docs, **kw):
    """Decoded documents of the first epoch of a train split (no shuffle, nothing held out)."""
    cfg = DataConfig(sources=[source], eval_fraction=0.0, shuffle=False, **kw)
    with build_pipeline(cfg, tok, split="train", seq_len=64, global_batch=1, seed=0) as it:  # one lane: file order
        docs = []
        while len(docs) < n_docs:
            b = next(it)
            docs.append(b["tokens"][b["segment_ids"] > 0])
    stream = np.concatenate(docs)
    pieces = np.split(stream, np.flatnonzero(stream == tok.bos_id))[1 : n_docs + 1]
    return [tok.decode(p) for p in pieces]


def test_text_per_file_and_blank_lines(tmp_path, tok):
    for i, t in enumerate(TEXTS):
        (tmp_path / f"{i:02d}.txt").write_text(t + "\n")
    assert first_epoch({"type": "text", "path": str(tmp_path / "*.txt")}, tok[0], 23) == TEXTS
    (tmp_path / "para.md").write_text("\n\n".join(TEXTS[:10]) + "\n \n\n" + "\r\n\r\n".join(TEXTS[10:]))
    assert first_epoch({"type": "text", "path": str(tmp_path / "para.md"), "documents": "blank_lines"}, tok[0], 23) == TEXTS


def test_jsonl_and_file_url(tmp_path, tok):
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:12]) + "\n\n")
    (tmp_path / "b.jsonl").write_text("\n".join(lines[12:]))
    assert first_epoch({"type": "jsonl", "path": str(tmp_path / "*.jsonl")}, tok[0], 23) == TEXTS
    url = f"file://{tmp_path}/*.jsonl"  # Remote paths go through fsspec.
    assert first_epoch({"type": "jsonl", "path": url}, tok[0], 23) == TEXTS


def test_parquet_over_row_groups(tmp_path, tok):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": TEXTS[:15], "n": list(range(15))}), tmp_path / "a.parquet", row_group_size=4)
    pq.write_table(pa.table({"body": TEXTS[15:], "n": list(range(8))}), tmp_path / "b.parquet")
    assert first_epoch({"type": "parquet", "path": str(tmp_path / "*.parquet"), "column": "body"}, tok[0], 23) == TEXTS
    with pytest.raises(UserError, match="has no column 'text'"):
        first_epoch({"type": "parquet", "path": str(tmp_path / "*.parquet")}, tok[0], 1)


def test_array_record_raw_and_prepared(tmp_path, tok):
    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(str(tmp_path / "raw.array_record"), "group_size:1")
    for t in TEXTS:
        w.write(t.encode())
    w.close()
    assert first_epoch({"type": "array_record", "path": str(tmp_path / "raw.array_record")}, tok[0], 23) == TEXTS
    # Prepared: tokenized by 2 worker processes into 3 shards; doc i lands in shard i % 3.
    (tmp_path / "src.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    manifest = prepare_corpus(DataConfig(sources=[{"type": "jsonl", "path": str(tmp_path / "src.jsonl")}]).sources[0],
                              tok[1], str(tmp_path / "prep"), shards=3, workers=2, progress=False)
    assert manifest["documents"] == 23 and manifest["tokens"] == sum(len(tok[0].encode(t)) for t in TEXTS)
    order = [TEXTS[i] for s in range(3) for i in range(s, 23, 3)]
    assert first_epoch({"type": "array_record", "path": str(tmp_path / "prep/*.array_record")}, tok[0], 23) == order


def test_embedded_corpus_is_real_text():
    from maxtrain.data.embedded import embedded_documents
    from maxtrain.data.sources import EmbeddedDocuments

    docs = embedded_documents()
    assert len(docs) > 500 and sum(len(t) for _, t in docs) > 1_500_000
    assert docs == embedded_documents()  # Deterministic (the second read comes from the cache).
    names = [n for n, _ in docs]
    assert any(n.startswith("topic:") for n in names) and "module:json/__init__.py" in names
    assert not any("/test/" in n or n.startswith("module:idlelib") for n in names)
    src = EmbeddedDocuments()
    assert len(set(src.doc_keys().tolist())) == len(src)  # Distinct ids for the eval split.


def test_mixture_follows_weights(tmp_path, tok):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": "a" * (i % 5 + 1)}) for i in range(50)))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": "b" * (i % 5 + 1)}) for i in range(7)))
    cfg = DataConfig(sources=[{"type": "jsonl", "path": str(tmp_path / "a.jsonl"), "weight": 3.0},
                              {"type": "jsonl", "path": str(tmp_path / "b.jsonl"), "weight": 1.0}], eval_fraction=0.0)
    with build_pipeline(cfg, tok[0], split="train", seq_len=128, global_batch=4, seed=0) as it:
        stream = np.concatenate([next(it)["tokens"].reshape(-1) for _ in range(25)])
    # sentencepiece starts a text with the "▁" piece; the letter comes right after it.
    firsts = stream[np.flatnonzero(stream[:-2] == tok[0].bos_id) + len(tok[0].encode("a"))]
    a, b = (firsts == tok[0].encode("a")[-1]).sum(), (firsts == tok[0].encode("b")[-1]).sum()
    assert a + b > 2000
    # Weights are proportions of documents: 3:1 means 0.75 of them from a, within 0.01.
    assert abs(a / (a + b) - 0.75) < 0.01


@pytest.mark.parametrize("unit", ["documents", "tokens"])
def test_mixture_weights_in_documents_or_tokens(tmp_path, tok, unit):
    """Equal weights: `documents` draws as many short (a, ~4 tokens) as long (b, ~40) documents;
    `tokens` draws as many tokens of each, whatever their document lengths."""
    rng = np.random.default_rng(0)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": "a" * int(rng.integers(1, 6))}) for _ in range(300)))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": "b" * int(rng.integers(20, 60))}) for _ in range(300)))
    cfg = DataConfig(sources=[{"type": "jsonl", "path": str(tmp_path / "a.jsonl")},
                              {"type": "jsonl", "path": str(tmp_path / "b.jsonl")}], eval_fraction=0.0, mixture_unit=unit)
    a_id, b_id = tok[0].encode("a")[-1], tok[0].encode("b")[-1]
    with build_pipeline(cfg, tok[0], split="train", seq_len=128, global_batch=8, seed=0) as it:
        stream = np.concatenate([next(it)["tokens"].reshape(-1) for _ in range(60)])
    docs = stream[np.flatnonzero(stream[:-2] == tok[0].bos_id) + len(tok[0].encode("a"))]
    a_docs, b_docs = (docs == a_id).sum(), (docs == b_id).sum()
    # A document's tokens: its letters plus BOS and EOS.
    a_tokens, b_tokens = (stream == a_id).sum() + 2 * a_docs, (stream == b_id).sum() + 2 * b_docs
    assert a_tokens + b_tokens > 40_000
    if unit == "documents":
        assert abs(a_docs / (a_docs + b_docs) - 0.5) < 0.02  # the tokens follow document lengths: ~4 : ~40
        assert a_tokens / (a_tokens + b_tokens) < 0.15
    else:  # mean lengths are measured on 256 documents at start-up, hence a few percent
        assert abs(a_tokens / (a_tokens + b_tokens) - 0.5) < 0.03


def test_hf_datasets_streaming(tmp_path, tok):
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="needs the Hugging Face `datasets` package; pip install datasets"):
            first_epoch({"type": "hf", "name": "json"}, tok[0], 1)
        return
    (tmp_path / "h.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    src = {"type": "hf", "name": "json", "data_files": str(tmp_path / "h.jsonl")}
    assert first_epoch(src, tok[0], 23) == TEXTS
    cfg = DataConfig(sources=[src], eval_fraction=0.3)
    args = dict(split="train", seq_len=32, global_batch=2, seed=1)
    with build_pipeline(cfg, tok[0], **args) as it:
        head = [next(it) for _ in range(9)]
        state = it.get_state()
        tail = [next(it) for _ in range(9)]
    with build_pipeline(cfg, tok[0], **args) as it:
        it.set_state(state)
        for want in tail:
            got = next(it)
            np.testing.assert_array_equal(got["tokens"], want["tokens"])
    assert head

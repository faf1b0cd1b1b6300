"""Tokenizers: trained on the embedded corpus fast and cached; the CLI commands train and
prepare; special ids are fixed; unigram entropy is the entropy of the targets."""

import argparse
import json
import time

import numpy as np
import pytest

from maxtrain.data import DataConfig, build_pipeline, build_tokenizer, unigram_entropy
from maxtrain.data.commands import register_commands
from maxtrain.data.tokenizer import load_tokenizer
from maxtrain.errors import UserError


def cli(argv):
    parser = argparse.ArgumentParser(prog="maxtrain")
    register_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_embedded_bpe_4096_trains_fast_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MAXTRAIN_CACHE", str(tmp_path))
    start = time.perf_counter()
    tok = build_tokenizer(DataConfig(), vocab_size=4096)
    first = time.perf_counter() - start
    start = time.perf_counter()
    again = build_tokenizer(DataConfig(), vocab_size=4096)
    second = time.perf_counter() - start
    assert first < 60 and second < first and second < 5, (first, second)
    assert again.identity == tok.identity and len(list((tmp_path / "tokenizers").glob("*.model"))) == 1
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (4096, 0, 2, 3)
    text = "Return the absolute value of the argument; raise ValueError (Ünïcode ok)."
    ids = tok.encode(text)
    assert tok.decode(ids) == text and max(ids) < 4096
    assert len(ids) < len(text) / 2.5  # A real subword vocabulary, not bytes.
    with pytest.raises(UserError, match="tokenizer has 4096 pieces but model.vocab_size is 1000"):
        build_tokenizer(DataConfig(tokenizer={"path": str(next((tmp_path / "tokenizers").glob("*.model")))}), vocab_size=1000)


def test_cli_tokenizer_train_each_model_type(tmp_path, capsys):
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa"]
    rng = np.random.default_rng(0)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"body": " ".join(rng.choice(words, 12))}) for _ in range(300)))
    for model_type, size in [("bpe", 300), ("unigram", 300), ("char", 40)]:
        out = tmp_path / f"{model_type}.model"
        assert cli(["tokenizer", "train", "--input", str(tmp_path / "*.jsonl"), "--field", "body",
                    "--vocab-size", str(size), "--model-type", model_type, "--out", str(out)]) == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        tok = load_tokenizer(str(out))
        # A char model (byte fallback: 4 special + <mask> + 256 byte pieces) asked for fewer pieces than
        # that gets one piece per character seen.
        expected = size if model_type != "char" else 4 + 1 + 256 + len(set(" ".join(words)))
        assert report["identity"] == tok.identity and tok.vocab_size <= expected
        assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
        assert tok.decode(tok.encode("gamma delta")) == "gamma delta"
        assert tok.decode(tok.encode("  gamma\n\tdelta  ")) == "  gamma\n\tdelta  "
    with pytest.raises(UserError, match="no file matches"):
        cli(["tokenizer", "train", "--input", str(tmp_path / "none*.txt"), "--vocab-size", "300", "--out", str(tmp_path / "x.model")])


def test_cli_prepare_then_train_on_prepared_equals_raw(tmp_path, capsys):
    texts = [f"document number {i} says hello {'x' * (i % 9)}" for i in range(40)]
    (tmp_path / "raw").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "raw" / f"{i:02d}.txt").write_text(t)
    model = tmp_path / "t.model"
    cli(["tokenizer", "train", "--input", str(tmp_path / "raw/*.txt"), "--vocab-size", "300", "--out", str(model)])
    assert cli(["data", "prepare", "--input", str(tmp_path / "raw/*.txt"), "--tokenizer", str(model),
                "--out", str(tmp_path / "prep"), "--shards", "1", "--workers", "0", "--quiet"]) == 0
    manifest = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tok = load_tokenizer(str(model))
    # Text sources strip each document ("says hello " loses its space); the tokenizer keeps spaces.
    assert manifest["documents"] == 40 and manifest["tokens"] == sum(len(tok.encode(t.strip())) for t in texts)
    raw = DataConfig(sources=[{"type": "text", "path": str(tmp_path / "raw/*.txt")}], eval_fraction=0.0, shuffle=False)
    prep = DataConfig(sources=[{"type": "array_record", "path": str(tmp_path / "prep/*.array_record")}], eval_fraction=0.0, shuffle=False)
    kw = dict(split="train", seq_len=32, global_batch=2, seed=0)
    with build_pipeline(raw, tok, **kw) as a, build_pipeline(prep, tok, **kw) as b:
        for _ in range(5):
            x, y = next(a), next(b)
            for k in x:
                np.testing.assert_array_equal(x[k], y[k])
    # Prepared ids only make sense with their tokenizer; refusing beats training on garbage.
    other = tmp_path / "o.model"
    cli(["tokenizer", "train", "--input", str(tmp_path / "raw/*.txt"), "--vocab-size", "40", "--model-type", "char", "--out", str(other)])
    with pytest.raises(UserError, match="was prepared with tokenizer sp:.* but the run uses sp:"):
        build_pipeline(prep, load_tokenizer(str(other)), **kw)
    with pytest.raises(UserError, match="already holds prepared data"):
        cli(["data", "prepare", "--input", str(tmp_path / "raw/*.txt"), "--tokenizer", str(model), "--out", str(tmp_path / "prep"), "--quiet"])


def test_unigram_entropy_matches_direct_count(tmp_path):
    from maxtrain.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

    tok = SentencePieceTokenizer(train_sentencepiece(["abcd " * 20] * 10, vocab_size=16, model_type="char"))
    texts = ["aaaa", "abab", "abcd", "dddd", "cab"] * 8
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    cfg = DataConfig(sources=[{"type": "jsonl", "path": str(tmp_path / "d.jsonl")}], eval_fraction=0.0)
    counts = np.zeros(tok.vocab_size)
    for t in texts:
        np.add.at(counts, tok.encode(t) + [tok.eos_id], 1)  # Targets: every token after BOS.
    p = counts[counts > 0] / counts.sum()
    expected = float(-(p * np.log(p)).sum())
    got = unigram_entropy(cfg, tok, split="train", max_tokens=int(counts.sum()))
    assert abs(got - expected) < 0.02, (got, expected)


def test_hf_tokenizer_json_behind_the_same_interface(tmp_path):
    path = tmp_path / "tokenizer.json"
    cfg = DataConfig(tokenizer={"path": str(path), "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers
    except ImportError:
        path.write_text("{}")
        with pytest.raises(UserError, match="needs the `tokenizers` package; pip install tokenizers"):
            build_tokenizer(cfg, vocab_size=64)
        return
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", "hello", "world"])}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(path))
    tok = build_tokenizer(cfg, vocab_size=64)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (6, 0, 2, 3) and tok.identity.startswith("hf:")
    assert tok.encode("hello world hello") == [4, 5, 4] and tok.decode([4, 5]) == "hello world"
    with pytest.raises(UserError, match="set data.tokenizer.bos_token and eos_token"):
        build_tokenizer(DataConfig(tokenizer={"path": str(path)}), vocab_size=64)

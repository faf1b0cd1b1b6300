"""Every tokenizer maxtrain trains is lossless: decode(encode(x)) == x for code, tabs, CRLF,
CJK, emoji, control characters, runs of spaces and random unicode; a loaded model that is not
gets one warning with the share of documents it loses, and one that turns text into <unk>
(no byte fallback) is a UserError."""

import hashlib
import json
import io
import logging

import numpy as np
import pytest

from maxtrain.data.embedded import embedded_documents
from maxtrain.data.tokenizer import (
    SentencePieceTokenizer,
    check_lossless,
    load_tokenizer,
    roundtrip_failures,
    train_sentencepiece,
    trained_tokenizer,
    training_sentences,
)
from maxtrain.errors import UserError

SAMPLES = [
    "def f(x):\n    if x:\n        return  1\n",
    "class A:\n\tdef g(self):\n\t\treturn '\\t'  # tab-indented\n\n\n",
    "line one\r\nline two\r\n\r\nend without newline",
    "lone\rcarriage\rreturns\r",
    "   leading and trailing spaces   ",
    "\n\nleading newlines, trailing tab\t",
    " ", "\n", "\r\n", "\t \t", "",
    "多くの言語で書かれた文章。中文也可以。한국어도 됩니다.",
    "emoji 😀🎉 family 👩‍👩‍👧 flag 🇯🇵 keycap 1️⃣",
    "control \x00 NUL \x01\x02\x07 bell \x1b[31mred\x1b[0m \x7f del \x08",
    "a" + " " * 40 + "b" + "\t" * 9 + "c" + " \n " * 5,
    "ﬁ ligature, Ångström, e\u0301 combining, full-width ＡＢＣ１２３, nbsp\u00a0, zero-width\u200b, bom\ufeff",
    "unicode breaks\u2028line sep\u2029para sep\x85nel\x0bvt\x0cff\x1cfs",
    "numbers 3.14159 and 1,000,000 and 0x1F600",
]
# A training corpus with the samples' shapes; the random strings below are never trained on.
TRAIN_DOCS = [f"# document {i}\n" + s + SAMPLES[i % len(SAMPLES)] * 2 for i in range(30) for s in SAMPLES]
# Code point ranges for random strings (no surrogates: they are not UTF-8).
RANGES = [(0x00, 0x20), (0x20, 0x7F), (0x80, 0x250), (0x370, 0x530), (0x2000, 0x2070), (0x3040, 0x3100),
          (0x4E00, 0xA000), (0xAC00, 0xD7A4), (0xE000, 0xE100), (0x1F300, 0x1FAD0), (0x10000, 0x110000)]  # fmt: skip


def random_strings(n: int, seed: int) -> list[str]:
    """`n` strings of 0-60 code points from RANGES, with whitespace runs mixed in."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.integers(0, 60)):
            if rng.random() < 0.15:
                chars.append(str(rng.choice([" ", "\n", "\t", "\r\n", "\r"])) * int(rng.integers(1, 9)))
            else:
                lo, hi = RANGES[rng.integers(len(RANGES))]
                chars.append(chr(int(rng.integers(lo, hi))))
        out.append("".join(chars))
    return out


@pytest.fixture(scope="module")
def models():
    sentences = list(training_sentences(TRAIN_DOCS, 100_000))
    return {mt: SentencePieceTokenizer(train_sentencepiece(sentences, vocab_size=size, model_type=mt))
            for mt, size in [("bpe", 400), ("unigram", 400), ("char", 64)]}  # fmt: skip


def lossy_model(tmp_path, **settings) -> str:
    """Path of a sentencepiece model trained with sentencepiece's own (lossy) defaults."""
    import sentencepiece as spm

    out = io.BytesIO()
    lines = [line.strip() for d in TRAIN_DOCS for line in d.splitlines() if line.strip() and line.isascii()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, vocab_size=settings.pop("vocab_size", 500),
                                   pad_id=0, unk_id=1, bos_id=2, eos_id=3, hard_vocab_limit=False, minloglevel=2, **settings)  # fmt: skip
    path = tmp_path / "lossy.model"
    path.write_bytes(out.getvalue())
    return str(path)


@pytest.mark.parametrize("model_type", ["bpe", "unigram", "char"])
def test_every_sample_and_random_string_round_trips_exactly(models, model_type):
    tok = models[model_type]
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3) and tok.byte_fallback
    texts = SAMPLES + TRAIN_DOCS[:40] + random_strings(300, seed=0)
    for text in texts:
        ids = tok.encode(text)
        assert tok.unk_id not in ids and all(0 <= i < tok.vocab_size for i in ids), repr(text)
        assert tok.decode(ids) == text, repr(text)
    # Decoding is concatenation: prompt and reply encoded apart decode to their joined text.
    for a, b in zip(texts[:100], texts[100:200]):
        assert tok.decode(tok.encode(a) + tok.encode(b)) == a + b
    assert roundtrip_failures(tok, texts) == (0, 256)  # the check reads 256 documents by default


def test_learned_pieces_cover_newlines_and_indentation(models):
    pieces = {models["bpe"].decode([i]) for i in range(models["bpe"].vocab_size)}
    assert {"\n", "\t", "\r\n", "    "} <= pieces  # learned from the data, not bytes
    tok = models["bpe"]
    pieces = [tok.decode([i]) for i in tok.encode(SAMPLES[0])]
    assert "    " in pieces and "        " in pieces  # an indentation is one token, not 4 or 8


def test_training_chunks_keep_every_character_and_count_lines():
    docs = ["a\n\n  b  \r\nc", "x" * 9000 + "\ny\n", "\n\n"]
    chunks = list(training_sentences(docs, 100))
    assert "".join(chunks) == "".join(docs) and max(map(len, chunks)) <= 4000
    assert "".join(training_sentences(docs, 2)) == "a\n\n"  # `limit` counts lines, blank ones too


def test_char_model_is_one_token_per_character_and_bpe_compresses():
    docs = [t for _, t in embedded_documents()]
    train, held_out = docs[:80], docs[80:160]
    chars = sum(map(len, held_out))
    ratios = {}
    for mt, size in [("char", 64), ("bpe", 1024)]:
        tok = SentencePieceTokenizer(train_sentencepiece(training_sentences(train, 100_000), vocab_size=size, model_type=mt))
        ratios[mt] = sum(len(tok.encode(d)) for d in held_out) / chars
        assert all(tok.decode(tok.encode(d)) == d for d in held_out)
    assert 0.9 <= ratios["char"] <= 1.2 and ratios["bpe"] < 0.5, ratios


def test_old_cached_models_are_not_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("MAXTRAIN_CACHE", str(tmp_path))
    sentences = list(training_sentences(TRAIN_DOCS, 100_000))
    h = hashlib.sha256(b"v1|500|bpe")  # the key of maxtrain's lossy models
    for s in sentences:
        h.update(s.encode() + b"\n")
    (tmp_path / "tokenizers").mkdir()
    old = tmp_path / "tokenizers" / f"bpe-500-{h.hexdigest()[:16]}.model"
    old.write_bytes(open(lossy_model(tmp_path, model_type="bpe", byte_fallback=True), "rb").read())
    tok = trained_tokenizer(sentences, vocab_size=500, model_type="bpe")
    assert tok.decode(tok.encode(SAMPLES[0])) == SAMPLES[0]
    assert len(list((tmp_path / "tokenizers").glob("*.model"))) == 2


def test_lossy_loaded_model_warns_once_with_the_share(tmp_path, models, caplog):
    path = lossy_model(tmp_path, byte_fallback=True)  # nmt_nfkc, folded whitespace, dummy prefix
    tok = load_tokenizer(path)
    docs = ["plain words here"] * 3 + ["def f(x):\n    return  1"]
    with caplog.at_level(logging.WARNING, logger="maxtrain.data"):
        assert check_lossless(tok, docs, where=path) == 0.25
        assert check_lossless(models["bpe"], docs, where="trained") == 0.0
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert f"tokenizer {path} is lossy: 1 of 4 sampled documents (25.0%)" in msg and "maxtrain tokenizer train" in msg
    assert "'\\n    return  1' became ' return 1'" in msg


def test_no_byte_fallback_model_on_unencodable_text_is_a_user_error(tmp_path):
    path = lossy_model(tmp_path, model_type="char", vocab_size=200, byte_fallback=False, character_coverage=1.0)
    tok = load_tokenizer(path)
    assert not tok.byte_fallback
    code = SAMPLES[0]  # the characters it was trained on
    assert check_lossless(tok, [code], where=path) == 1.0  # lossy (newlines): a warning, no error
    with pytest.raises(UserError, match=rf"tokenizer {path} has no byte fallback and cannot encode 'Ω' .* `maxtrain tokenizer train`") as e:
        check_lossless(tok, [code, "Ω" + code], where=path)
    assert len(str(e.value).splitlines()) == 1


def test_hf_tokenizer_that_drops_text_only_warns(tmp_path, caplog):
    tokenizers = pytest.importorskip("tokenizers")
    from maxtrain.data.tokenizer import HFTokenizer

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", "hello", "world"])}
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = HFTokenizer(hf.to_str(), bos="<s>", eos="</s>", pad="<pad>")
    with caplog.at_level(logging.WARNING, logger="maxtrain.data"):
        assert check_lossless(tok, ["hello world", "hello  there"], where="tokenizer.json") == 0.5
    assert len(caplog.records) == 1 and "1 of 2 sampled documents (50.0%)" in caplog.records[0].getMessage()


def test_a_run_with_such_a_tokenizer_stops_before_writing_anything(tmp_path, capsys):
    from maxtrain.cli import main

    path = lossy_model(tmp_path, model_type="char", vocab_size=200, byte_fallback=False, character_coverage=1.0)
    (tmp_path / "data.jsonl").write_text(json.dumps({"text": "Ω " + SAMPLES[0]}) + "\n")
    run_dir = tmp_path / "run"
    code = main(["train", "model=tiny-llama", f"run_dir={run_dir}", f"data.tokenizer.path={path}",
                 f"data.sources=[{{type: jsonl, path: '{tmp_path}/data.jsonl'}}]", "data.eval_fraction=0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "has no byte fallback and cannot encode 'Ω'" in err, err
    assert not run_dir.exists()

"""Tokenizers behind one small interface: sentencepiece models (trained here or loaded) and,
optionally, Hugging Face tokenizer.json files.

Sentencepiece models trained by maxtrain use fixed special ids: pad=0, unk=1, bos=2, eos=3,
with byte fallback for bpe/unigram so no text is ever unknown. A loaded model keeps its own
ids; if it has no pad piece, id 0 is used as pad (padding is always masked out of the loss).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from typing import Iterable, Iterator, Protocol

from maxtrain.data.files import cache_dir, is_remote, read_bytes
from maxtrain.errors import UserError

log = logging.getLogger("maxtrain.data")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# The sentencepiece trainer skips longer lines; we cut instead, so no text is wasted.
_MAX_SENTENCE_CHARS = 4000


class Tokenizer(Protocol):
    """What the pipeline and the trainer need from a tokenizer."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    identity: str  # Short and stable, e.g. "sp:1a2b3c4d5e6f"; recorded in checkpoints.

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class SentencePieceTokenizer:
    """A sentencepiece model; picklable (as its serialized bytes) for worker processes."""

    def __init__(self, model_bytes: bytes, *, where: str = "sentencepiece model"):
        import sentencepiece as spm

        self._bytes = model_bytes
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        except (RuntimeError, TypeError) as e:
            raise UserError(f"{where} is not a sentencepiece model ({e}); pass a .model file") from None
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise UserError(f"{where} has no BOS or EOS piece; train it with bos_id and eos_id set (e.g. 2 and 3)")
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else 0
        self.identity = "sp:" + hashlib.sha256(model_bytes).hexdigest()[:12]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS (the packer adds them per document)."""
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special pieces decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def __getstate__(self):
        return {"model_bytes": self._bytes}

    def __setstate__(self, state):
        self.__init__(state["model_bytes"])


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json (needs the `tokenizers` package)."""

    def __init__(self, json_text: str, *, bos: str | None, eos: str | None, pad: str | None, where: str = "tokenizer.json"):
        try:
            from tokenizers import Tokenizer as _HF  # Lazy: an optional extra.
        except ImportError:
            raise UserError(f"{where} needs the `tokenizers` package; pip install tokenizers (or use a sentencepiece .model)") from None
        self._json = json_text
        self._names = (bos, eos, pad)
        self._tok = _HF.from_str(json_text)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        ids = [self._tok.token_to_id(n) if n else None for n in self._names]
        if ids[0] is None or ids[1] is None:
            raise UserError(f"{where}: set data.tokenizer.bos_token and eos_token to tokens it contains (e.g. '<s>', '</s>')")
        self.bos_id, self.eos_id = ids[0], ids[1]
        self.pad_id = ids[2] if ids[2] is not None else 0
        self.identity = "hf:" + hashlib.sha256(json_text.encode()).hexdigest()[:12]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`."""
        return self._tok.decode([int(i) for i in ids])

    def __getstate__(self):
        return {"json_text": self._json, "names": self._names}

    def __setstate__(self, state):
        bos, eos, pad = state["names"]
        self.__init__(state["json_text"], bos=bos, eos=eos, pad=pad)


def load_tokenizer(path: str, *, bos: str | None = None, eos: str | None = None, pad: str | None = None) -> Tokenizer:
    """The tokenizer stored at `path`: a sentencepiece .model, or a tokenizer.json."""
    if not is_remote(path) and not os.path.isfile(os.path.expanduser(path)):
        raise UserError(f"tokenizer {path!r} does not exist; fix data.tokenizer.path or train one with `maxtrain tokenizer train`")
    data = read_bytes(os.path.expanduser(path) if not is_remote(path) else path)
    if path.endswith(".json"):
        return HFTokenizer(data.decode("utf-8"), bos=bos, eos=eos, pad=pad, where=path)
    return SentencePieceTokenizer(data, where=path)


def training_sentences(texts: Iterable[str], limit: int) -> Iterator[str]:
    """Non-blank lines of `texts`, cut to the trainer's maximum length, at most `limit` of them."""
    n = 0
    for text in texts:
        for line in text.splitlines():
            line = line.strip()
            while line and n < limit:
                yield line[:_MAX_SENTENCE_CHARS]
                line = line[_MAX_SENTENCE_CHARS:]
                n += 1
            if n >= limit:
                return


def train_sentencepiece(sentences: Iterable[str], *, vocab_size: int, model_type: str) -> bytes:
    """Serialized bytes of a sentencepiece model trained on `sentences`.

    Special ids are pad=0, unk=1, bos=2, eos=3. bpe/unigram get byte fallback (256 byte
    pieces), so they need vocab_size >= ~300; char models may end up smaller than asked.
    """
    import sentencepiece as spm

    sentences = list(sentences)
    if not sentences:
        raise UserError("no text to train the tokenizer on; point the sources (or --input) at text")
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=out, vocab_size=vocab_size, model_type=model_type,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, byte_fallback=model_type != "char",
            hard_vocab_limit=False, character_coverage=0.9995 if model_type != "char" else 1.0,
            num_threads=os.cpu_count() or 1, max_sentence_length=4 * _MAX_SENTENCE_CHARS,
            input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
        )
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserError(f"sentencepiece could not train a {vocab_size}-piece {model_type} model: {msg}; change the vocab size or give it more text") from None
    return out.getvalue()


def trained_tokenizer(sentences: Iterable[str], *, vocab_size: int, model_type: str) -> SentencePieceTokenizer:
    """A sentencepiece tokenizer for `sentences`, trained once and then read from the cache.

    The cache key hashes the sentences and the settings, so changed data retrains.
    """
    sentences = list(sentences)
    h = hashlib.sha256(f"v1|{vocab_size}|{model_type}".encode())
    for s in sentences:
        h.update(s.encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    path = cache_dir("tokenizers") / f"{model_type}-{vocab_size}-{h.hexdigest()[:16]}.model"
    if path.exists():
        return SentencePieceTokenizer(path.read_bytes(), where=str(path))
    log.info("training a %d-piece %s tokenizer on %d lines", vocab_size, model_type, len(sentences))
    model = train_sentencepiece(sentences, vocab_size=vocab_size, model_type=model_type)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(model)
    os.replace(tmp, path)
    return SentencePieceTokenizer(model, where=str(path))

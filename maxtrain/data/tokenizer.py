"""Tokenizers behind one small interface: sentencepiece models (trained here or loaded) and,
optionally, Hugging Face tokenizer.json files.

Sentencepiece models trained by maxtrain use fixed special ids: pad=0, unk=1, bos=2, eos=3,
then <mask> (4, for masked LM; text that spells "<mask>" encodes to it),
and are lossless: decode(encode(x)) == x for any text (newlines, indentation, tabs, runs of
spaces, emoji), because they are trained without normalization or whitespace folding and
with byte fallback for every model type, so no text is ever unknown. A loaded model keeps its
own ids; if it has no pad piece, id 0 is used as pad (padding is always masked out of the
loss). check_lossless tells a run when a loaded model is not lossless on its data.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import os
from typing import Iterable, Iterator, Protocol

from maxtrain.data.files import cache_dir, is_remote, read_bytes
from maxtrain.errors import UserError

log = logging.getLogger("maxtrain.data")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# The sentencepiece trainer skips longer sentences; we cut instead, so no text is wasted.
_MAX_SENTENCE_CHARS = 4000
# The mask token (masked LM) every model maxtrain trains reserves, and the names looked for in
# a loaded model (BERT's and RoBERTa's).
MASK_PIECE = "<mask>"
_MASK_NAMES = ("<mask>", "[MASK]")
# The four special pieces, the mask and the 256 byte pieces every model maxtrain trains holds.
_FIXED_PIECES = 4 + 1 + 256
# Why each setting: sentencepiece's defaults normalize (NFKC: "ﬁ" -> "fi"), fold whitespace
# (newlines, tabs and runs of spaces -> one space) and give every text a dummy leading space.
# That prefix round-trips one text but not id lists joined: decode(encode(a) + encode(b)) would
# gain a space, and prompt/reply formats encode their parts apart. Whitespace-only pieces let
# an indentation be one token; split_digits is the usual choice for LMs (costs 0.1% tokens).
_LOSSLESS = dict(
    normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
    allow_whitespace_only_pieces=True, split_digits=True, byte_fallback=True,
)
# The documents check_lossless reads, and how much of each (a prefix is a fair sample).
_CHECK_DOCS, _CHECK_CHARS = 256, 20_000


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
        self.unk_id = self._sp.unk_id()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise UserError(f"{where} has no BOS or EOS piece; train it with bos_id and eos_id set (e.g. 2 and 3)")
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else 0
        masks = [self._sp.piece_to_id(n) for n in _MASK_NAMES]
        self.mask_id = next((i for i in masks if i != self.unk_id), None)  # None: cannot train a masked LM
        self.identity = "sp:" + hashlib.sha256(model_bytes).hexdigest()[:12]
        self.chat_template: str | None = None  # a model's own jinja template (load_tokenizer reads it)

    def id_to_piece(self, i: int) -> str:
        """The piece of id `i` ('▁' marks a space in pieces of models trained elsewhere)."""
        return self._sp.id_to_piece(int(i))

    @property
    def byte_fallback(self) -> bool:
        """Whether text outside the vocabulary becomes byte pieces (True) or the unk id (False)."""
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString(self._bytes)
        return proto.trainer_spec.byte_fallback

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS (the packer adds them per document)."""
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special pieces decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def __getstate__(self):
        return {"model_bytes": self._bytes, "chat_template": getattr(self, "chat_template", None)}

    def __setstate__(self, state):
        self.__init__(state["model_bytes"])
        self.chat_template = state.get("chat_template")


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
        self.mask_id = next((i for i in (self._tok.token_to_id(n) for n in _MASK_NAMES) if i is not None), None)
        self.identity = "hf:" + hashlib.sha256(json_text.encode()).hexdigest()[:12]
        self.chat_template: str | None = None  # a model's own jinja template (load_tokenizer reads it)

    def id_to_piece(self, i: int) -> str:
        """The token string of id `i`."""
        return self._tok.id_to_token(int(i)) or ""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`."""
        return self._tok.decode([int(i) for i in ids])

    def __getstate__(self):
        return {"json_text": self._json, "names": self._names, "chat_template": getattr(self, "chat_template", None)}

    def __setstate__(self, state):
        bos, eos, pad = state["names"]
        self.__init__(state["json_text"], bos=bos, eos=eos, pad=pad)
        self.chat_template = state.get("chat_template")


def load_tokenizer(path: str, *, bos: str | None = None, eos: str | None = None, pad: str | None = None) -> Tokenizer:
    """The tokenizer stored at `path`: a sentencepiece .model, or a tokenizer.json.

    Its `chat_template` is the jinja template of a tokenizer_config.json beside it (None: none).
    """
    if not is_remote(path) and not os.path.isfile(os.path.expanduser(path)):
        raise UserError(f"tokenizer {path!r} does not exist; fix data.tokenizer.path or train one with `maxtrain tokenizer train`")
    data = read_bytes(os.path.expanduser(path) if not is_remote(path) else path)
    if path.endswith(".json"):
        tok = HFTokenizer(data.decode("utf-8"), bos=bos, eos=eos, pad=pad, where=path)
    else:
        tok = SentencePieceTokenizer(data, where=path)
    tok.chat_template = chat_template_near(path)
    return tok


def chat_template_near(path: str) -> str | None:
    """The chat template saved next to a local tokenizer file, or None: chat_template.jinja (where
    transformers >= 4.50 writes it) or the `chat_template` of tokenizer_config.json.

    A list of named templates (transformers' format for several) gives its "default" one.
    """
    import json

    if is_remote(path):
        return None
    folder = os.path.dirname(os.path.expanduser(path))
    try:
        with open(os.path.join(folder, "chat_template.jinja"), encoding="utf-8") as f:
            text = f.read()
        if text.strip():
            return text
    except OSError:
        pass
    config = os.path.join(folder, "tokenizer_config.json")
    try:
        with open(config, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) and template.strip() else None


def training_sentences(texts: Iterable[str], limit: int) -> Iterator[str]:
    """Chunks of `texts` for the sentencepiece trainer, every character kept, up to `limit` lines.

    A chunk is whole lines of one document, newlines and indentation included, at most
    _MAX_SENTENCE_CHARS long (a longer line is cut), so the trainer sees (and learns pieces
    for) newlines, indentation and blank lines. `limit` counts lines, blank ones too.
    """
    n = 0
    for text in texts:
        chunk = ""
        for line in text.splitlines(keepends=True):
            while line and n < limit:
                if len(chunk) + len(line) > _MAX_SENTENCE_CHARS and chunk:
                    yield chunk
                    chunk = ""
                chunk += line[:_MAX_SENTENCE_CHARS]
                line = line[_MAX_SENTENCE_CHARS:]
                n += 1
            if n >= limit:
                break
        if chunk:
            yield chunk
        if n >= limit:
            return


def train_sentencepiece(sentences: Iterable[str], *, vocab_size: int, model_type: str) -> bytes:
    """Serialized bytes of a lossless sentencepiece model trained on `sentences`.

    Special ids are pad=0, unk=1, bos=2, eos=3, <mask>=4, then (bpe, unigram) the 256 byte pieces and the
    learned ones. bpe/unigram need vocab_size >= ~300. A char model lists its characters before
    the byte pieces, so ordinary text gets small ids; vocab_size caps it, except that a size
    with no room beside the 260 fixed pieces gives every character seen a piece.
    """
    import sentencepiece as spm

    sentences = list(sentences)
    if not sentences:
        raise UserError("no text to train the tokenizer on; point the sources (or --input) at text")
    size = vocab_size
    if model_type == "char" and vocab_size <= _FIXED_PIECES:
        size = _FIXED_PIECES + len(set().union(*sentences))
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=out, vocab_size=size, model_type=model_type,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, user_defined_symbols=[MASK_PIECE], **_LOSSLESS,
            hard_vocab_limit=False, character_coverage=0.9995 if model_type != "char" else 1.0,
            num_threads=os.cpu_count() or 1, max_sentence_length=4 * _MAX_SENTENCE_CHARS,
            input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
        )
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserError(f"sentencepiece could not train a {vocab_size}-piece {model_type} model: {msg}; change the vocab size or give it more text") from None
    return _characters_before_bytes(out.getvalue()) if model_type == "char" else out.getvalue()


def _characters_before_bytes(model: bytes) -> bytes:
    """`model` with its byte pieces moved after its other pieces (ids are list positions).

    Small test and toy models index a char tokenizer's characters with a vocabulary of a few
    dozen; the rare byte pieces at the end keep those ids small.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model)
    pieces = list(proto.pieces)
    byte = pb.ModelProto.SentencePiece.BYTE
    moved = pb.ModelProto()
    moved.CopyFrom(proto)
    del moved.pieces[:]
    moved.pieces.extend(pieces[:4] + [p for p in pieces[4:] if p.type != byte] + [p for p in pieces[4:] if p.type == byte])
    return moved.SerializeToString()


def trained_tokenizer(sentences: Iterable[str], *, vocab_size: int, model_type: str) -> SentencePieceTokenizer:
    """A sentencepiece tokenizer for `sentences`, trained once and then read from the cache.

    The cache key hashes the sentences and the settings, so changed data retrains; its version
    (v3: lossless settings and a <mask> piece) keeps models trained by older versions from being reused.
    """
    sentences = list(sentences)
    h = hashlib.sha256(f"v3|{vocab_size}|{model_type}".encode())  # v3: lossless, with <mask>
    for s in sentences:
        h.update(s.encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    path = cache_dir("tokenizers") / f"{model_type}-{vocab_size}-{h.hexdigest()[:16]}.model"
    if path.exists():
        return SentencePieceTokenizer(path.read_bytes(), where=str(path))
    log.info("training a %d-piece %s tokenizer on %d chunks of text", vocab_size, model_type, len(sentences))
    model = train_sentencepiece(sentences, vocab_size=vocab_size, model_type=model_type)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(model)
    os.replace(tmp, path)
    return SentencePieceTokenizer(model, where=str(path))


def roundtrip_failures(tok: Tokenizer, texts: Iterable[str], *, max_docs: int = _CHECK_DOCS) -> tuple[int, int]:
    """(documents whose decode(encode(text)) != text, documents checked) over the first
    `max_docs` of `texts`, each cut to its first _CHECK_CHARS characters."""
    failed = sampled = 0
    for text in itertools.islice(texts, max_docs):
        text = text[:_CHECK_CHARS]
        failed += tok.decode(tok.encode(text)) != text
        sampled += 1
    return failed, sampled


def check_lossless(tok: Tokenizer, texts: Iterable[str], *, where: str, max_docs: int = _CHECK_DOCS) -> float:
    """The share of sampled `texts` that `tok` does not round-trip; logs one warning if any.

    A sentencepiece model without byte fallback that turns sampled text into <unk> is a
    UserError: that text would be lost from training and generation alike.
    texts: documents of the run's training data; only the first `max_docs` are read.
    where: the tokenizer's path, for the messages.
    """
    texts = [t[:_CHECK_CHARS] for t in itertools.islice(texts, max_docs)]
    if isinstance(tok, SentencePieceTokenizer) and not tok.byte_fallback:
        for text in texts:
            if tok.unk_id in tok.encode(text):
                bad = next((c for c in text if tok.unk_id in tok.encode(c)), text)
                raise UserError(
                    f"tokenizer {where} has no byte fallback and cannot encode {bad[:20]!r} in the training data, "
                    f"so that text would be lost as <unk>; train a lossless one with `maxtrain tokenizer train` "
                    f"(or unset data.tokenizer.path to train one per run)"
                )
    failed, sampled = roundtrip_failures(tok, texts, max_docs=max_docs)
    if failed:
        first = next(t for t in texts if tok.decode(tok.encode(t)) != t)
        got = tok.decode(tok.encode(first))
        at = next((i for i, (a, b) in enumerate(zip(first, got)) if a != b), min(len(first), len(got)))
        log.warning(
            "tokenizer %s is lossy: %d of %d sampled documents (%.1f%%) do not decode back to their text "
            "(e.g. %r became %r); the model will never see or generate what is lost. Train a lossless one "
            "with `maxtrain tokenizer train` (or unset data.tokenizer.path)",
            where, failed, sampled, 100 * failed / sampled, first[at : at + 20], got[at : at + 20],
        )
    return failed / sampled if sampled else 0.0

"""Masked-LM masking in the data pipeline: a pure function of (seed, document place, tokens).

BERT's recipe: select mask_prob of a document's non-special tokens; of the selected, 80%
become the mask token, 10% a random token, 10% stay as they are (all configurable). The
model sees the altered tokens and predicts the originals at the selected positions only
(targets aligned with tokens, weights 1 there and 0 elsewhere).

The random draw is seeded by the run's seed and the document's index in the global
document sequence (see maxtrain.data.lanes), which is unique across epochs: every epoch
masks a document afresh (RoBERTa's dynamic masking), and a resumed run or another process
count masks exactly alike.
"""

from __future__ import annotations

import numpy as np

from maxtrain.data.config import MlmFormat
from maxtrain.errors import UserError


def word_starts(tok, ids: np.ndarray) -> np.ndarray:
    """True where a token begins a word: its piece starts with whitespace ('▁' or ' ') or the
    piece before ends with it, and WordPiece pieces that do not start with '##'."""
    pieces = [tok.id_to_piece(int(i)) for i in ids]
    starts = np.ones(len(ids), bool)
    for j in range(1, len(pieces)):
        p, prev = pieces[j], pieces[j - 1]
        if p.startswith("##"):
            starts[j] = False
        elif not (p[:1] in ("▁", " ", "Ġ", "\n", "\t") or prev[-1:] in ("▁", " ", "Ġ", "\n", "\t") or not p[:1].isalnum()
                  or not prev[-1:].isalnum()):
            starts[j] = False
    return starts


class MlmMasker:
    """(element, index) -> the element masked: tokens altered, targets = originals, weights on selected."""

    def __init__(self, fmt: MlmFormat, tok, seed: int):
        mask_id = getattr(tok, "mask_id", None)
        if mask_id is None or mask_id < 0:
            raise UserError(
                "data.format mlm needs a tokenizer with a mask token; let the run train one (data.tokenizer.path: null "
                "reserves <mask> for mlm) or set data.tokenizer.mask_token to the mask token of your tokenizer.json"
            )
        self._fmt, self._tok, self._seed, self._mask = fmt, tok, seed % 2**32, int(mask_id)
        self._special = np.array(sorted({tok.bos_id, tok.eos_id, tok.pad_id, mask_id, getattr(tok, "unk_id", -1)} - {-1}))
        if fmt.whole_word and not hasattr(tok, "id_to_piece"):
            raise UserError("data.format.whole_word needs a tokenizer that names its pieces; set whole_word: false")

    def __call__(self, element: dict, index: int) -> dict:
        if "tokens" not in element:
            return element
        fmt, tokens = self._fmt, element["tokens"]
        rng = np.random.default_rng([self._seed, index])
        candidates = np.flatnonzero(~np.isin(tokens, self._special))
        weights = np.zeros(len(tokens), np.float32)
        out = tokens.copy()
        if len(candidates):
            k = max(1, int(round(fmt.mask_prob * len(candidates))))
            if fmt.whole_word:
                starts = word_starts(self._tok, tokens[candidates])
                words = np.split(candidates, np.flatnonzero(starts)[1:]) if starts[1:].any() else [candidates]
                chosen, n = [], 0
                for w in rng.permutation(len(words)):
                    if n >= k:
                        break
                    chosen.append(words[w])
                    n += len(words[w])
                selected = np.sort(np.concatenate(chosen))
            else:
                selected = np.sort(rng.choice(candidates, size=k, replace=False))
            u = rng.random(len(selected))
            to_mask = selected[u < fmt.mask_token_prob]
            to_random = selected[(u >= fmt.mask_token_prob) & (u < fmt.mask_token_prob + fmt.random_token_prob)]
            out[to_mask] = self._mask
            random_ids = rng.integers(0, self._tok.vocab_size, len(to_random)).astype(tokens.dtype)
            keep = np.isin(random_ids, self._special)  # a special id would mark a boundary: keep the token
            out[to_random] = np.where(keep, tokens[to_random], random_ids)
            weights[selected] = 1.0
        return {"tokens": out, "targets": tokens, "weights": weights}

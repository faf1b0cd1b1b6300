"""Packing a stream of tokenized documents into rows, for streaming (hf) sources.

Random-access sources are batched lane by lane (maxtrain.data.lanes), which makes batches
independent of the process count; a stream cannot be indexed, so each process packs its
own share of it here, in the same row layout:

Documents arrive as [BOS] + ids + [EOS] and are laid end to end; a document that does not fit
in a row continues at the start of the next one, so no token is lost or repeated:

    tokens        the inputs, each token of the stream exactly once
    targets       the next token of the same document (pad where there is none)
    loss_weights  1.0 where a target exists; 0.0 on a document's last token and on padding
                  (documents with per-target "weights", e.g. SFT, use those: 0 on prompts)
    segment_ids   1, 2, 3, ... per document piece in the row; 0 on padding
    positions     0, 1, 2, ... within the piece (a continued document restarts at 0)

The iterator's state is the upstream state just before the document being consumed, plus how
many of its tokens are already used: small, JSON-serializable, and exact on restore.
Upstream elements are {"tokens": int32 array} or {"bad": (where, reason)}: a bad record
stops with a UserError (on_bad_record="error") or is counted and logged ("skip").
"""

from __future__ import annotations

import logging

import grain
import numpy as np

from maxtrain.data.lanes import empty_batch, write_piece
from maxtrain.errors import UserError

log = logging.getLogger("maxtrain.data")


class _PackedBatchIterator(grain.DatasetIterator):
    """Fills batches of rows from a stream of tokenized documents."""

    def __init__(self, parent, *, rows: int, seq_len: int, pad_id: int, skip_bad: bool):
        super().__init__(parent)
        self._rows, self._seq_len, self._pad_id, self._skip_bad = rows, seq_len, pad_id, skip_bad
        self._doc: np.ndarray | None = None
        self._weights: np.ndarray | None = None
        self._doc_state = None  # Upstream state just before self._doc was read.
        self._offset = 0  # Tokens of self._doc already packed.
        self._skipped = 0
        self._done = False

    def _next_document(self) -> bool:
        """Load the next good document; False when the stream is exhausted."""
        while True:
            state = self._parent.get_state()
            try:
                element = next(self._parent)
            except StopIteration:
                return False
            if "bad" in element:
                self._bad(*element["bad"])
                continue
            self._doc, self._doc_state, self._offset = element["tokens"], state, 0
            self._weights = element.get("weights")  # per target; None: every target counts
            return True

    def _bad(self, where: str, reason: str):
        if not self._skip_bad:
            raise UserError(f"bad record in {where}: {reason}; fix the data or set data.on_bad_record: skip")
        self._skipped += 1
        # Every skip is counted; the first few are named, then one line per power of ten.
        if self._skipped <= 10 or (self._skipped & (self._skipped - 1)) == 0:
            log.warning("skipped bad record %d in %s: %s", self._skipped, where, reason)

    def __next__(self) -> dict[str, np.ndarray]:
        if self._done:
            raise StopIteration
        batch = empty_batch(self._rows, self._seq_len, self._pad_id)
        filled = 0
        for r in range(self._rows):
            col, segment = 0, 0
            while col < self._seq_len:
                if self._doc is None or self._offset >= len(self._doc):
                    if not self._next_document():
                        self._done = True
                        if filled == 0:
                            raise StopIteration
                        return batch  # The last partial batch, padded rather than dropped.
                segment += 1
                n = min(self._seq_len - col, len(self._doc) - self._offset)
                write_piece(batch, r, col, segment, self._doc, self._weights, self._offset, n)
                col += n
                filled += n
                self._offset += n
        return batch

    def get_state(self) -> dict:
        """Upstream state before the current document, tokens used of it, skips so far."""
        if self._doc is not None and self._offset >= len(self._doc):
            # Between documents: the upstream position alone says where we are.
            return {"upstream": self._parent.get_state(), "offset": 0, "skipped": self._skipped, "done": self._done}
        upstream = self._doc_state if self._doc is not None else self._parent.get_state()
        return {"upstream": upstream, "offset": self._offset, "skipped": self._skipped, "done": self._done}

    def set_state(self, state: dict):
        """Restore a state from get_state; the following batches are those of the saved run."""
        self._parent.set_state(state["upstream"])
        self._doc, self._doc_state, self._offset = None, None, 0
        self._skipped, self._done = state["skipped"], state["done"]
        if state["offset"]:
            skipped = self._skipped
            if not self._next_document():
                raise UserError("data iterator state points past the end of the data; it belongs to other data")
            # Bad records before this document were already counted in the saved run.
            self._skipped = skipped
            self._offset = state["offset"]


class PackedBatchIterDataset(grain.IterDataset):
    """Batches of `rows` packed rows of `seq_len` tokens from a tokenized-document stream."""

    def __init__(self, parent: grain.IterDataset, *, rows: int, seq_len: int, pad_id: int, skip_bad: bool):
        super().__init__(parent)
        self._kwargs = dict(rows=rows, seq_len=seq_len, pad_id=pad_id, skip_bad=skip_bad)

    def __iter__(self) -> _PackedBatchIterator:
        return _PackedBatchIterator(self._parent.__iter__(), **self._kwargs)

    def __str__(self) -> str:
        return f"PackedBatchIterDataset({self._kwargs})"

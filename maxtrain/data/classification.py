"""Batches for sequence classification: one example per row (no packing), plus `labels` [rows].

A row holds [BOS] + text ids, left-aligned and padded (segment id 1 on the example, 0 on
padding), so the head pools exactly one example per row. Examples longer than seq_len keep
their first seq_len tokens; the count of cut examples is logged. The last eval batch is
padded with rows of label -1, which carry no weight.
"""

from __future__ import annotations

import logging

import grain
import numpy as np

from maxtrain.data.packing import empty_batch
from maxtrain.errors import UserError

log = logging.getLogger("maxtrain.data")


class _RowBatchIterator(grain.DatasetIterator):
    def __init__(self, parent, *, rows: int, seq_len: int, pad_id: int, skip_bad: bool):
        super().__init__(parent)
        self._rows, self._seq_len, self._pad_id, self._skip_bad = rows, seq_len, pad_id, skip_bad
        self._skipped = self._truncated = 0

    def __next__(self) -> dict[str, np.ndarray]:
        batch = empty_batch(self._rows, self._seq_len, self._pad_id)
        batch["labels"] = np.full((self._rows,), -1, np.int32)
        r = 0
        while r < self._rows:
            try:
                element = next(self._parent)
            except StopIteration:
                if r == 0:
                    raise
                return batch
            if "bad" in element:
                where, reason = element["bad"]
                if not self._skip_bad:
                    raise UserError(f"bad record in {where}: {reason}; fix the data or set data.on_bad_record: skip")
                self._skipped += 1
                log.warning("skipped bad record %d in %s: %s", self._skipped, where, reason)
                continue
            ids = element["tokens"][: self._seq_len]
            if len(element["tokens"]) > self._seq_len:
                self._truncated += 1
                if self._truncated & (self._truncated - 1) == 0:  # 1, 2, 4, ...: visible, not spammy
                    log.warning("%d classification examples longer than seq_len=%d were cut", self._truncated, self._seq_len)
            n = len(ids)
            batch["tokens"][r, :n] = ids
            batch["segment_ids"][r, :n] = 1
            batch["positions"][r, :n] = np.arange(n)
            batch["labels"][r] = element["label"]
            r += 1
        return batch

    def get_state(self) -> dict:
        # Each row consumes whole elements, so the upstream position is the whole state.
        return {"upstream": self._parent.get_state(), "skipped": self._skipped, "truncated": self._truncated}

    def set_state(self, state: dict):
        self._parent.set_state(state["upstream"])
        self._skipped, self._truncated = state["skipped"], state["truncated"]


class RowBatchIterDataset(grain.IterDataset):
    """Batches of `rows` single-example rows with labels (classification)."""

    def __init__(self, parent: grain.IterDataset, *, rows: int, seq_len: int, pad_id: int, skip_bad: bool):
        super().__init__(parent)
        self._kwargs = dict(rows=rows, seq_len=seq_len, pad_id=pad_id, skip_bad=skip_bad)

    def __iter__(self) -> _RowBatchIterator:
        return _RowBatchIterator(self._parent.__iter__(), **self._kwargs)

    def __str__(self) -> str:
        return f"RowBatchIterDataset({self._kwargs})"

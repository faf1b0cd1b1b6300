"""Hugging Face `datasets` as a streaming source (optional: imported only when configured).

A stream cannot be indexed, so it is shuffled the streaming way (shard order plus a shuffle
buffer, reseeded each epoch) and split across processes with `split_dataset_by_node`. A
document's id is a hash of its text, which decides train/eval. The iterator state is
(epoch, records consumed); restoring re-reads the consumed part of the epoch, so it is exact
but not instant: for large corpora, `maxtrain data prepare` into ArrayRecord first.
"""

from __future__ import annotations

import zlib
from typing import Iterator

import grain
import numpy as np

from maxtrain.data import config as C
from maxtrain.data.documents import eval_mask
from maxtrain.data.sources import BadRecord
from maxtrain.errors import UserError


def _text_key(text: str) -> np.ndarray:
    data = text.encode("utf-8", "surrogatepass")
    return np.array([(zlib.crc32(data) << 32) | zlib.adler32(data)], np.uint64)


class HFDocuments:
    """One configured Hugging Face dataset, opened lazily for each pass."""

    prepared_tokenizer = None

    def __init__(self, cfg: C.HFSource, what: str):
        try:
            import datasets  # noqa: F401  Lazy: an optional, heavy dependency.
        except ImportError:
            raise UserError(f"{what} needs the Hugging Face `datasets` package; pip install datasets") from None
        self.cfg, self.description = cfg, what

    def records(self, *, split: str, eval_fraction: float, seed: int, shuffle: bool, epoch: int,
                process_index: int, process_count: int) -> Iterator[str | BadRecord]:
        """The records of one epoch of this process's share; bad records are returned, not dropped."""
        import datasets
        from datasets.distributed import split_dataset_by_node

        cfg = self.cfg
        try:
            ds = datasets.load_dataset(cfg.name, cfg.subset, split=cfg.split, data_files=cfg.data_files, streaming=True)
        except Exception as e:  # datasets raises many types for a missing or unreachable dataset.
            raise UserError(f"{self.description}: cannot open {cfg.name!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; check name/subset/split") from None
        if shuffle and split == "train":
            ds = ds.shuffle(seed=seed % 2**32, buffer_size=cfg.shuffle_buffer)
            ds.set_epoch(epoch)
        ds = split_dataset_by_node(ds, rank=process_index, world_size=process_count)
        for n, row in enumerate(ds):
            where = f"{self.description} (record {n} of this process's share, epoch {epoch})"
            text = row.get(cfg.field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                yield BadRecord(where, f"field {cfg.field!r} is missing" if text is None else f"field {cfg.field!r} is not a string")
            elif not text.strip():
                yield BadRecord(where, "empty document")
            elif eval_mask(_text_key(text), eval_fraction)[0] == (split == "eval"):
                yield text
            else:
                yield None  # Belongs to the other split; the iterator passes over it.

    def texts(self, *, split: str, eval_fraction: float) -> Iterator[str | BadRecord]:
        """Records of `split` in stream order (for tokenizer training)."""
        for r in self.records(split=split, eval_fraction=eval_fraction, seed=0, shuffle=False, epoch=0, process_index=0, process_count=1):
            if r is not None:
                yield r

    def dataset(self, **kwargs) -> grain.IterDataset:
        """A grain IterDataset of this process's records of the split (infinite for train)."""
        return _HFIterDataset(self, kwargs)


class _HFIterator(grain.DatasetIterator):
    def __init__(self, source: HFDocuments, kwargs: dict):
        super().__init__()
        self._source, self._kwargs = source, dict(kwargs)
        self._train = kwargs["split"] == "train"
        self._epoch, self._consumed, self._stream = 0, 0, None

    def _open(self):
        self._stream = self._source.records(epoch=self._epoch, **self._kwargs)
        for _ in range(self._consumed):  # Resume: re-read what the saved run had consumed.
            next(self._stream)

    def __next__(self):
        epochs_ended = 0
        while True:
            if self._stream is None:
                self._open()
            record = next(self._stream, StopIteration)
            if record is StopIteration:
                if not self._train:
                    raise StopIteration
                epochs_ended += 1
                if epochs_ended >= 2:  # A whole epoch went by without one document.
                    raise UserError(f"{self._source.description} has no {self._kwargs['split']} documents for this process; add data")
                self._epoch, self._consumed, self._stream = self._epoch + 1, 0, None
                continue
            self._consumed += 1
            if record is not None:
                return record

    def get_state(self) -> dict:
        return {"epoch": self._epoch, "consumed": self._consumed}

    def set_state(self, state: dict):
        self._epoch, self._consumed, self._stream = state["epoch"], state["consumed"], None


class _HFIterDataset(grain.IterDataset):
    def __init__(self, source: HFDocuments, kwargs: dict):
        super().__init__()
        self._source, self._kwargs = source, kwargs

    def __iter__(self):
        return _HFIterator(self._source, self._kwargs)


class ChainIterDataset(grain.IterDataset):
    """Finite IterDatasets one after another (eval when a source is a stream)."""

    def __init__(self, parents: list[grain.IterDataset]):
        super().__init__(parents)

    def __iter__(self):
        return _ChainIterator([p.__iter__() for p in self._parents])


class _ChainIterator(grain.DatasetIterator):
    def __init__(self, parents):
        super().__init__(parents)
        self._i = 0

    def __next__(self):
        while self._i < len(self._parents):
            try:
                return next(self._parents[self._i])
            except StopIteration:
                self._i += 1
        raise StopIteration

    def get_state(self) -> dict:
        return {"current": self._i, "parents": [p.get_state() for p in self._parents]}

    def set_state(self, state: dict):
        self._i = state["current"]
        for p, s in zip(self._parents, state["parents"]):
            p.set_state(s)

"""Random-access document sources: embedded, text, JSONL, Parquet and ArrayRecord.

Each source indexes its files once (byte spans of lines or paragraphs, row counts) so any
document can be read by number; that is what makes a global shuffle, per-process shares and
exact resumption cheap. Reading a document returns its text (or, for prepared ArrayRecord
data, its token ids), or a `BadRecord` naming what is wrong with it. Bad records are never
dropped here: the pipeline counts and logs them, or stops with a UserError (on_bad_record).
Whitespace-only lines between JSONL records are layout, not records, and are not indexed.
"""

from __future__ import annotations

import json
import os
import re
import threading
import zlib
from collections import OrderedDict
from typing import NamedTuple

import numpy as np

from maxtrain.data import config as C
from maxtrain.data.files import expand_paths, open_binary, read_bytes
from maxtrain.errors import UserError

PREPARED_META = "maxtrain_prepared.json"
_PARAGRAPH_BREAK = re.compile(rb"\r?\n[ \t\r]*\n")


class BadRecord(NamedTuple):
    """A record that cannot become a document: where it is and why."""

    where: str
    reason: str


def _name_key(name: str) -> np.uint64:
    """A stable 64-bit key of a file's base name, so moving a dataset keeps its eval split."""
    return np.uint64(zlib.crc32(os.path.basename(name).encode())) << np.uint64(32)


def _keys(names: list[str], file_idx: np.ndarray, index_in_file: np.ndarray) -> np.ndarray:
    """Stable per-document keys from the file's name and the document's number in the file."""
    name_keys = np.array([_name_key(n) for n in names], dtype=np.uint64)
    with np.errstate(over="ignore"):  # Wrapping uint64 arithmetic is the point.
        return name_keys[file_idx] + index_in_file.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)


def _decode(raw: bytes, where: str) -> str | BadRecord:
    """UTF-8 text of a record, stripped, or a BadRecord for bad bytes or empty text."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRecord(where, f"bytes are not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})")
    text = text.strip()
    return text if text else BadRecord(where, "empty document")


class EmbeddedDocuments:
    """The embedded corpus (see maxtrain.data.embedded), one document per topic or module."""

    description = "embedded source"
    prepared_tokenizer = None

    def __init__(self):
        from maxtrain.data.embedded import embedded_documents

        self._docs = embedded_documents()

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, i: int) -> str:
        return self._docs[i][1]

    def doc_keys(self) -> np.ndarray:
        """Keys from the document names (topic or module path)."""
        return np.array([zlib.crc32(n.encode()) * 0x9E3779B97F4A7C15 % 2**64 for n, _ in self._docs], dtype=np.uint64)

    def __getstate__(self):
        return {}  # Workers reload from the cache file instead of receiving megabytes.

    def __setstate__(self, state):
        self.__init__()


class SpanDocuments:
    """Text or JSONL files indexed as byte spans: a whole file, a paragraph or a line each."""

    prepared_tokenizer = None

    def __init__(self, cfg: C.TextSource | C.JsonlSource, what: str, whole_records: bool = False):
        self.description = what
        self._jsonl = isinstance(cfg, C.JsonlSource)
        # whole_records: structured formats (sft, classification) read the JSON object itself.
        self._field = None if whole_records or not self._jsonl else cfg.field
        self._per_file = isinstance(cfg, C.TextSource) and cfg.documents == "per_file"
        self._paths = expand_paths(cfg.path, what=what)
        files, starts, ends, numbers = [], [], [], []
        for f, path in enumerate(self._paths):
            if self._per_file:
                s, e = np.array([0]), np.array([-1])
            else:
                s, e = self._spans(read_bytes(path))
            files.append(np.full(len(s), f, np.int32))
            starts.append(s)
            ends.append(e)
            numbers.append(np.arange(len(s)))
        self._file = np.concatenate(files)
        self._start = np.concatenate(starts).astype(np.int64)
        self._end = np.concatenate(ends).astype(np.int64)
        self._number = np.concatenate(numbers)

    def _spans(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        """Start and end bytes of each non-blank line (JSONL) or paragraph (text)."""
        if not self._jsonl:
            bounds = [0] + [x for m in _PARAGRAPH_BREAK.finditer(data) for x in m.span()] + [len(data)]
            s, e = np.array(bounds[0::2]), np.array(bounds[1::2])
        else:
            newlines = np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n"))
            s = np.concatenate([[0], newlines + 1])
            e = np.concatenate([newlines, [len(data)]])
        # Only short spans can be all whitespace; checking just those keeps indexing vectorised.
        short = np.flatnonzero(e - s < 16)
        blank = [i for i in short if not data[s[i]:e[i]].strip()]
        keep = np.ones(len(s), bool)
        keep[blank] = False
        return s[keep], e[keep]

    def __len__(self) -> int:
        return len(self._file)

    def doc_keys(self) -> np.ndarray:
        """Keys from each file's base name and the document's number within it."""
        return _keys(self._paths, self._file, self._number)

    def __getitem__(self, i: int) -> str | BadRecord:
        path = self._paths[self._file[i]]
        if self._per_file:
            return _decode(read_bytes(path), path)
        raw = read_bytes(path, int(self._start[i]), int(self._end[i]))
        if not self._jsonl:
            return _decode(raw, f"{path} (paragraph at byte {self._start[i]})")
        where = f"{path} (record {self._number[i] + 1}, byte {self._start[i]})"
        line = _decode(raw, where)
        if isinstance(line, BadRecord):
            return line
        try:
            record = json.loads(line)
        except ValueError as e:
            return BadRecord(where, f"invalid JSON ({e.msg})")
        if self._field is None:
            return record if isinstance(record, dict) else BadRecord(where, "record is not a JSON object")
        if not isinstance(record, dict) or self._field not in record:
            return BadRecord(where, f"field {self._field!r} is missing")
        text = record[self._field]
        if not isinstance(text, str):
            return BadRecord(where, f"field {self._field!r} is {type(text).__name__}, not a string")
        return text if text.strip() else BadRecord(where, "empty document")


class ParquetDocuments:
    """Parquet files, one document per row of `column`; recent row groups stay cached."""

    prepared_tokenizer = None

    def __init__(self, cfg: C.ParquetSource, what: str):
        self._pq = _pyarrow_parquet()
        self.description = what
        self._column = cfg.column
        self._paths = expand_paths(cfg.path, what=what)
        files, groups, rows, numbers = [], [], [], []
        for f, path in enumerate(self._paths):
            with open_binary(path) as fh:
                meta = self._pq.ParquetFile(fh).metadata
            if cfg.column not in meta.schema.names:
                raise UserError(f"{what}: {path} has no column {cfg.column!r} (columns: {', '.join(meta.schema.names)}); set `column`")
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                files.append(np.full(n, f, np.int32))
                groups.append(np.full(n, g, np.int32))
                rows.append(np.arange(n))
            numbers.append(np.arange(meta.num_rows))
        self._file = np.concatenate(files) if files else np.zeros(0, np.int32)
        self._group = np.concatenate(groups) if groups else np.zeros(0, np.int32)
        self._row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        self._number = np.concatenate(numbers) if numbers else np.zeros(0, np.int64)
        self._init_cache()

    def _init_cache(self):
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        for k in ("_cache", "_lock", "_pq"):
            state.pop(k)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pq = _pyarrow_parquet()
        self._init_cache()

    def __len__(self) -> int:
        return len(self._file)

    def doc_keys(self) -> np.ndarray:
        """Keys from each file's base name and the row's number within it."""
        return _keys(self._paths, self._file, self._number)

    def _row_group(self, f: int, g: int) -> list:
        with self._lock:
            if (f, g) in self._cache:
                self._cache.move_to_end((f, g))
                return self._cache[(f, g)]
        with open_binary(self._paths[f]) as fh:
            values = self._pq.ParquetFile(fh).read_row_group(g, columns=[self._column]).column(0).to_pylist()
        with self._lock:
            self._cache[(f, g)] = values
            while len(self._cache) > 4:  # A shuffled read touches row groups at random; bound memory.
                self._cache.popitem(last=False)
        return values

    def __getitem__(self, i: int) -> str | BadRecord:
        f, g = int(self._file[i]), int(self._group[i])
        value = self._row_group(f, g)[self._row[i]]
        where = f"{self._paths[f]} (row group {g}, row {self._row[i]})"
        if not isinstance(value, str):
            return BadRecord(where, f"column {self._column!r} is {type(value).__name__}, not a string")
        return value if value.strip() else BadRecord(where, "empty document")


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq  # Lazy: pyarrow is the `parquet` extra.
    except ImportError:
        raise UserError("parquet sources need pyarrow; pip install 'maxtrain[parquet]'") from None
    return pq


class ArrayRecordDocuments:
    """ArrayRecord files: UTF-8 text per record, or int32 token ids when a prepare manifest
    (maxtrain_prepared.json) sits next to them; then `prepared_tokenizer` is its tokenizer."""

    def __init__(self, cfg: C.ArrayRecordSource, what: str):
        from array_record.python.array_record_module import ArrayRecordReader
        import grain

        self.description = what
        self._paths = expand_paths(cfg.path, what=what)
        metas = set()
        for path in self._paths:
            meta = os.path.join(os.path.dirname(path), PREPARED_META)
            metas.add(json.loads(read_bytes(meta))["tokenizer"] if os.path.exists(meta) else None)
        if len(metas) > 1:
            raise UserError(f"{what} mixes prepared and raw (or differently tokenized) ArrayRecord files; use one source per kind")
        self.prepared_tokenizer = metas.pop()
        counts = []
        for path in self._paths:
            reader = ArrayRecordReader(path)
            counts.append(reader.num_records())
            reader.close()
        self._file = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        self._number = np.concatenate([np.arange(n) for n in counts])
        self._reader = grain.sources.ArrayRecordDataSource(self._paths)

    def __len__(self) -> int:
        return len(self._file)

    def doc_keys(self) -> np.ndarray:
        """Keys from each file's base name and the record's number within it."""
        return _keys(self._paths, self._file, self._number)

    def __getitem__(self, i: int) -> str | np.ndarray | BadRecord:
        raw = self._reader[int(i)]
        where = f"{self._paths[self._file[i]]} (record {self._number[i]})"
        if self.prepared_tokenizer is not None:
            if len(raw) % 4:
                return BadRecord(where, "prepared record is not a whole number of int32 token ids")
            return np.frombuffer(raw, "<i4").astype(np.int32)
        return _decode(raw, where)


def open_source(cfg, index: int, whole_records: bool = False):
    """The random-access document source for one (non-streaming) source config.

    index: the source's position in `data.sources`, used in messages.
    whole_records: JSONL sources return each parsed JSON object (structured data formats).
    """
    what = f"data.sources[{index}] ({cfg.type})"
    if isinstance(cfg, C.EmbeddedSource):
        source = EmbeddedDocuments()
    elif isinstance(cfg, (C.TextSource, C.JsonlSource)):
        source = SpanDocuments(cfg, what, whole_records)
    elif isinstance(cfg, C.ParquetSource):
        source = ParquetDocuments(cfg, what)
    elif isinstance(cfg, C.ArrayRecordSource):
        source = ArrayRecordDocuments(cfg, what)
    else:
        raise TypeError(f"not a random-access source: {cfg!r}")
    if len(source) == 0:
        raise UserError(f"{what} has no documents (its files are empty); point it at data or remove it")
    return source

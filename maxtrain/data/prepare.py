"""`maxtrain data prepare`: pre-tokenize a corpus into ArrayRecord shards, in parallel.

Documents are read in source order and tokenized by a pool of worker processes; document i
goes to shard i % shards, so the output depends only on the input and the tokenizer. Each
record is the document's token ids as little-endian int32 (no BOS/EOS: the packer adds them).
A manifest, maxtrain_prepared.json, records the tokenizer identity and counts; training
checks it against the run's tokenizer, so mismatched ids are an error, not garbage.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from pathlib import Path

import numpy as np

from maxtrain.data import config as C
from maxtrain.data.sources import PREPARED_META, BadRecord, open_source
from maxtrain.data.tokenizer import load_tokenizer
from maxtrain.errors import UserError

log = logging.getLogger("maxtrain.data")
_CHUNK = 256  # Documents per worker task: large enough to amortize pickling.


def source_for_glob(pattern: str, *, field: str = "text", documents: str = "per_file") -> C.SourceConfig:
    """A source config for a glob, by file extension: .jsonl/.json, .parquet, .array_record, else text."""
    name = pattern.lower()
    if name.endswith((".jsonl", ".json")):
        return C.JsonlSource(path=pattern, field=field)
    if name.endswith(".parquet"):
        return C.ParquetSource(path=pattern, column=field)
    if name.endswith(".array_record"):
        return C.ArrayRecordSource(path=pattern)
    return C.TextSource(path=pattern, documents=documents)


_worker: dict = {}


def _init_worker(source, tokenizer):
    _worker["source"], _worker["tok"] = source, tokenizer


def _tokenize_chunk(bounds: tuple[int, int]) -> list:
    """Token-id bytes (or a BadRecord) for documents [start, end) of the worker's source."""
    source, tok = _worker["source"], _worker["tok"]
    out = []
    for i in range(*bounds):
        record = source[i]
        if isinstance(record, BadRecord):
            out.append(record)
        elif isinstance(record, np.ndarray):
            out.append(record.astype("<i4").tobytes())
        else:
            out.append(np.asarray(tok.encode(record), "<i4").tobytes())
    return out


def prepare_corpus(source_cfg: C.SourceConfig, tokenizer_path: str, out_dir: str, *, shards: int = 8,
                   workers: int = 0, on_bad_record: str = "error", progress: bool = True) -> dict:
    """Tokenize every document of `source_cfg` into `shards` ArrayRecord files under out_dir.

    Returns the manifest. Bad records stop with a UserError, or with on_bad_record="skip"
    are counted (in the manifest) and logged.
    """
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm

    if shards < 1:
        raise UserError(f"--shards must be at least 1 (got {shards})")
    tok = load_tokenizer(tokenizer_path)
    source = open_source(source_cfg, 0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.array_record")) or (out / PREPARED_META).exists():
        raise UserError(f"{out} already holds prepared data; choose an empty --out folder")
    paths = [out / f"shard-{s:05d}-of-{shards:05d}.array_record" for s in range(shards)]
    writers = [ArrayRecordWriter(str(p), "group_size:1") for p in paths]
    chunks = [(s, min(s + _CHUNK, len(source))) for s in range(0, len(source), _CHUNK)]
    documents = tokens = skipped = 0
    pool = None
    try:
        if workers > 0:
            # spawn, not fork: the parent may hold jax or grain threads that fork would copy mid-lock.
            pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (source, tok))
            results = pool.imap(_tokenize_chunk, chunks)
        else:
            _init_worker(source, tok)
            results = map(_tokenize_chunk, chunks)
        with tqdm(total=len(source), unit="doc", desc="prepare", disable=not progress) as bar:
            for chunk in results:
                for record in chunk:
                    if isinstance(record, BadRecord):
                        if on_bad_record == "error":
                            raise UserError(f"bad record in {record.where}: {record.reason}; fix the data or pass --on-bad-record skip")
                        skipped += 1
                        log.warning("skipped bad record %d in %s: %s", skipped, record.where, record.reason)
                        continue
                    writers[documents % shards].write(record)
                    documents += 1
                    tokens += len(record) // 4
                bar.update(len(chunk))
    finally:
        if pool is not None:
            pool.terminate()
        for w in writers:
            w.close()
    manifest = {"tokenizer": tok.identity, "vocab_size": tok.vocab_size, "documents": documents,
                "tokens": tokens, "skipped": skipped, "shards": shards}
    tmp = out / f".{PREPARED_META}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / PREPARED_META)  # Written last: a half-prepared folder has no manifest.
    return manifest

"""From source configs to a grain stream of tokenized documents, for one split and process.

Train/eval split: each document has a stable 64-bit key (file base name + its number in the
file, or its name for embedded text); a document is held out for eval when the hashed key
falls below eval_fraction. No text is read to decide.

Train order: per source, a global index shuffle (reshuffled each epoch from the seed),
repeated forever, then this process's share (every process_count-th index from
process_index), then the sources mixed by weight (weights are proportions of documents).
Eval order: the held-out documents of each source in file order, concatenated, this
process's share of them, once. Reading and tokenizing happen in grain map workers.
"""

from __future__ import annotations

import logging
from typing import Iterator

import grain
import numpy as np

from maxtrain.data import config as C
from maxtrain.data.formats import RecordEncoder, record_text
from maxtrain.data.shuffle import EpochShuffleMapDataset
from maxtrain.data.sources import BadRecord, open_source
from maxtrain.errors import UserError

log = logging.getLogger("maxtrain.data")


def eval_mask(keys: np.ndarray, eval_fraction: float) -> np.ndarray:
    """True for keys whose document is held out for eval (splitmix64 of the key < fraction)."""
    with np.errstate(over="ignore"):  # splitmix64 relies on wrapping uint64 arithmetic.
        z = keys.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53) < eval_fraction


def split_indices(source, split: str, eval_fraction: float) -> np.ndarray:
    """Indices of the source's documents that belong to `split` ("train" or "eval")."""
    held_out = eval_mask(source.doc_keys(), eval_fraction)
    return np.flatnonzero(held_out if split == "eval" else ~held_out)


class ReadAndTokenize:
    """Map function run in grain workers: document index -> {"tokens": [BOS]+ids+[EOS]} or {"bad": ...}.

    Structured data formats (sft, classification) add per-target "weights" or a "label"
    (see maxtrain.data.formats).
    """

    def __init__(self, source, tokenizer, fmt=None):
        self._source, self._tok = source, tokenizer
        self._encode = RecordEncoder(fmt or C.TextFormat(), tokenizer)
        self._where = getattr(source, "description", "record")

    def __call__(self, index) -> dict:  # pylint: disable=missing-function-docstring
        # Streaming sources hand over the record itself, random-access ones its index.
        record = index if self._source is None else self._source[int(index)]
        if isinstance(record, BadRecord):
            return {"bad": tuple(record)}
        return self._encode(record, f"{self._where} (document {index})")


def open_sources(cfg: C.DataConfig, tokenizer=None) -> list:
    """The document sources of `cfg`, indexed; checks prepared data against the tokenizer."""
    sources = []
    structured = cfg.format.type != "text"
    for i, scfg in enumerate(cfg.sources):
        if structured and not isinstance(scfg, C.JsonlSource):
            raise UserError(f"data.format {cfg.format.type} reads JSONL records; data.sources[{i}] is {scfg.type}, use type: jsonl")
        if isinstance(scfg, C.HFSource):
            from maxtrain.data.hf import HFDocuments

            sources.append(HFDocuments(scfg, f"data.sources[{i}] (hf {scfg.name})"))
            continue
        source = open_source(scfg, i, whole_records=structured)
        if tokenizer is not None and source.prepared_tokenizer not in (None, tokenizer.identity):
            raise UserError(
                f"{source.description} was prepared with tokenizer {source.prepared_tokenizer} but the run uses "
                f"{tokenizer.identity}; prepare it again with this tokenizer or set data.tokenizer.path to that one"
            )
        sources.append(source)
    return sources


def _random_access(source) -> bool:
    return hasattr(source, "doc_keys")


def document_dataset(cfg: C.DataConfig, tokenizer, sources: list, *, split: str, seed: int,
                     process_index: int, process_count: int) -> grain.IterDataset:
    """The tokenized documents of `split` that this process reads, as a grain IterDataset."""
    shares = []
    for i, source in enumerate(sources):
        if not _random_access(source):
            shares.append(source.dataset(split=split, eval_fraction=cfg.eval_fraction, seed=seed + i,
                                         shuffle=cfg.shuffle, process_index=process_index,
                                         process_count=process_count).map(ReadAndTokenize(None, tokenizer, cfg.format)))
            continue
        indices = split_indices(source, split, cfg.eval_fraction)
        if len(indices) == 0 and (split == "train" or len(sources) == 1):
            raise UserError(
                f"{source.description} has no {split} documents ({len(source)} in all, eval_fraction={cfg.eval_fraction}); "
                f"add documents or change data.eval_fraction"
            )
        ds = grain.MapDataset.source(indices)
        if split == "train":
            if cfg.shuffle:
                # A per-source seed, so two sources of equal size are not shuffled alike.
                ds = EpochShuffleMapDataset(ds, seed=seed * 1_000_003 + i)
            ds = ds.repeat()  # Infinite; the shuffle reshuffles each epoch.
            ds = ds[process_index::process_count]
        shares.append(ds.map(ReadAndTokenize(source, tokenizer, cfg.format)))

    if split == "eval":
        if all(isinstance(s, grain.MapDataset) for s in shares):
            ds = grain.MapDataset.concatenate(shares)
            if len(ds) == 0:
                raise UserError(f"no documents are held out for eval (eval_fraction={cfg.eval_fraction}); raise data.eval_fraction or add documents")
            ds = ds[process_index::process_count]
            if len(ds) == 0:
                raise UserError(f"process {process_index} of {process_count} has no eval documents; lower the process count or raise data.eval_fraction")
            return ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=64))
        shares = [s.to_iter_dataset() if isinstance(s, grain.MapDataset) else s for s in shares]
        return _concatenate_iter(shares)

    weights = [s.weight for s in cfg.sources]
    if all(isinstance(s, grain.MapDataset) for s in shares):
        mixed = grain.MapDataset.mix(shares, weights) if len(shares) > 1 else shares[0]
        return mixed.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=64))
    shares = [s.to_iter_dataset() if isinstance(s, grain.MapDataset) else s for s in shares]
    return grain.IterDataset.mix(shares, weights)


def _concatenate_iter(datasets: list) -> grain.IterDataset:
    """One finite IterDataset after another (eval over streaming sources)."""
    from maxtrain.data.hf import ChainIterDataset

    return ChainIterDataset(datasets)


def sample_texts(cfg: C.DataConfig, sources: list, *, max_docs: int = 1_000_000) -> Iterator[str]:
    """Train-split texts for tokenizer training: sources taken in turn, documents in file order.

    Bad records follow data.on_bad_record (error, or skip with a logged count); prepared
    (already tokenized) sources have no text and are passed over.
    """
    streams = []
    for i, source in enumerate(sources):
        if getattr(source, "prepared_tokenizer", None) is not None:
            continue
        if _random_access(source):
            streams.append(source[j] for j in split_indices(source, "train", cfg.eval_fraction))
        else:
            streams.append(source.texts(split="train", eval_fraction=cfg.eval_fraction))
    skipped, n = 0, 0
    while streams and n < max_docs:
        for stream in list(streams):
            record = next(stream, None)
            if record is None:
                streams.remove(stream)
                continue
            if isinstance(record, BadRecord):
                if cfg.on_bad_record == "error":
                    raise UserError(f"bad record in {record.where}: {record.reason}; fix the data or set data.on_bad_record: skip")
                skipped += 1
                continue
            n += 1
            yield record_text(record)
    if skipped:
        log.warning("tokenizer training skipped %d bad records", skipped)

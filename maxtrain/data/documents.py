"""From source configs to a grain stream of tokenized documents, for one split and process.

Train/eval split: each document has a stable 64-bit key (file base name + its number in the
file, or its name for embedded text); a document is held out for eval when the hashed key
falls below eval_fraction. No text is read to decide.

Train order: per source, a global index shuffle (reshuffled each epoch from the seed),
repeated forever, then the sources mixed by weight (proportions of documents, or of tokens
with data.mixture_unit=tokens). Eval order: the held-out documents of each source in file
order, concatenated, once. Both are one global sequence, the same for every process count;
streaming (hf) sources, which cannot be indexed, are read per process instead.
"""

from __future__ import annotations

import logging
from typing import Iterator

import grain
import numpy as np

from maxtrain.data import config as C
from maxtrain.data.formats import RecordEncoder, record_text
from maxtrain.data.shuffle import BlockShuffleMapDataset, EpochShuffleMapDataset
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
    """Indices of the source's documents that belong to `split` ("train", "eval" or "all")."""
    if split == "all":
        return np.arange(len(source))
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
    structured = cfg.format.records
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


def global_documents(cfg: C.DataConfig, tokenizer, sources: list, *, split: str, seed: int) -> grain.MapDataset:
    """Every document of `split` as one global sequence, read and tokenized on access.

    train: each source's documents shuffled (reshuffled every epoch), repeated forever, and
    the sources mixed by weight (see mixture_weights); eval: the held-out documents of each
    source in file order, one source after another. No process count enters: which process
    reads which document is the batcher's business (see maxtrain.data.lanes).
    """
    shares = []
    for i, source in enumerate(sources):
        indices = split_indices(source, split, cfg.eval_fraction)
        if len(indices) == 0 and (split != "eval" or len(sources) == 1):
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
        shares.append(ds.map(ReadAndTokenize(source, tokenizer, cfg.format)))
    if split != "train":
        ds = grain.MapDataset.concatenate(shares) if len(shares) > 1 else shares[0]
        if len(ds) == 0:
            raise UserError(f"no documents are held out for eval (eval_fraction={cfg.eval_fraction}); raise data.eval_fraction or add documents")
        return ds
    if len(shares) == 1:
        return shares[0]
    mixed = grain.MapDataset.mix(shares, mixture_weights(cfg, shares))
    return BlockShuffleMapDataset(mixed, seed=seed * 1_000_003 + len(shares)) if cfg.shuffle else mixed


def mixture_weights(cfg: C.DataConfig, shares: list, sample: int = 256) -> list[float]:
    """Proportions of documents to draw from each source.

    data.mixture_unit=documents: the configured weights as they are. tokens: each weight
    divided by the source's mean document length in tokens, measured on its first `sample`
    (shuffled) train documents, so each source's share of tokens follows its weight.
    """
    weights = [s.weight for s in cfg.sources]
    if cfg.mixture_unit == "documents":
        return weights
    means = []
    for scfg, share, w in zip(cfg.sources, shares, weights):
        lengths = [len(e["tokens"]) for e in (share[j] for j in range(sample)) if "tokens" in e]
        means.append(float(np.mean(lengths)) if lengths else 1.0)
    doc_weights = [w / m for w, m in zip(weights, means)]
    log.info("token-weighted mixture: mean tokens per document %s -> document proportions %s",
             [round(m, 1) for m in means], [round(d / sum(doc_weights), 4) for d in doc_weights])
    return doc_weights


def stream_documents(cfg: C.DataConfig, tokenizer, sources: list, *, split: str, seed: int,
                     process_index: int, process_count: int) -> grain.IterDataset:
    """This process's share of the documents when a source is a stream (hf): no random access.

    Streams cannot be indexed, so each process reads its own share of each stream, and
    its batches (unlike those of global_documents) depend on the process count.
    """
    shares = []
    for i, source in enumerate(sources):
        if not _random_access(source):
            # A named validation set ("all") is every record: the eval split of a fraction of 1.
            kw = dict(split="eval", eval_fraction=1.0) if split == "all" else dict(split=split, eval_fraction=cfg.eval_fraction)
            shares.append(source.dataset(**kw, seed=seed + i,
                                         shuffle=cfg.shuffle, process_index=process_index,
                                         process_count=process_count).map(ReadAndTokenize(None, tokenizer, cfg.format)))
            continue
        indices = split_indices(source, split, cfg.eval_fraction)
        ds = grain.MapDataset.source(indices)
        if split == "train":
            if cfg.shuffle:
                ds = EpochShuffleMapDataset(ds, seed=seed * 1_000_003 + i)
            ds = ds.repeat()
        ds = ds[process_index::process_count]
        shares.append(ds.map(ReadAndTokenize(source, tokenizer, cfg.format)).to_iter_dataset())
    if split != "train":
        return _concatenate_iter(shares)
    return grain.IterDataset.mix(shares, [s.weight for s in cfg.sources])


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

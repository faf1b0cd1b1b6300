"""The public entry points: build the tokenizer, build the batch iterator, assemble global arrays.

    sources -> split + shuffle + process share (documents.py) -> read + tokenize (grain
    workers) -> pack rows and batch (packing.py) -> prefetch thread -> DataIterator

DataIterator.get_state() is a small JSON-serializable dict; set_state() on an iterator built
with the same arguments makes the following batches bitwise those of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from typing import Literal

import grain
import numpy as np

from maxtrain.data.classification import RowBatchIterDataset
from maxtrain.data.config import DataConfig
from maxtrain.data.documents import document_dataset, open_sources, sample_texts
from maxtrain.data.packing import PackedBatchIterDataset
from maxtrain.data.prefetch import PrefetchingIterator
from maxtrain.data.tokenizer import Tokenizer, load_tokenizer, trained_tokenizer, training_sentences
from maxtrain.errors import UserError

log = logging.getLogger("maxtrain.data")
_STATE_VERSION = 1


def build_tokenizer(cfg: DataConfig, *, vocab_size: int) -> Tokenizer:
    """The configured tokenizer, or one trained (and cached) on the train sources.

    vocab_size: the model's vocabulary; a larger tokenizer is a UserError, a trained one gets
    exactly this size (char models may get fewer pieces).
    """
    tcfg = cfg.tokenizer
    if tcfg.path is not None:
        tok = load_tokenizer(tcfg.path, bos=tcfg.bos_token, eos=tcfg.eos_token, pad=tcfg.pad_token)
    else:
        sources = open_sources(cfg)
        sentences = training_sentences(sample_texts(cfg, sources), tcfg.train_sentences)
        tok = trained_tokenizer(sentences, vocab_size=vocab_size, model_type=tcfg.model_type)
    if tok.vocab_size > vocab_size:
        raise UserError(
            f"tokenizer has {tok.vocab_size} pieces but model.vocab_size is {vocab_size}; "
            f"raise model.vocab_size to at least {tok.vocab_size} or use a smaller tokenizer"
        )
    return tok


def _allow_grain_workers():
    # Grain's worker processes read absl flags; outside an absl app nobody parsed them.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class DataIterator:
    """Local batches of this process: next() -> dict of numpy arrays; resumable via get/set_state."""

    def __init__(self, dataset: grain.IterDataset, fingerprint: str, prefetch: int):
        self._fingerprint = fingerprint
        self._it = PrefetchingIterator(iter(dataset), prefetch)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict:
        """A JSON-serializable dict naming the position of the next batch."""
        return {"version": _STATE_VERSION, "fingerprint": self._fingerprint, "grain": self._it.get_state()}

    def set_state(self, state: dict) -> None:
        """Continue from `state` (from get_state of an iterator built with the same arguments)."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise UserError("data iterator state is not from this maxtrain version; start the data from scratch")
        if state.get("fingerprint") != self._fingerprint:
            raise UserError(
                "data iterator state was saved with different data settings (data config, tokenizer, seq_len, "
                "global_batch, seed, process count or workers); restore with the same settings or start the data over"
            )
        self._it.set_state(state["grain"])

    @property
    def skipped_records(self) -> int:
        """Bad records skipped so far (on_bad_record: skip), over the whole run including restores."""
        return self._it.get_state()["skipped"]

    def close(self) -> None:
        """Stop worker processes and threads (also done on garbage collection)."""
        self._it.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def build_pipeline(cfg: DataConfig, tok: Tokenizer, *, split: Literal["train", "eval"], seq_len: int,
                   global_batch: int, seed: int, process_index: int = 0, process_count: int = 1) -> DataIterator:
    """An iterator of this process's local batches of `global_batch // process_count` packed rows.

    Each batch holds tokens, targets, loss_weights, segment_ids and positions, [rows, seq_len]
    (see maxtrain.data.packing). split="train" repeats forever, reshuffled each epoch;
    split="eval" is the held-out documents once, in a fixed order, the last batch padded.
    """
    if split not in ("train", "eval"):
        raise UserError(f"split must be 'train' or 'eval', not {split!r}")
    if seq_len < 1 or global_batch < 1:
        raise UserError(f"seq_len and global_batch must be positive (got {seq_len}, {global_batch})")
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} is not in [0, {process_count})")
    if global_batch % process_count:
        raise UserError(f"global_batch {global_batch} is not divisible by the {process_count} processes; make it a multiple")
    sources = open_sources(cfg, tok)
    docs = document_dataset(cfg, tok, sources, split=split, seed=seed, process_index=process_index, process_count=process_count)
    workers = cfg.workers
    if workers and not all(hasattr(s, "doc_keys") for s in sources):
        log.warning("data.workers=%d ignored: streaming (hf) sources tokenize in the main process", workers)
        workers = 0
    if workers:
        _allow_grain_workers()
        docs = docs.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=16))
    # Classification keeps one example per row (the head pools a row); other formats pack.
    batcher = RowBatchIterDataset if cfg.format.type == "classification" else PackedBatchIterDataset
    ds = batcher(docs, rows=global_batch // process_count, seq_len=seq_len, pad_id=tok.pad_id,
                 skip_bad=cfg.on_bad_record == "skip")
    settings = [cfg.model_dump(mode="json"), tok.identity, split, seq_len, global_batch, seed, process_index, process_count, workers]
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return DataIterator(ds, fingerprint, cfg.prefetch)


def make_global_batch(local_batch: dict[str, np.ndarray], sharding) -> dict:
    """One global jax.Array per field from each process's local rows, sharded by `sharding`.

    sharding: a NamedSharding whose spec splits the batch axis over the mesh's batch axes,
    e.g. P(("data", "fsdp"), None); every process passes its own local batch.
    """
    import jax  # Lazy: the pipeline and the CLI commands do not need jax.

    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def unigram_entropy(cfg: DataConfig, tok: Tokenizer, *, split: Literal["train", "eval"] = "eval",
                    max_tokens: int = 2_000_000) -> float:
    """Entropy in nats per token of the unigram distribution of the split's targets.

    Reads the whole split (every process computes the same value) up to max_tokens targets.
    """
    counts = np.zeros(tok.vocab_size, np.int64)
    seen = 0
    quiet = cfg.model_copy(update={"prefetch": 0})
    with build_pipeline(quiet, tok, split=split, seq_len=1024, global_batch=8, seed=0) as it:
        for batch in it:
            # Classification predicts labels, not tokens: the baseline is the label entropy.
            labels = batch.get("labels")
            targets = labels[labels >= 0] if labels is not None else batch["targets"][batch["loss_weights"] > 0]
            counts += np.bincount(targets, minlength=tok.vocab_size)[: tok.vocab_size]
            seen += targets.size
            if seen >= max_tokens:
                break
    if seen == 0:
        raise UserError(f"the {split} split has no tokens; add data or change data.eval_fraction")
    p = counts[counts > 0] / seen
    return float(-(p * np.log(p)).sum())

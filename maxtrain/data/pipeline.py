"""The public entry points: build the tokenizer, build the batch iterator, assemble global arrays.

    sources -> split + shuffle + mix: one global document sequence (documents.py) -> this
    process's rows, lane by lane, read + tokenized on demand (lanes.py; worker processes
    with data.workers) -> prefetch thread -> DataIterator

Batch t is a function of the data config, the tokenizer, the seed and t: a process builds
only its rows of it. DataIterator.get_state() is a small JSON-serializable dict; set_state()
with the states of every process of a run (any process count) makes the following batches
bitwise those of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from typing import Literal

import grain
import numpy as np

from maxtrain.data.config import DataConfig
from maxtrain.data.documents import global_documents, open_sources, sample_texts, stream_documents
from maxtrain.data.lanes import LaneBatcher, merge_lane_states
from maxtrain.data.packing import PackedBatchIterDataset
from maxtrain.data.prefetch import PrefetchingIterator
from maxtrain.data.tokenizer import Tokenizer, check_lossless, load_tokenizer, trained_tokenizer, training_sentences
from maxtrain.errors import UserError

log = logging.getLogger("maxtrain.data")
_STATE_VERSION = 2


def build_tokenizer(cfg: DataConfig, *, vocab_size: int) -> Tokenizer:
    """The configured tokenizer, or one trained (and cached) on the train sources.

    vocab_size: the model's vocabulary; a larger tokenizer is a UserError, a trained one gets
    exactly this size (char models may get fewer pieces).
    """
    tcfg = cfg.tokenizer
    if tcfg.path is not None:
        tok = load_tokenizer(tcfg.path, bos=tcfg.bos_token, eos=tcfg.eos_token, pad=tcfg.pad_token)
        # A user's own model may fold whitespace or lose characters: say so once (or stop, for
        # text it cannot encode at all) rather than train on silently altered text.
        check_lossless(tok, sample_texts(cfg, open_sources(cfg)), where=tcfg.path)
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


class DataIterator:
    """Local batches of this process: next() -> dict of numpy arrays; resumable via get/set_state.

    kind: "lanes" (random-access sources: states of any process count merge) or "stream"
    (hf sources: each process resumes its own share, so the process count must match).
    """

    def __init__(self, inner, fingerprint: str, prefetch: int, *, kind: str, process_index: int, process_count: int):
        self._fingerprint, self._kind = fingerprint, kind
        self._process = (process_index, process_count)
        self._it = PrefetchingIterator(inner, prefetch)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def next_global(self, sharding, params=None) -> dict:
        """The next batch as global arrays sharded by `sharding` (params: unused; rollout sources sample with them)."""
        return make_global_batch(next(self), sharding)

    def step_metrics(self) -> dict[str, float]:
        """Metrics the data adds to the step's record (none; a rollout source reports its rewards)."""
        return {}

    def get_state(self) -> dict:
        """A JSON-serializable dict naming the position of the next batch (this process's rows)."""
        return {"version": _STATE_VERSION, "fingerprint": self._fingerprint, "kind": self._kind,
                "process": list(self._process), "inner": self._it.get_state()}

    def set_state(self, state: dict | list[dict]) -> None:
        """Continue from `state`: get_state() of an iterator built with the same arguments, or the
        list of every process's state of a run (a checkpoint's), whatever its process count."""
        states = state if isinstance(state, list) else [state]
        for s in states:
            if not isinstance(s, dict) or s.get("version") != _STATE_VERSION:
                raise UserError("data iterator state is not from this maxtrain version; start the data from scratch")
            if s.get("fingerprint") != self._fingerprint:
                raise UserError(
                    "data iterator state was saved with different data settings (data config, tokenizer, seq_len, "
                    "global_batch or seed); restore with the same settings or start the data over"
                )
        if self._kind == "lanes":
            self._it.set_state(merge_lane_states([s["inner"] for s in states]))
            return
        mine = [s for s in states if s["process"] == list(self._process)]
        if not mine:
            saved = states[0]["process"][1]
            raise UserError(
                f"the data position of streaming (hf) sources was saved by {saved} processes and this run has "
                f"{self._process[1]}; it cannot move to another process count"
            )
        self._it.set_state(mine[0]["inner"])

    @property
    def skipped_records(self) -> int:
        """Bad records skipped so far (on_bad_record: skip), over the whole run including restores."""
        inner = self._it.get_state()
        if self._kind == "lanes":
            return sum(v[2] for v in inner["lanes"].values())
        return inner["skipped"]

    def close(self) -> None:
        """Stop worker processes and threads (also done on garbage collection)."""
        self._it.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def process_rows(global_batch: int, process_index: int = 0, process_count: int = 1) -> range:
    """The rows of process `process_index` when each process holds an equal contiguous block."""
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} is not in [0, {process_count})")
    if global_batch % process_count:
        raise UserError(f"global_batch {global_batch} is not divisible by the {process_count} processes; make it a multiple")
    per = global_batch // process_count
    return range(process_index * per, (process_index + 1) * per)


def build_pipeline(cfg: DataConfig, tok: Tokenizer, *, split: Literal["train", "eval", "all"], seq_len: int,
                   global_batch: int, seed: int, rows=None, process_index: int = 0, process_count: int = 1) -> DataIterator:
    """An iterator of this process's rows of each global batch of `global_batch` rows.

    Each batch holds tokens, targets, loss_weights, segment_ids and positions, [rows, seq_len]
    (see maxtrain.data.lanes), plus labels [rows] for classification. split="train" repeats
    forever, reshuffled each epoch; split="eval" is the held-out documents once, in a fixed
    order; split="all" is every document of the sources once (a named validation set).
    rows: the global row numbers this process builds, in local order (see local_rows); None:
    the process_index-th of process_count equal blocks.
    """
    if split not in ("train", "eval", "all"):
        raise UserError(f"split must be 'train', 'eval' or 'all', not {split!r}")
    if seq_len < 1 or global_batch < 1:
        raise UserError(f"seq_len and global_batch must be positive (got {seq_len}, {global_batch})")
    rows = list(process_rows(global_batch, process_index, process_count) if rows is None else rows)
    sources = open_sources(cfg, tok)
    settings = [split, seq_len, global_batch, seed]
    skip_bad = cfg.on_bad_record == "skip"
    if all(hasattr(s, "doc_keys") for s in sources):
        fill, labels = cfg.format.batching()
        docs = global_documents(cfg, tok, sources, split=split, seed=seed)
        inner = LaneBatcher(docs, global_batch=global_batch, rows=rows, seq_len=seq_len, pad_id=tok.pad_id, fill=fill,
                            too_long=getattr(cfg.format, "too_long", "refuse"), skip_bad=skip_bad, labels=labels,
                            workers=cfg.workers, transform=cfg.format.document_transform(tok, seed),
                            fields=cfg.format.batch_fields())
        kind = "lanes"
    else:
        if process_count > 1:
            log.warning("streaming (hf) sources are read per process: batches depend on the process count "
                        "(`maxtrain data prepare` them into ArrayRecord for global batches)")
        docs = stream_documents(cfg, tok, sources, split=split, seed=seed, process_index=process_index,
                                process_count=process_count)
        inner = PackedBatchIterDataset(docs, rows=len(rows), seq_len=seq_len, pad_id=tok.pad_id, skip_bad=skip_bad).__iter__()
        settings += [process_index, process_count]
        kind = "stream"
    return DataIterator(inner, data_fingerprint(cfg, tok, *settings), cfg.prefetch, kind=kind,
                        process_index=process_index, process_count=process_count)


def data_fingerprint(cfg: DataConfig, tok: Tokenizer, *settings) -> str:
    """A short hash naming which batches a data config, tokenizer and `settings` (JSON values) give.

    Loader knobs (workers, prefetch) change how fast batches come, never which: not in it.
    """
    key = [cfg.model_dump(mode="json", exclude={"workers", "prefetch"}), tok.identity, *settings]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def local_rows(sharding, global_batch: int) -> np.ndarray:
    """The global batch rows that this process's devices hold under `sharding`, ascending."""
    index_map = sharding.addressable_devices_indices_map((global_batch, 1))
    spans = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop) for s in index_map.values()})
    return np.unique(np.concatenate([np.arange(a, b) for a, b in spans]))


def make_global_batch(local_batch: dict[str, np.ndarray], sharding) -> dict:
    """One global jax.Array per field from each process's local rows, sharded by `sharding`.

    sharding: a NamedSharding whose spec splits the batch axis over the mesh's batch axes,
    e.g. P(("data", "fsdp"), None); every process passes its own local batch.
    """
    import jax  # Lazy: the pipeline and the CLI commands do not need jax.

    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def unigram_entropy(cfg: DataConfig, tok: Tokenizer, *, split: Literal["train", "eval", "all"] = "eval",
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

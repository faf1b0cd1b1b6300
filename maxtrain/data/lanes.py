"""Global batches built lane by lane: batch t is a function of the data, the seed and t only.

The documents of a split form one global sequence (shuffled, mixed and repeated for train;
held out and in file order for eval): `docs[i]`. Row r of every batch is a *lane* that reads
documents r, r + B, r + 2B, ... (B = global_batch) and fills its rows one after another:

    lane 0   docs 0, B, 2B, ...     -> row 0 of batch 0, row 0 of batch 1, ...
    lane 1   docs 1, B+1, 2B+1, ... -> row 1 of batch 0, row 1 of batch 1, ...

A process builds only the rows its devices hold (`rows`), reading only their lanes'
documents, so 1 process x 8 devices and 2 x 4 see the same global batches, and the state of
a lane (its document number and the tokens used of it) moves to any other process count.

How a lane fills a row is the format's choice (`fill`):
    pack    documents end to end; one that does not fit continues in the next row (no token
            lost; pretraining text)
    whole   whole documents only: one that does not fit the rest of the row starts the next
            row, the rest is padding; a document longer than a row is cut per `too_long`
    single  one document per row, cut to the row (classification; adds `labels`)
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
from typing import Iterable, Literal

import numpy as np

from maxtrain.data.preference import cut_sequences
from maxtrain.errors import UserError

log = logging.getLogger("maxtrain.data")
Fill = Literal["pack", "whole", "single"]
TooLong = Literal["truncate_prompt", "refuse"]
# Documents fetched ahead per lane when worker processes tokenize.
_LOOKAHEAD = 8


def empty_batch(rows: int, seq_len: int, pad_id: int, fields: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """A batch of padding only: pad tokens, zero weights, segment 0; `fields`: extra float32 fields, 0."""
    batch = {
        "tokens": np.full((rows, seq_len), pad_id, np.int32),
        "targets": np.full((rows, seq_len), pad_id, np.int32),
        "loss_weights": np.zeros((rows, seq_len), np.float32),
        "segment_ids": np.zeros((rows, seq_len), np.int32),
        "positions": np.zeros((rows, seq_len), np.int32),
    }
    for name in fields:
        batch[name] = np.zeros((rows, seq_len), np.float32)
    return batch


def write_piece(batch: dict, r: int, col: int, segment: int, doc: np.ndarray, weights, start: int, n: int,
                targets=None, element: dict | None = None) -> int:
    """Write doc[start:start+n] into row r at col as segment `segment` (targets/weights aligned).

    weights: per-target weights of the whole document (weights[j] weighs predicting token
    j+1), or None for every target. The document's last token has no target.
    targets: the document's own targets, one per token (masked LM: the original ids at the
    same positions), with weights aligned to them; None: the next token.
    element: a whole element written at once (start 0, n its length) whose "segments" number
    its sequences 1..k (preference pairs): they become segments segment..segment+k-1, each
    with positions from 0, and its "sequence_fields" {name: [k values]} land on each
    sequence's last token (0 elsewhere). Returns the last segment id used.
    """
    if targets is not None:
        targets = targets[start : start + n]
    else:
        targets = doc[start + 1 : start + n + 1]  # one short when the document ends here
    batch["tokens"][r, col : col + n] = doc[start : start + n]
    batch["targets"][r, col : col + len(targets)] = targets
    batch["loss_weights"][r, col : col + len(targets)] = 1.0 if weights is None else weights[start : start + len(targets)]
    segs = None if element is None else element.get("segments")
    if segs is None:
        batch["segment_ids"][r, col : col + n] = segment
        batch["positions"][r, col : col + n] = np.arange(n)
        return segment
    segs = segs[start : start + n]
    batch["segment_ids"][r, col : col + n] = segment - 1 + segs
    starts = np.r_[True, segs[1:] != segs[:-1]]
    batch["positions"][r, col : col + n] = np.arange(n) - np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    ends = col + np.flatnonzero(np.r_[segs[1:] != segs[:-1], True])
    for name, values in element.get("sequence_fields", {}).items():
        batch[name][r, ends] = values[segs[ends - col] - 1]
    return segment - 1 + int(segs.max())


def cut_prompt(element: dict, seq_len: int) -> dict | None:
    """The document shortened to seq_len by dropping prompt tokens after BOS, or None if its reply alone is too long.

    The prompt is everything before the first weighted target; the trained part is never cut.
    """
    tokens, weights = element["tokens"], element.get("weights")
    excess = len(tokens) - seq_len
    if excess <= 0:
        return element
    trained = np.flatnonzero(weights > 0) if weights is not None else np.arange(len(tokens))
    first = int(trained[0]) if len(trained) else len(tokens)
    # Keep BOS and tokens[first:] (the token predicting the first trained target onwards).
    if first - 1 < excess:
        return None
    keep = np.r_[0, np.arange(1 + excess, len(tokens))]
    out = dict(element, tokens=tokens[keep])
    if weights is not None:
        out["weights"] = weights[keep]
    return out


class _Fetcher:
    """docs[i] on demand; with worker processes, each lane's next documents are read ahead."""

    def __init__(self, docs, workers: int):
        self._docs, self._pool = docs, None
        self._pending: dict[int, cf.Future] = {}
        if workers:
            ctx = multiprocessing.get_context("spawn")  # never fork a process that holds JAX threads
            self._pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(docs,))

    def get(self, i: int, ahead: Iterable[int] = ()) -> dict:
        if self._pool is None:
            return self._docs[i]
        for j in (i, *ahead):
            if j not in self._pending:
                self._pending[j] = self._pool.submit(_worker_read, j)
        return self._pending.pop(i).result()

    def reset(self) -> None:
        for f in self._pending.values():
            f.cancel()
        self._pending.clear()

    def close(self) -> None:
        self.reset()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


_WORKER_DOCS = None


def _worker_init(docs) -> None:
    global _WORKER_DOCS
    _WORKER_DOCS = docs


def _worker_read(i: int) -> dict:
    return _WORKER_DOCS[i]


class LaneBatcher:
    """Batches of this process's rows of the global batch; resumable and process-count free.

    docs: a random-access sequence of tokenized documents ({"tokens", ["weights"|"label"]} or
      {"bad": (where, reason)}); len(docs) may be huge (infinite train streams).
    rows: the global row numbers (lanes) this process builds, in the order of its local batch.
    transform: applied to each good document with its index in `docs` (deterministic per index).
    """

    def __init__(self, docs, *, global_batch: int, rows: Iterable[int], seq_len: int, pad_id: int,
                 fill: Fill = "pack", too_long: TooLong = "truncate_prompt", skip_bad: bool = False,
                 labels: bool = False, workers: int = 0, transform=None, fields: Iterable[str] = ()):
        self._docs, self._n = docs, len(docs)
        self._b, self._rows, self._s, self._pad = global_batch, list(rows), seq_len, pad_id
        if not self._rows or not all(0 <= r < global_batch for r in self._rows):
            raise UserError(f"data rows {self._rows} are not within the global batch of {global_batch}")
        self._fill, self._too_long, self._skip_bad, self._labels = fill, too_long, skip_bad, labels
        self._transform = transform  # (element, global document index) -> element, e.g. masked-LM masking
        self._fields = tuple(fields)  # extra per-token float fields the format's elements carry
        self._fetch = _Fetcher(docs, workers)
        # Per lane: [document number in the lane, tokens of it used, bad records skipped, documents cut]
        self._lanes = {r: [0, 0, 0, 0] for r in self._rows}
        self._current: dict[int, tuple[int, dict]] = {}  # lane -> (document number, element)

    # -- documents of a lane ------------------------------------------------------------------

    def _element(self, r: int) -> dict | None:
        """The lane's current good document (skipping bad ones), or None past the end."""
        lane = self._lanes[r]
        while True:
            k = lane[0]
            cached = self._current.get(r)
            if cached is not None and cached[0] == k:
                return cached[1]
            i = k * self._b + r
            if i >= self._n:
                return None
            ahead = (j for j in range(i + self._b, min(i + (_LOOKAHEAD + 1) * self._b, self._n), self._b))
            element = self._prepare(self._fetch.get(i, ahead), lane, i)
            if element is None:  # bad: counted (or raised); the lane moves on
                lane[0], lane[1] = k + 1, 0
                continue
            self._current[r] = (k, element)
            return element

    def _prepare(self, element: dict, lane: list, i: int) -> dict | None:
        if "bad" in element:
            self._bad(*element["bad"], lane)
            return None
        if self._transform is not None:
            element = self._transform(element, i)
        if self._fill == "whole" and len(element["tokens"]) > self._s:
            cut_to = cut_sequences if "segments" in element else cut_prompt  # pairs: see data/preference.py
            cut = cut_to(element, self._s) if self._too_long == "truncate_prompt" else None
            if cut is None:
                n = len(element["tokens"])
                why = "its reply alone" if self._too_long == "truncate_prompt" else "it"
                self._bad(f"document {i} of the split", f"{why} does not fit in a row ({n} tokens, seq_len {self._s}); "
                          "raise train.seq_len or shorten the record", lane)
                return None
            lane[3] += 1
            self._report_cut(lane)
            return cut
        return element

    def _bad(self, where: str, reason: str, lane: list) -> None:
        if not self._skip_bad:
            raise UserError(f"bad record in {where}: {reason}; fix the data or set data.on_bad_record: skip")
        lane[2] += 1
        n = sum(v[2] for v in self._lanes.values())
        # Every skip is counted; the first few are named, then one line per power of two.
        if n <= 10 or (n & (n - 1)) == 0:
            log.warning("skipped bad record %d in %s: %s", n, where, reason)

    def _report_cut(self, lane: list) -> None:
        n = sum(v[3] for v in self._lanes.values())
        if n & (n - 1) == 0:  # 1, 2, 4, ...: visible, not spammy
            what = "prompts cut from the left" if self._fill == "whole" else "documents cut at the row's end"
            log.warning("%d records longer than seq_len=%d so far: %s", n, self._s, what)

    def _advance(self, r: int) -> None:
        lane = self._lanes[r]
        lane[0], lane[1] = lane[0] + 1, 0
        self._current.pop(r, None)

    # -- rows -----------------------------------------------------------------------------------

    def _fill_row(self, batch: dict, i: int, r: int) -> bool:
        """Fill local row i from lane r; False when the lane had nothing left."""
        lane, col, segment = self._lanes[r], 0, 0
        while col < self._s:
            element = self._element(r)
            if element is None:
                break
            doc, weights, targets = element["tokens"], element.get("weights"), element.get("targets")
            if self._fill == "single":
                n = min(len(doc), self._s)
                if len(doc) > self._s:
                    lane[3] += 1
                    self._report_cut(lane)
                write_piece(batch, i, 0, 1, doc, weights, 0, n, targets)
                if self._labels:  # the label is the target: no token targets
                    batch["labels"][i] = element["label"]
                    batch["targets"][i], batch["loss_weights"][i] = self._pad, 0.0
                self._advance(r)
                return True
            start = lane[1]
            n = min(self._s - col, len(doc) - start)
            if self._fill == "whole" and n < len(doc):
                break  # does not fit the rest of this row: it starts the next one
            segment = write_piece(batch, i, col, segment + 1, doc, weights, start, n, targets, element)
            col += n
            lane[1] += n
            if lane[1] >= len(doc):
                self._advance(r)
        return col > 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = empty_batch(len(self._rows), self._s, self._pad, self._fields)
        if self._labels:
            batch["labels"] = np.full((len(self._rows),), -1, np.int32)
        filled = [self._fill_row(batch, i, r) for i, r in enumerate(self._rows)]
        if not any(filled):
            raise StopIteration  # a finite split is used up on every lane of this process
        return batch

    # -- state ----------------------------------------------------------------------------------

    def get_state(self) -> dict:
        """{"lanes": {row: [document number, tokens used, skipped, cut]}}: JSON, mergeable across processes."""
        return {"lanes": {str(r): list(v) for r, v in self._lanes.items()}}

    def set_state(self, state: dict) -> None:
        """Continue from a state of any process count: `state["lanes"]` must name this process's rows."""
        lanes = state["lanes"]
        missing = [r for r in self._rows if str(r) not in lanes]
        if missing:
            raise UserError(f"data iterator state has no position for rows {missing[:4]}; it belongs to another global batch")
        self._fetch.reset()
        self._current.clear()
        self._lanes = {r: [int(x) for x in lanes[str(r)]] for r in self._rows}

    @property
    def skipped(self) -> int:
        return sum(v[2] for v in self._lanes.values())

    def close(self) -> None:
        self._fetch.close()


def merge_lane_states(states: list[dict]) -> dict:
    """One state holding every lane of the per-process states (a checkpoint's list)."""
    lanes: dict[str, list] = {}
    for s in states:
        lanes.update(s["lanes"])
    return {"lanes": lanes}


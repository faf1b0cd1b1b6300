"""A background thread that prepares batches ahead, while keeping the state of each batch.

Grain's thread prefetch would do, but its iterator's finalizer fails noisily at interpreter
exit; this one is small and pairs every batch with the upstream state right after it, so
get_state() is the position after the last batch handed out, not after the read-ahead.
"""

from __future__ import annotations

import queue
import threading


class PrefetchingIterator:
    """Wraps a grain DatasetIterator; `buffer` batches are produced ahead (0: none)."""

    def __init__(self, inner, buffer: int):
        self._inner, self._buffer = inner, buffer
        self._state = inner.get_state()
        self._thread = None

    def _start(self):
        self._queue: queue.Queue = queue.Queue(maxsize=self._buffer)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="maxtrain-data-prefetch", daemon=True)
        self._thread.start()

    def _produce(self):
        while not self._stop.is_set():
            try:
                item = (next(self._inner), self._inner.get_state(), None)
            except BaseException as e:  # Re-raised in the consumer, StopIteration included.
                item = (None, None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    def __next__(self):
        if not self._buffer:
            batch = next(self._inner)
            self._state = self._inner.get_state()
            return batch
        if self._thread is None:
            self._start()
        batch, state, error = self._queue.get()
        if error is not None:
            self._queue.put((None, None, error))  # Later calls fail the same way.
            raise error
        self._state = state
        return batch

    def get_state(self):
        """Upstream state after the last batch returned by __next__."""
        return self._state

    def _halt(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def set_state(self, state) -> None:
        """Drop the read-ahead and continue from `state`."""
        self._halt()
        self._inner.set_state(state)
        self._state = state

    def close(self) -> None:
        """Stop the thread and close the upstream iterator (worker processes included)."""
        self._halt()
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()

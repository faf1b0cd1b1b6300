"""Synthetic batches for tests of the model and step that do not need the data pipeline."""

from __future__ import annotations

import numpy as np


def random_batch(batch: int, seq_len: int, vocab: int, seed: int = 0, docs_per_row: int = 1) -> dict[str, np.ndarray]:
    """A packed causal-LM batch of random tokens with `docs_per_row` segments per row."""
    rng = np.random.default_rng(seed)
    stream = rng.integers(0, vocab, (batch, seq_len + 1), dtype=np.int32)
    seg_len = seq_len // docs_per_row
    segment_ids = np.minimum(np.arange(seq_len) // seg_len, docs_per_row - 1) + 1
    positions = np.arange(seq_len) - (segment_ids - 1) * seg_len
    last = np.r_[segment_ids[1:] != segment_ids[:-1], True]
    return {
        "tokens": stream[:, :-1],
        "targets": stream[:, 1:],
        "loss_weights": np.tile(np.where(last, 0.0, 1.0), (batch, 1)).astype(np.float32),
        "segment_ids": np.tile(segment_ids, (batch, 1)).astype(np.int32),
        "positions": np.tile(positions, (batch, 1)).astype(np.int32),
    }

"""A global index shuffle, reshuffled every epoch, that is fast for corpora of any size.

grain's `MapDataset.shuffle` uses a Feistel index shuffle whose cost per element is ~6 us
for a million documents but ~600 us for a few hundred (it walks a cycle in a much larger
domain); the embedded corpus and most tests are that small. Up to 2**24 documents we keep
a numpy permutation of the current epoch instead (int32, at most 64 MiB); beyond that the
Feistel shuffle is both cheap and memory-free.
"""

from __future__ import annotations

import grain
import numpy as np
from grain.experimental import index_shuffle

_TABLE_LIMIT = 2**24


class EpochShuffleMapDataset(grain.MapDataset):
    """Index i of epoch e reads parent[permutation_e(i)]; indices past the length are later epochs."""

    def __init__(self, parent: grain.MapDataset, *, seed: int):
        super().__init__(parent)
        self._seed = seed % 2**32
        self._table: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self._parent)

    def _shuffled(self, index: int) -> int:
        n = len(self._parent)
        epoch, i = divmod(index, n)
        if n > _TABLE_LIMIT:
            return int(index_shuffle(i, max_index=n - 1, seed=(self._seed + epoch) % 2**32, rounds=4))
        table = self._table  # One read: worker threads may swap it concurrently.
        if table is None or table[0] != epoch:
            perm = np.random.default_rng([self._seed, epoch]).permutation(n).astype(np.int32)
            table = self._table = (epoch, perm)
        return int(table[1][i])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._shuffled(index)]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_table"] = None  # Workers rebuild it rather than receive megabytes.
        return state

    def __str__(self) -> str:
        return f"EpochShuffleMapDataset(seed={self._seed})"


class BlockShuffleMapDataset(grain.MapDataset):
    """An infinite sequence permuted within consecutive blocks of `block` indices.

    A weighted mix of sources interleaves them in a fixed pattern; read lane by lane (every
    B-th index, see maxtrain.data.lanes) that pattern would give some rows one source only.
    Permuting within blocks keeps each block's exact proportions and makes every lane a
    random draw from the mix.
    """

    def __init__(self, parent: grain.MapDataset, *, seed: int, block: int = 4096):
        super().__init__(parent)
        self._seed, self._block = seed % 2**32, block
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._parent)

    def _permuted(self, index: int) -> int:
        b, i = divmod(index, self._block)
        perm = self._perms.get(b)
        if perm is None:
            if len(self._perms) >= 64:  # lanes stay within a few blocks of each other
                self._perms.pop(next(iter(self._perms)))
            perm = self._perms[b] = np.random.default_rng([self._seed, b]).permutation(self._block).astype(np.int32)
        return b * self._block + int(perm[i])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._permuted(index)]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_perms"] = {}
        return state

    def __str__(self) -> str:
        return f"BlockShuffleMapDataset(seed={self._seed}, block={self._block})"

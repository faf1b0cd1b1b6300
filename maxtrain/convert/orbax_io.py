"""Big arrays of an orbax params item written and read a layer slice at a time, with tensorstore.

orbax writes or restores a whole array per call, and holds a few copies of it while it does:
for a stacked [L, ...] leaf that is L HF tensors at once. Conversion instead talks to the
same storage orbax uses (an OCDBT key-value store holding one zarr3 array per leaf, named by
the leaf's path joined with dots) directly:

- `write_array` creates such an array chunked one layer slice per chunk (rows for unstacked
  leaves), fills it chunk by chunk, and `register_arrays` adds the leaves to the item's
  `_METADATA` tree; the result is the layout orbax itself writes for a layer-sharded array,
  so `load_params` / orbax restore read it unchanged.
- `ItemReader` opens any array of an item (written by orbax or here) and reads single layer
  slices; when a leaf's stored chunks span several layers it reads that leaf once and keeps
  the few most recent leaves, so memory stays a few leaves, never the model.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Iterable

import numpy as np

METADATA = "_METADATA"
ROW_CHUNK_BYTES = 16 << 20  # chunk size for unstacked leaves (rows of the embedding)
_ZSTD = {"name": "zstd", "configuration": {"level": 3, "checksum": False}}  # orbax's default codec
_LITTLE = {"name": "bytes", "configuration": {"endian": "little"}}


def array_name(path: str) -> str:
    """orbax's storage name of a leaf: its tree keys joined by dots (`layers.mlp.up.kernel`)."""
    return path.replace("/", ".")


def _options(item: Path) -> dict:
    return json.loads((item / METADATA).read_text())


def _spec(item: Path, name: str, options: dict, *, sync: bool = True) -> dict:
    # sync=False: no fsync per write (one per chunk commit made writes I/O-bound); sync_item() flushes once.
    base = {"driver": "file", "path": str(item.absolute()) + "/", "file_io_sync": sync}
    if options.get("use_ocdbt", True):
        kvstore = {"driver": "ocdbt", "base": base, "path": name}
    else:
        kvstore = {**base, "path": str(item.absolute() / name)}
    # No chunk cache: every chunk is read or written once, and a cache would keep them all.
    context = {"cache_pool": {"total_bytes_limit": 0}}
    return {"driver": "zarr3" if options.get("use_zarr3", False) else "zarr", "kvstore": kvstore, "context": context}


def write_array(item: Path, path: str, shape: tuple[int, ...], dtype, pieces: Iterable[tuple[int, np.ndarray]], *, stacked: bool) -> None:
    """Create leaf `path` in the orbax item `item` and fill it from `pieces` ((first row, rows) along axis 0).

    stacked: one chunk per layer slice (pieces are single layers); else chunks of whole rows
    of about ROW_CHUNK_BYTES, written one after the other.
    """
    import tensorstore as ts

    dtype = np.dtype(dtype)
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    rows = 1 if stacked else max(1, min(shape[0], ROW_CHUNK_BYTES // max(row_bytes, 1)))
    chunk = [rows, *shape[1:]]
    spec = _spec(item, array_name(path), _options(item), sync=False)
    spec.update(create=True, metadata={
        "shape": list(shape), "data_type": ts.dtype(dtype).name, "fill_value": 0,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
        "chunk_key_encoding": {"name": "default"},
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": chunk, "codecs": [_LITTLE, _ZSTD], "index_codecs": [_LITTLE, {"name": "crc32c"}]}}],
    })  # fmt: skip
    array = ts.open(spec).result()
    for start, block in pieces:
        for r in range(0, block.shape[0], rows):  # one chunk per write: tensorstore buffers only that chunk
            part = block[r : r + rows]
            array[start + r : start + r + part.shape[0]].write(np.ascontiguousarray(part, dtype)).result()
        del block


def sync_item(item: Path) -> None:
    """fsync every file of the item once (the writes above skip it), before it is declared complete."""
    import os

    for file in sorted(p for p in Path(item).rglob("*") if p.is_file()):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def register_arrays(item: Path, paths: Iterable[str]) -> None:
    """Add leaves written by `write_array` to the item's `_METADATA` tree (as orbax records numpy leaves)."""
    meta = _options(item)
    for path in paths:
        keys = tuple(path.split("/"))
        meta["tree_metadata"][repr(keys)] = {
            "key_metadata": [{"key": k, "key_type": 2} for k in keys],  # 2: a dict key
            "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False},
        }
    tmp = item / f".{METADATA}.tmp"
    tmp.write_text(json.dumps(meta))
    tmp.replace(item / METADATA)


class ItemReader:
    """Leaves of an orbax params item, read whole or one layer slice at a time (see the module doc)."""

    def __init__(self, item: Path, *, keep_leaves: int = 4):
        self.item, self.options = Path(item), _options(Path(item))
        self._arrays: dict[str, object] = {}
        self._whole: OrderedDict[str, np.ndarray] = OrderedDict()
        self._keep = keep_leaves

    def _open(self, path: str):
        import tensorstore as ts

        if path not in self._arrays:
            self._arrays[path] = ts.open(_spec(self.item, array_name(path), self.options), open=True).result()
        return self._arrays[path]

    def shape(self, path: str) -> tuple[int, ...]:
        """The stored shape of leaf `path`."""
        return tuple(self._open(path).shape)

    def read(self, path: str, *, keep: bool = False) -> np.ndarray:
        """The whole leaf; keep: hold it among the few most recent (slice reads of multi-layer chunks)."""
        if path in self._whole:
            self._whole.move_to_end(path)
            return self._whole[path]
        array = self._open(path)
        value = np.empty(array.shape, array.dtype.numpy_dtype)
        rows = array.chunk_layout.read_chunk.shape[0] if array.ndim else 0
        for r in range(0, array.shape[0], rows) if rows else ():  # chunk by chunk: no decode buffers for all at once
            value[r : r + rows] = array[r : r + rows].read().result()
        if not rows:
            value[...] = array.read().result()
        if not keep:
            return value
        self._whole[path] = value
        while len(self._whole) > self._keep:
            self._whole.popitem(last=False)
        return value

    def read_slice(self, path: str, i: int) -> np.ndarray:
        """Layer i of a stacked leaf: read alone when its chunks hold one layer each."""
        array = self._open(path)
        if path in self._whole or array.chunk_layout.read_chunk.shape[0] != 1:
            return self.read(path, keep=True)[i]
        return array[i].read().result()


class LazyLeaf:
    """A stored leaf standing in for an array: `leaf[i]` reads one layer slice, `np.asarray(leaf)` all of it."""

    def __init__(self, reader: ItemReader, path: str):
        self.reader, self.path = reader, path
        self.shape = reader.shape(path)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.reader.read_slice(self.path, i)

    def __array__(self, dtype=None, copy=None):
        value = self.reader.read(self.path)
        return value if dtype is None else value.astype(dtype)


"""Streaming safetensors: read one tensor at a time through a memory map, write shard by shard.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}} and the raw little-endian bytes. Reading maps only the bytes of the tensor
asked for and copies them out, so a process never holds (or keeps mapped) more than the
tensor in hand; writing lays out each shard's header first and then streams the tensors
produced one by one.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from maxtrain.errors import UserError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Safetensors dtype tags of the float formats checkpoints hold weights in.
FLOAT_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}
TAG_OF = {v: k for k, v in FLOAT_DTYPES.items()}
_HEADER_ALIGN = 8


_TRIM_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


@contextlib.contextmanager
def big_buffers_mmapped():
    """Within: heap allocations of 1 MiB or more get their own mmap, returned to the OS on free (glibc).

    glibc raises its mmap threshold after big frees (up to 32 MiB), after which the chunk-sized
    buffers of reader/writer threads land in per-thread arenas and stay resident: measured, RSS
    then sits ~150 MB above the data in flight while converting. On exit the threshold is left
    fixed at 32 MiB, where glibc's own adjustment ends up anyway (1 MiB would slow XLA's
    compiler, which allocates many such buffers, several-fold).
    """
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)


def return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc malloc_trim; a no-op elsewhere).

    Reader and writer threads (tensorstore's among them) free big buffers into per-thread
    glibc arenas; without a trim the process keeps those pages and its RSS climbs with
    every tensor converted, toward the model size.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype tag, shape and absolute byte range."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset of the data section) of one .safetensors file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise UserError(f"'{path}' is not a safetensors file (shorter than its header); re-download it")
            (n,) = struct.unpack("<Q", raw)
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"'{path}' is not a readable safetensors file ({e}); re-download it") from None
    return header, 8 + n


class SafetensorsReader:
    """All tensors of a Hugging Face checkpoint dir: `model.safetensors` or shards named by an index."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        self.tensors: dict[str, TensorInfo] = {}
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise UserError(f"'{index}' is not a safetensors index ({e}); re-download it") from None
            by_file: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                by_file.setdefault(file, []).append(name)
            for file, names in sorted(by_file.items()):
                path = self.dir / file
                if not path.is_file():
                    raise UserError(
                        f"shard '{file}' named by {INDEX_FILE} is missing from '{self.dir}' (it holds {names[0]} "
                        f"and {len(names) - 1} more tensors); download every shard"
                    )
                found = self._add_file(path)
                for name in names:
                    if name not in found:
                        raise UserError(f"{INDEX_FILE} places tensor {name} in '{file}', but that shard lacks it; re-download it")
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise UserError(f"'{self.dir}' holds no *.safetensors weights (pytorch .bin files are not read); save with safetensors")
            for path in files:
                self._add_file(path)

    def _add_file(self, path: Path) -> set[str]:
        header, data_start = read_header(path)
        names, data_end = set(), data_start
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                begin, end = (int(x) for x in entry["data_offsets"])
                info = TensorInfo(name, path, str(entry["dtype"]), tuple(int(d) for d in entry["shape"]), data_start + begin, data_start + end)
            except (TypeError, ValueError, KeyError) as e:
                raise UserError(f"'{path}' has a malformed header entry for tensor {name} ({type(e).__name__}: {e}); re-download it") from None
            if not data_start <= info.start <= info.end:
                raise UserError(f"'{path}' gives tensor {name} the byte range {begin}..{end}, which is not a range; re-download it")
            self.tensors[name] = info
            names.add(name)
            data_end = max(data_end, info.end)
        # Checked up front: a memory map past the end fails deep inside numpy, after output was written.
        size = path.stat().st_size
        if size < data_end:
            raise UserError(
                f"'{path}' is truncated: its header describes {data_end} bytes but the file has {size} "
                f"({data_end - size} missing); the download or copy was cut short, fetch it again"
            )
        return names

    def info(self, name: str) -> TensorInfo:
        """The tensor's entry; a UserError naming it when the checkpoint lacks it."""
        if name not in self.tensors:
            raise UserError(f"tensor {name} is missing from the checkpoint in '{self.dir}'; it does not match config.json")
        return self.tensors[name]

    def read(self, name: str) -> np.ndarray:
        """A copy of tensor `name` in its stored float dtype (only its bytes are mapped, then unmapped)."""
        t = self.info(name)
        dtype = FLOAT_DTYPES.get(t.dtype)
        if dtype is None:
            raise UserError(
                f"tensor {name} has dtype {t.dtype}; only {', '.join(FLOAT_DTYPES)} weights convert "
                "(dequantize the checkpoint first)"
            )
        if math.prod(t.shape) * dtype.itemsize != t.end - t.start:
            raise UserError(f"tensor {name} in '{t.file.name}' has {t.end - t.start} bytes for shape {list(t.shape)}; the file is damaged")
        if not t.shape or math.prod(t.shape) == 0:
            return np.zeros(t.shape, dtype)
        mapped = np.memmap(t.file, dtype=dtype, mode="r", offset=t.start, shape=t.shape)
        out = np.array(mapped)  # copy, so the mapping can go now
        del mapped
        return out


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to write: its name, shape and dtype up front, its values produced on demand."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Consecutive groups of tensors, each at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_file(path: Path, tensors: Iterable[PlannedTensor]) -> None:
    """Write one .safetensors file of `tensors`, each produced only when its bytes are written."""
    tensors = list(tensors)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": TAG_OF[np.dtype(t.dtype)], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % _HEADER_ALIGN)  # data starts aligned, as the reference writer does
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            arr = np.ascontiguousarray(t.produce(), dtype=t.dtype)
            if arr.shape != t.shape:
                raise ValueError(f"{t.name}: produced shape {arr.shape}, planned {t.shape}")
            f.write(arr.reshape(-1).view(np.uint8).data)  # raw bytes (bf16 has no buffer-protocol code)
            del arr
            if t.nbytes >= _TRIM_BYTES:
                return_freed_memory()
    tmp.replace(path)


def write_safetensors(out_dir: Path, tensors: list[PlannedTensor], max_shard_bytes: int) -> list[str]:
    """Write `tensors` as model.safetensors, or as numbered shards plus an index when they exceed one shard.

    Each tensor's values are produced only when its turn comes, so memory holds one tensor.
    Returns the file names written.
    """
    shards = plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        write_file(out_dir / SINGLE_FILE, shards[0])
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        write_file(out_dir / name, shard)
        weight_map.update({t.name: name for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names + [INDEX_FILE]

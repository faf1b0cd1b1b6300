"""Finding and reading data files, local or remote (any fsspec filesystem that is installed)."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from maxtrain.errors import UserError


def cache_dir(kind: str) -> Path:
    """The cache folder for `kind` under $MAXTRAIN_CACHE, else ~/.cache/maxtrain; created."""
    root = os.environ.get("MAXTRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "maxtrain")
    path = Path(root) / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_remote(path: str) -> bool:
    """Whether `path` is a URL handled by fsspec (gs://, s3://, https://, file://, ...)."""
    return "://" in path


def _filesystem(url: str):
    """The fsspec filesystem for `url`; a UserError when fsspec or its backend is missing."""
    try:
        import fsspec  # Lazy: remote filesystems are optional.
    except ImportError:
        raise UserError(f"reading {url!r} needs fsspec; pip install fsspec (and the backend, e.g. gcsfs, s3fs)") from None
    try:
        fs, _ = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise UserError(f"cannot open {url!r}: {e}; install the fsspec backend for that protocol") from None
    return fs


def expand_paths(patterns: str | list[str], *, what: str) -> list[str]:
    """Every file matched by the glob(s), sorted, duplicates removed; UserError if none match.

    what: names the source in the error message.
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns:
        raise UserError(f"{what} has no path; set `path` to a file, glob or URL")
    found: list[str] = []
    for pattern in patterns:
        if is_remote(pattern):
            fs = _filesystem(pattern)
            matches = [fs.unstrip_protocol(m) for m in fs.glob(pattern) if fs.isfile(m)]
        else:
            matches = [m for m in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(m)]
        if not matches:
            raise UserError(f"{what}: no file matches {pattern!r}; check the path (globs like data/*.jsonl work)")
        found.extend(sorted(matches))
    return list(dict.fromkeys(found))


def read_bytes(path: str, start: int | None = None, end: int | None = None) -> bytes:
    """The bytes [start, end) of a local or remote file (the whole file by default)."""
    if is_remote(path):
        return _filesystem(path).cat_file(path, start=start, end=end)
    with open(path, "rb") as f:
        if start is None:
            return f.read()
        f.seek(start)
        return f.read((end if end is not None else os.path.getsize(path)) - start)


def open_binary(path: str):
    """A binary file object for a local or remote path (for readers that want one, e.g. pyarrow)."""
    if is_remote(path):
        return _filesystem(path).open(path, "rb")
    return open(path, "rb")

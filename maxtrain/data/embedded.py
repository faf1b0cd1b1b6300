"""The embedded default corpus: English text that ships with every Python installation.

Documents are the pydoc help topics (`pydoc_data.topics`), one per topic, followed by the
docstrings of each standard-library module (one document per module), pulled out of the
source with `ast` so nothing is imported. Order is deterministic (sorted names and paths).
Extraction takes several seconds, so the result is cached as JSON under the cache folder,
keyed by the Python version and stdlib location.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
import warnings
from pathlib import Path

from maxtrain.data.files import cache_dir

# Trees whose docstrings are mostly test scaffolding, GUI demos or vendored code.
_SKIP_DIRS = {"test", "tests", "idlelib", "turtledemo", "lib2to3", "ensurepip", "site-packages", "dist-packages", "__pycache__"}


def _module_docstrings(path: Path) -> str:
    """All docstrings of one module in source order, separated by blank lines ('' if none)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Old modules trigger SyntaxWarnings on escapes.
            tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return ""
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    docs = [ast.get_docstring(n) for n in nodes]
    return "\n\n".join(d.strip() for d in docs if d and d.strip())


def _extract() -> list[tuple[str, str]]:
    """(name, text) for every embedded document, freshly extracted."""
    from pydoc_data.topics import topics

    documents = [(f"topic:{name}", text.strip()) for name, text in sorted(topics.items()) if text.strip()]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        text = _module_docstrings(path)
        if text:
            documents.append((f"module:{rel.as_posix()}", text))
    return documents


def embedded_documents() -> list[tuple[str, str]]:
    """(name, text) of the embedded corpus, read from the cache when it is there."""
    stdlib = sysconfig.get_paths()["stdlib"]
    key = hashlib.sha256(f"v1|{sys.version}|{stdlib}".encode()).hexdigest()[:16]
    path = cache_dir("embedded") / f"corpus-{key}.json"
    if path.exists():
        try:
            return [tuple(d) for d in json.loads(path.read_text(encoding="utf-8"))]
        except (OSError, ValueError):
            pass  # A torn cache file: extract again and overwrite it.
    documents = _extract()
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(documents), encoding="utf-8")
    os.replace(tmp, path)  # Atomic, so a concurrent reader never sees half a file.
    return documents

"""Small JSON Lines files read whole (eval sets, prompt files); bad lines are one-line UserErrors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from maxtrain.errors import UserError


def read_jsonl(path: str | Path, *, what: str, hint: str, limit: int | None = None) -> list[tuple[int, Any]]:
    """(line number, record) for each non-blank line, up to `limit` records.

    what: names the file in errors ("eval data"); hint: the fix for a missing or empty file.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} '{p}' does not exist; {hint}")
    records = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((n, json.loads(line)))
        except ValueError as e:
            raise UserError(f"{p}:{n} is not valid JSON ({e}); write one JSON object per line") from None
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise UserError(f"{what} '{p}' holds no records; {hint}")
    return records

"""One resolver for "a model on disk": a run dir, a training checkpoint step dir, or an export.

Every command that reads a model (`generate`, `eval`, `harness`, `export`, `convert to-hf`,
`init_from=`) takes any of the three, so "any run is a model":

    RUN_DIR/                             run: its newest complete checkpoint, RUN_DIR/tokenizer.*
    RUN_DIR/checkpoints/<step>/          step: that checkpoint, the tokenizer two levels up
    EXPORT/  (params/ + maxtrain.json)   export (`maxtrain export`, `convert from-hf`): its own tokenizer

Anything else is one UserError naming the three layouts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from maxtrain.checkpoint.params import CHECKPOINTS_DIR, META_ITEM, METADATA_FILE, PARAMS_ITEM, TOKENIZER_FILES
from maxtrain.errors import UserError

_EXPECTED = (
    "a run dir (with checkpoints/<step>/), a checkpoint step dir (params/ + maxtrain/maxtrain.json) "
    "or an export (params/ + maxtrain.json from `maxtrain export` or `maxtrain convert from-hf`)"
)


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where one model's params, metadata and tokenizer live.

    kind: "run", "step" or "export". run_dir: the training run the params come from (None for an export).
    """

    path: Path
    kind: str
    params_dir: Path
    meta_dir: Path
    run_dir: Path | None

    def metadata(self) -> dict[str, Any]:
        """The maxtrain.json next to the params (UserError when unreadable)."""
        path = self.meta_dir / METADATA_FILE
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"'{path}' is unreadable ({e}); the checkpoint is damaged, use another one") from None

    def tokenizer_file(self) -> Path | None:
        """The tokenizer file that goes with these params, or None when there is none."""
        if self.kind == "export":
            named = (self.metadata().get("tokenizer") or {}).get("file")
            candidates = [self.meta_dir / named] if named else [self.meta_dir / n for n in TOKENIZER_FILES]
        else:  # the trainer writes the run's tokenizer next to checkpoints/
            candidates = [self.run_dir / n for n in TOKENIZER_FILES]
        return next((c for c in candidates if c.is_file()), None)

    def tokenizer(self):
        """The tokenizer of these params (a maxtrain Tokenizer), or None when there is no tokenizer file."""
        from maxtrain.data.tokenizer import load_tokenizer

        path = self.tokenizer_file()
        if path is None:
            return None
        meta = self.metadata()
        if path.suffix != ".json":
            return load_tokenizer(str(path))
        hf = meta.get("hf_tokenizer")
        if hf is not None:  # converted from Hugging Face: its special tokens
            eos = hf.get("eos_token")
            return load_tokenizer(str(path), bos=hf.get("bos_token") or eos, eos=eos, pad=hf.get("pad_token"))
        tcfg = (((meta.get("config") or {}).get("data") or {}).get("tokenizer")) or {}
        return load_tokenizer(str(path), bos=tcfg.get("bos_token"), eos=tcfg.get("eos_token"), pad=tcfg.get("pad_token"))

    def require_tokenizer(self):
        """The tokenizer, or a UserError saying where it was looked for."""
        tok = self.tokenizer()
        if tok is None:
            where = self.meta_dir if self.kind == "export" else self.run_dir
            raise UserError(
                f"'{self.path}' has no tokenizer: no {' or '.join(TOKENIZER_FILES)} in {where}; "
                "copy the tokenizer file the model was trained with there"
            )
        return tok


def _newest_step(root: Path) -> Path | None:
    from maxtrain.checkpoint.manager import complete_steps

    steps = complete_steps(root)
    return root / str(steps[-1]) if steps else None


def resolve_model(path) -> ModelSource:
    """The ModelSource of a run dir (newest complete checkpoint), a checkpoint step dir or an export dir."""
    p = Path(path).expanduser().absolute()
    if not p.exists():
        raise UserError(f"'{p}' does not exist; pass {_EXPECTED}")
    if (p / METADATA_FILE).is_file() and (p / PARAMS_ITEM).is_dir():
        return ModelSource(p, "export", p / PARAMS_ITEM, p, None)
    if (p / META_ITEM / METADATA_FILE).is_file() and (p / PARAMS_ITEM).is_dir():
        run_dir = p.parent.parent if p.parent.name == CHECKPOINTS_DIR else p.parent
        return ModelSource(p, "step", p / PARAMS_ITEM, p / META_ITEM, run_dir)
    if (p / CHECKPOINTS_DIR).is_dir():
        step = _newest_step(p / CHECKPOINTS_DIR)
        if step is None:
            raise UserError(f"run dir '{p}' has no complete checkpoint yet under {CHECKPOINTS_DIR}/; "
                            "train until one is written (checkpoint.every) or pass another run")  # fmt: skip
        return ModelSource(p, "run", step / PARAMS_ITEM, step / META_ITEM, p)
    step = _newest_step(p)  # RUN_DIR/checkpoints itself
    if step is not None:
        return ModelSource(p, "run", step / PARAMS_ITEM, step / META_ITEM, p.parent)
    raise UserError(f"'{p}' holds no maxtrain params; pass {_EXPECTED}")

"""Starting a run: resume from its own checkpoints, start fresh, or initialise from other weights."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import jax

from maxtrain.checkpoint.params import read_metadata

log = logging.getLogger("maxtrain.checkpoint")


def init_state_from(exp, path: str, tokenizer=None):
    """`exp.state` with params from `path` (export, checkpoint or run dir) and a fresh optimizer at step 0.

    The optimizer state is re-initialised from the loaded params, in its own shardings; step
    and rng stay those of the new run. tokenizer: for finetuning methods initialised from
    text (a soft prompt).
    """
    meta = read_metadata(path)
    from maxtrain.finetune.init import load_pretrained  # base weights; LoRA factors and heads stay fresh

    tokenize = (lambda text: tokenizer.encode(text)) if tokenizer is not None else None
    params = load_pretrained(path, exp.state.params, model_cfg=exp.model.cfg, tokenize=tokenize, seed=exp.cfg.seed)
    opt_state = jax.jit(exp.optimizer.init, out_shardings=exp.state_shardings.opt_state)(params)
    log.info("initialised from %s (%s, saved at step %s); fresh optimizer at step 0",
             path, meta.get("format"), meta.get("step", "-"))
    return exp.state.replace(params=params, opt_state=opt_state)


def set_aside_previous_run(run_dir: Path, names=("checkpoints", "metrics.jsonl")) -> None:
    """Move an earlier run's checkpoints and metrics out of the way (renamed, never deleted)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in names:
        old = run_dir / name
        if old.exists():
            aside = run_dir / f"{name}.old-{stamp}"
            os.replace(old, aside)
            log.warning("starting fresh: moved the previous %s to %s", name, aside.name)


def truncate_metrics(path: Path, last_step: int) -> int:
    """Keep the records of steps <= last_step (a resumed run rewrites the later ones); returns how many were dropped.

    Training emits metrics one step late and may have run past its last checkpoint; without
    this, a resumed run's metrics.jsonl would repeat those steps.
    """
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill: the step is re-run anyway
            dropped += 1
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line)
        else:
            dropped += 1
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return dropped

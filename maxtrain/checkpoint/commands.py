"""`maxtrain export CHECKPOINT OUT_DIR`: params only (no optimizer state) for inference and finetuning."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("maxtrain")


def export_params(checkpoint: str, out_dir: str, *, merge_lora: bool = False) -> dict:
    """Copy the params of a checkpoint step dir (or a run dir's latest) to `out_dir` via save_params.

    The arrays are restored onto this host's devices with a replicated-free layout (one
    device, no mesh needed) and written once; the tokenizer file saved by the run is copied.
    merge_lora: fold a LoRA run's adapters into the weights; the export is then a base model
    (`lora: null`) that loads and finetunes like any pretrained one.
    """
    import jax

    from maxtrain.checkpoint.params import (
        META_ITEM, TOKENIZER_FILES, read_metadata, resolve_params_dir, restore_tree, save_params, saved_tree_metadata,
    )  # fmt: skip
    from maxtrain.config import RunConfig
    from maxtrain.errors import UserError

    params_dir, meta_dir = resolve_params_dir(checkpoint)
    meta = read_metadata(checkpoint)
    if meta.get("format") != "maxtrain-checkpoint":
        raise UserError(f"'{checkpoint}' is not a training checkpoint (format {meta.get('format')!r}); it is already params")
    cfg = RunConfig(**meta["config"])
    saved = saved_tree_metadata(params_dir)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
    params = restore_tree(params_dir, abstract)
    extra = {}
    if merge_lora:
        from maxtrain.finetune.lora import merge_lora as merge

        if cfg.finetune.lora is None:
            raise UserError(f"'{checkpoint}' is not a LoRA run (finetune.lora is not set); drop --merge-lora")
        params = merge(params, cfg.finetune.lora)
        extra["merged_lora"] = cfg.finetune.lora.model_dump(mode="json")
        cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"lora": None})})
    run_dir = meta_dir.parent.parent.parent if meta_dir.name == META_ITEM else None
    tokenizer = None
    for name in TOKENIZER_FILES if run_dir is not None else ():
        if (run_dir / name).is_file():
            tokenizer = str(run_dir / name)
    if tokenizer is None:
        log.warning("no tokenizer file next to the checkpoint: the export has none (set it when loading)")
    extra.update(step=meta.get("step"), tokens_seen=meta.get("tokens_seen"), source=str(Path(checkpoint).absolute()))
    save_params(out_dir, params, cfg=cfg, tokenizer_path=tokenizer, extra=extra)
    written = read_metadata(out_dir)
    if tokenizer and written["tokenizer"]["identity"] != meta["tokenizer"]["identity"]:
        raise UserError(f"the tokenizer file in {run_dir} is not the one the checkpoint was trained with; pass the right one")
    return written


def _cmd_export(ns: argparse.Namespace) -> int:
    meta = export_params(ns.checkpoint, ns.out_dir, merge_lora=ns.merge_lora)
    logging.getLogger("maxtrain").info("exported params of step %s (%d params) to %s", meta.get("step"), meta["param_count"], ns.out_dir)
    return 0


def register_commands(sub) -> None:
    """Add `export` to the CLI's subparsers."""
    p = sub.add_parser(
        "export",
        help="write a checkpoint's params only (no optimizer state): maxtrain export CHECKPOINT OUT_DIR",
        description="CHECKPOINT is a step dir (RUN_DIR/checkpoints/N) or a run dir (its latest checkpoint).",
    )
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--merge-lora", action="store_true",
                   help="LoRA runs: fold the adapters into the weights (the export loads with lora: null)")
    p.set_defaults(func=_cmd_export)

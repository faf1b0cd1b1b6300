"""`maxtrain export CHECKPOINT OUT_DIR`: params only (no optimizer state) for inference and finetuning."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("maxtrain")


def run_config_of(meta: dict):
    """The RunConfig a maxtrain.json describes: a checkpoint's own config, or an export's model (+ LoRA / head)."""
    from maxtrain.checkpoint.params import model_config_of
    from maxtrain.config import RunConfig

    if meta.get("config"):
        return RunConfig(**meta["config"])
    from maxtrain.finetune import registry

    model = model_config_of(meta)
    finetune = registry.model_updates(model)
    return RunConfig(model=model.model_copy(update=registry.base_updates()), preset=meta.get("preset"),
                     finetune=finetune)  # fmt: skip


def export_params(checkpoint: str, out_dir: str, *, merge_lora: bool = False) -> dict:
    """Copy the params of a run dir (newest checkpoint), a step dir or an export to `out_dir` via save_params.

    The arrays are restored onto this host's devices with a replicated-free layout (one
    device, no mesh needed) and written once; the tokenizer file saved by the run is copied.
    merge_lora: fold a LoRA / (IA)^3 run's method into the weights; the export is then a base
    model (`lora: null`, `ia3: null`) that loads and finetunes like any pretrained one.
    """
    import shutil

    import jax

    from maxtrain.checkpoint.params import read_metadata, restore_tree, save_params, saved_tree_metadata
    from maxtrain.checkpoint.source import resolve_model
    from maxtrain.convert.importer import HF_SIDE_DIR
    from maxtrain.errors import UserError

    source = resolve_model(checkpoint)
    meta = source.metadata()
    cfg = run_config_of(meta)
    saved = saved_tree_metadata(source.params_dir)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
    params = restore_tree(source.params_dir, abstract)
    extra = {k: meta[k] for k in ("source", "hf_tokenizer") if source.kind == "export" and k in meta}
    if merge_lora:  # every mergeable method (registry: LoRA, (IA)^3); the others refuse
        from maxtrain.finetune import registry

        for m, c in registry.active(cfg.finetune):
            if m.efficient and m.merge_params is None:
                raise UserError(f"finetune.{m.name} cannot be merged into the weights; export without --merge")
        mergeable = [(m, c) for m, c in registry.active(cfg.finetune) if m.merge_params is not None]
        if not mergeable:
            raise UserError(f"'{checkpoint}' has no LoRA or IA3 to merge (finetune.lora / finetune.ia3 are not set); drop --merge")
        for m, c in mergeable:
            params = m.merge_params(params, c)
            extra[f"merged_{m.name}"] = c.model_dump(mode="json")
        cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={m.name: None for m, _ in mergeable})})
    tokenizer = source.tokenizer_file()
    if tokenizer is None:
        log.warning("no tokenizer file next to the checkpoint: the export has none (set it when loading)")
    extra.update(step=meta.get("step"), tokens_seen=meta.get("tokens_seen"))
    extra.setdefault("source", str(Path(checkpoint).absolute()))  # an HF import keeps its own source record
    save_params(out_dir, params, cfg=cfg, tokenizer_path=str(tokenizer) if tokenizer else None, extra=extra)
    if source.kind == "export" and (source.meta_dir / HF_SIDE_DIR).is_dir():  # HF tokenizer files, for to-hf
        shutil.copytree(source.meta_dir / HF_SIDE_DIR, Path(out_dir) / HF_SIDE_DIR)
    written = read_metadata(out_dir)
    trained_with = (meta.get("tokenizer") or {}).get("identity")
    if tokenizer and trained_with and written["tokenizer"]["identity"] != trained_with:
        raise UserError(f"{tokenizer} is not the tokenizer the checkpoint was trained with; put the right one there")
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
        description="CHECKPOINT is a run dir (its newest checkpoint), a step dir (RUN_DIR/checkpoints/N) or an export.",
    )
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--merge", "--merge-lora", dest="merge_lora", action="store_true",
                   help="LoRA / IA3 runs: fold the method into the weights (the export loads as a base model)")
    p.set_defaults(func=_cmd_export)

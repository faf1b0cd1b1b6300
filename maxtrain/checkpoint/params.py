"""Params on disk: export (no optimizer state), metadata, and restore into given shardings.

An exported params dir and a training checkpoint step share one layout for the weights, so
`load_params` reads either (or a run dir: its latest complete checkpoint):

    EXPORT/params/           orbax StandardCheckpointer tree of the params
    EXPORT/maxtrain.json     {"format": "maxtrain-params", "version", "model", "preset", "tokenizer", ...}
    EXPORT/tokenizer.model   (or tokenizer.json) when the tokenizer file was given

    RUN_DIR/checkpoints/<step>/params/              the same tree
    RUN_DIR/checkpoints/<step>/maxtrain/maxtrain.json  {"format": "maxtrain-checkpoint", ...}
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from importlib import metadata as _pkg_metadata
from pathlib import Path
from typing import Any

import jax

from maxtrain.errors import UserError

log = logging.getLogger("maxtrain.checkpoint")

METADATA_FILE = "maxtrain.json"
PARAMS_ITEM = "params"
META_ITEM = "maxtrain"  # the JSON item of a training checkpoint; holds METADATA_FILE
CHECKPOINTS_DIR = "checkpoints"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def maxtrain_version() -> str:
    """The installed maxtrain version (recorded in every checkpoint and export)."""
    try:
        return _pkg_metadata.version("maxtrain")
    except _pkg_metadata.PackageNotFoundError:
        return "unknown"


def effective_model(cfg):
    """The model a run actually holds: `cfg.model` plus its `finetune:` methods (their leaves are saved too)."""
    from maxtrain.finetune import registry

    finetune = getattr(cfg, "finetune", None)
    if finetune is None or not any(True for _ in registry.active(finetune)):
        return cfg.model
    return cfg.model.model_copy(update=registry.model_updates(finetune))


def model_config_of(meta: dict):
    """The ModelConfig that rebuilds the saved param tree of a maxtrain.json (LoRA and head included).

    Older checkpoints recorded the base model only; their LoRA / head come from the run config.
    """
    from maxtrain.model.config import ModelConfig

    from maxtrain.finetune import registry

    fields = dict(meta["model"])
    finetune = (meta.get("config") or {}).get("finetune") or {}
    for key in registry.names():
        if fields.get(key) is None and finetune.get(key) is not None:
            fields[key] = finetune[key]
    return ModelConfig(**fields)


def base_metadata(cfg, *, fmt: str, tokenizer_identity: str | None = None) -> dict[str, Any]:
    """Fields shared by exports and training checkpoints: format, version, model shapes, tokenizer.

    "model" is the effective model (with the finetune's LoRA / head), so it rebuilds the saved tree.
    """
    return {
        "format": fmt,
        "version": maxtrain_version(),
        "model": effective_model(cfg).model_dump(mode="json"),
        "preset": cfg.preset,
        "param_count": cfg.model.param_count(),
        "tokenizer": {"identity": tokenizer_identity},
    }


def tokenizer_file_bytes(tokenizer) -> tuple[str, bytes]:
    """(file name, contents) that recreate `tokenizer` (a sentencepiece model or a tokenizer.json)."""
    state = tokenizer.__getstate__()  # the pickling state is the tokenizer's own serialized file
    if "model_bytes" in state:
        return "tokenizer.model", state["model_bytes"]
    return "tokenizer.json", state["json_text"].encode("utf-8")


def write_atomic(path: Path, data: bytes) -> None:
    """Write `path` through a temporary file and a rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_params(path, params, *, cfg, tokenizer_path: str | None = None, extra: dict | None = None) -> None:
    """Write params alone (no optimizer state) for inference and finetuning.

    Writes PATH/params (orbax), copies the tokenizer file when given, and writes
    PATH/maxtrain.json last: a directory without it is incomplete and `load_params` refuses it.
    tokenizer_path: a sentencepiece .model or a tokenizer.json, copied as tokenizer.model/.json.
    extra: more metadata fields (e.g. {"step": 1000, "source": "..."}).
    """
    import orbax.checkpoint as ocp

    out = Path(path).absolute()
    if (out / PARAMS_ITEM).exists() or (out / METADATA_FILE).exists():
        raise UserError(f"'{out}' already holds exported params; choose a new directory or delete it first")
    try:
        out.mkdir(parents=True, exist_ok=True)
        meta = base_metadata(cfg, fmt="maxtrain-params")
        if tokenizer_path is not None:
            src = Path(tokenizer_path)
            name = "tokenizer.json" if src.suffix == ".json" else "tokenizer.model"
            if not src.is_file():
                raise UserError(f"tokenizer file '{src}' does not exist; pass the .model or tokenizer.json the model was trained with")
            shutil.copyfile(src, out / name)
            meta["tokenizer"]["file"] = name
            meta["tokenizer"]["identity"] = _identity_of_file(out / name)
        meta.update(extra or {})
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(out / PARAMS_ITEM, params)
        checkpointer.wait_until_finished()
        checkpointer.close()
        if jax.process_index() == 0:
            write_atomic(out / METADATA_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    except OSError as e:
        raise UserError(f"could not write params to '{out}': {e.strerror or e}; check free space and permissions") from None


def _identity_of_file(path: Path) -> str:
    import hashlib

    data = path.read_bytes()
    prefix = "hf:" if path.suffix == ".json" else "sp:"
    return prefix + hashlib.sha256(data).hexdigest()[:12]


def resolve_params_dir(path) -> tuple[Path, Path]:
    """(dir holding the params item, dir holding maxtrain.json) for an export, a step dir or a run dir."""
    from maxtrain.checkpoint.source import resolve_model

    source = resolve_model(path)
    return source.params_dir, source.meta_dir


def read_metadata(path) -> dict:
    """The maxtrain.json of an exported params dir, a training checkpoint step dir, or a run dir (latest)."""
    from maxtrain.checkpoint.source import resolve_model

    return resolve_model(path).metadata()


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_str(path): tuple(leaf.shape) for path, leaf in leaves}


def shape_mismatches(saved_shapes: dict[str, tuple], wanted_shapes: dict[str, tuple]) -> list[str]:
    """Human-readable differences between two {param path: shape} tables (empty when they agree)."""
    problems = []
    for name in sorted(set(saved_shapes) | set(wanted_shapes)):
        saved, wanted = saved_shapes.get(name), wanted_shapes.get(name)
        if saved is None:
            problems.append(f"{name} missing in checkpoint (model wants {list(wanted)})")
        elif wanted is None:
            problems.append(f"{name} in checkpoint {list(saved)} but not in the model")
        elif saved != wanted:
            problems.append(f"{name} checkpoint {list(saved)} vs model {list(wanted)}")
    return problems


# Top-level param subtrees a training run keeps beside the model (DPO's `reference: frozen`, a
# copy of the init_from weights): saved in its checkpoints so the run resumes, but no part of
# the model, so every reader of the model (generate, eval, score, export, convert, init_from)
# leaves them out.
FROZEN_SUBTREES = ("reference",)


def without_frozen(tree):
    """`tree` (a param dict) without its FROZEN_SUBTREES."""
    return {k: v for k, v in tree.items() if k not in FROZEN_SUBTREES} if isinstance(tree, dict) else tree


def saved_tree_metadata(item_dir: Path, *, frozen: bool = False):
    """The saved tree of array metadata (shape, dtype) of an orbax item dir, read without the arrays.

    frozen: keep the FROZEN_SUBTREES (default: the model's params only).
    """
    import orbax.checkpoint as ocp

    # The item handler, not a Checkpointer: a checkpoint's item dir has no step-level metadata.
    tree = ocp.StandardCheckpointHandler().metadata(item_dir).tree
    return tree if frozen else without_frozen(tree)


def check_shapes(item_dir: Path, abstract_tree, *, what: str) -> None:
    """UserError naming every parameter whose saved shape differs from `abstract_tree`'s."""
    import orbax.checkpoint as ocp

    saved_tree = saved_tree_metadata(item_dir, frozen=True)
    if isinstance(saved_tree, dict):  # a frozen subtree counts only when the caller restores it too
        saved_tree = {k: v for k, v in saved_tree.items() if k not in FROZEN_SUBTREES or k in abstract_tree}
    problems = shape_mismatches(_flat_shapes(saved_tree), _flat_shapes(abstract_tree))
    if problems:
        shown = "; ".join(problems[:12]) + (f"; ... {len(problems) - 12} more" if len(problems) > 12 else "")
        raise UserError(
            f"{what} at '{item_dir.parent}' does not fit this model ({len(problems)} mismatching parameters: {shown}); "
            "use the model config it was saved with (see its maxtrain.json)"
        )


def restore_tree(item_dir: Path, abstract_tree) -> Any:
    """Restore an orbax StandardCheckpointer tree straight into the shardings of `abstract_tree`."""
    import orbax.checkpoint as ocp

    saved = saved_tree_metadata(item_dir, frozen=True)
    skipped = [k for k in FROZEN_SUBTREES if isinstance(saved, dict) and k in saved and k not in abstract_tree]
    if skipped:  # this orbax restores whole trees only: read the frozen subtree too (like the params), drop it
        abstract_tree = dict(abstract_tree, **{k: _like(saved[k], abstract_tree) for k in skipped})
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(item_dir, abstract_tree)
    return {k: v for k, v in restored.items() if k not in skipped} if skipped else restored


def _like(saved_subtree, abstract_tree):
    """An abstract tree for a saved frozen subtree: the model's own shardings when it mirrors the model."""
    names = lambda t: {_path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}  # noqa: E731
    if names(saved_subtree) == names(without_frozen(abstract_tree)):
        return without_frozen(abstract_tree)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved_subtree)


def load_params(path, abstract_params) -> Any:
    """Params from an exported dir, a checkpoint step dir, or a run dir (its latest complete checkpoint).

    abstract_params: pytree of jax.ShapeDtypeStruct with .sharding (e.g. jax.eval_shape of the init
    plus Experiment.state_shardings.params); arrays are read directly into those shardings, so
    any mesh shape or device count works. A shape mismatch is a UserError listing the parameters.
    """
    params_dir, _ = resolve_params_dir(path)
    check_shapes(params_dir, abstract_params, what="params")
    try:
        return restore_tree(params_dir, abstract_params)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for damaged files
        raise UserError(f"params at '{params_dir}' are damaged or incomplete ({type(e).__name__}: {str(e).splitlines()[0][:200]}); use another checkpoint") from None


def load_params_onto(path, model_cfg, mesh, rules) -> Any:
    """Params stored at `path` (a checkpoint step or export) read straight into the shardings that
    `rules` give `model_cfg`'s Transformer on `mesh` (nothing is materialised on one host first)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from maxtrain.model.transformer import Transformer
    from maxtrain.step import state_shardings

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda r: Transformer(model_cfg).init(r, jnp.zeros((1, 2), jnp.int32))["params"],
                               jax.random.PRNGKey(0))
    shardings = state_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), nn.unbox(boxed), shardings)
    return load_params(path, abstract)

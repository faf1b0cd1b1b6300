"""Load pretrained params into a finetuning model whose tree may hold new leaves (LoRA factors, a head).

The leaves a checkpoint lacks keep their fresh initialisation only when they are leaves a
finetune adds (LoRA's B is zero, the head is zero), so the model starts exactly at the base
model; any other missing or mismatching leaf is the checkpoint's UserError.
"""

from __future__ import annotations

import logging
from typing import Any

import jax

from maxtrain.checkpoint.manager import abstract_of
from maxtrain.checkpoint.params import load_params, resolve_params_dir
from maxtrain.finetune.trainable import new_leaf, path_name

log = logging.getLogger("maxtrain.finetune")


def saved_param_names(path) -> set[str]:
    """Paths (`layers/attn/q/kernel`) of the params stored at an export, step dir or run dir."""
    import orbax.checkpoint as ocp

    params_dir, _ = resolve_params_dir(path)
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.metadata(params_dir).item_metadata.tree
    return {path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _select(tree: Any, keep, prefix: str = "") -> Any:
    """The nested dict `tree` restricted to leaves whose path satisfies `keep`."""
    if not isinstance(tree, dict):
        return tree if keep(prefix) else None
    out = {}
    for k, v in tree.items():
        sub = _select(v, keep, f"{prefix}/{k}" if prefix else str(k))
        if sub is not None and not (isinstance(sub, dict) and not sub):
            out[k] = sub
    return out


def _overlay(base: Any, loaded: Any) -> Any:
    if not isinstance(base, dict):
        return base if loaded is None else loaded
    return {k: _overlay(v, loaded.get(k) if isinstance(loaded, dict) else None) for k, v in base.items()}


def load_pretrained(path, params: Any, *, partial: bool = False) -> Any:
    """`params` with every leaf stored at `path` restored (into the same shardings); new leaves kept.

    params: the freshly initialised (sharded) params of the run's model.
    partial: any leaf may be missing (loading saved adapters onto a base model).
    """
    saved = saved_param_names(path)
    names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    missing = [n for n in names if n not in saved]
    if not missing or not (partial or all(new_leaf(n) for n in missing)):
        return load_params(path, abstract_of(params))  # a full match, or the checkpoint's own error
    present = _select(params, lambda n: n in saved)
    loaded = load_params(path, abstract_of(present))
    log.info("loaded %d pretrained tensors from %s; %d new (LoRA / head) keep their initialisation",
             len(names) - len(missing), path, len(missing))
    return _overlay(params, loaded)

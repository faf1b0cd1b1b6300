"""Load pretrained params into a finetuning model whose tree may hold new leaves (LoRA factors, a head).

The leaves a checkpoint lacks keep their fresh initialisation only when they are leaves a
finetuning method adds (registry.py: LoRA's B is zero, adapters' up-projection zero, (IA)^3
vectors one, the head zero), so the model starts exactly at the base model; a method may
then set its leaves from the loaded weights (a soft prompt from the word embedding). Any
other missing or mismatching leaf is the checkpoint's UserError.
"""

from __future__ import annotations

import logging
import re
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


def load_pretrained(path, params: Any, *, partial: bool = False, model_cfg=None, tokenize=None, seed: int = 0) -> Any:
    """`params` with every leaf stored at `path` restored (into the same shardings); new leaves kept.

    params: the freshly initialised (sharded) params of the run's model.
    partial: any leaf may be missing (loading saved adapters onto a base model).
    model_cfg: the run's model; its methods' `init_from` hooks then run on the new leaves
    (tokenize: text -> token ids, for a soft prompt initialised from text).
    """
    from maxtrain.checkpoint.params import FROZEN_SUBTREES, without_frozen

    frozen = [k for k in FROZEN_SUBTREES if isinstance(params, dict) and k in params]
    saved = saved_param_names(path) if frozen else set()
    frozen = [k for k in frozen if not any(n.startswith(f"{k}/") for n in saved)]  # a run that has one: load it
    if frozen:  # DPO's frozen reference, fresh: a copy of exactly the weights the policy starts from
        loaded = load_pretrained(path, without_frozen(params), partial=partial, model_cfg=model_cfg, tokenize=tokenize,
                                 seed=seed)
        copy = jax.jit(lambda t: jax.tree.map(lambda x: x.copy(), t))(loaded)  # own buffers, same shardings
        return {**loaded, **{k: copy for k in frozen}}
    params = _load(path, params, partial)
    if model_cfg is not None:
        from maxtrain.finetune import registry

        names = {path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
        fresh = names - saved_param_names(path)
        for m, c in registry.active(model_cfg):
            if m.init_from is not None and any(re.fullmatch(m.leaves, n) for n in fresh):
                params = m.init_from(params, c, tokenize, seed)
    return params


def _load(path, params: Any, partial: bool) -> Any:
    saved = saved_param_names(path)
    names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    missing = [n for n in names if n not in saved]
    if not missing or not (partial or all(new_leaf(n) for n in missing)):
        return load_params(path, abstract_of(params))  # a full match, or the checkpoint's own error
    present = _select(params, lambda n: n in saved)
    loaded = load_params(path, abstract_of(present))
    log.info("loaded %d pretrained tensors from %s; %d new (finetuning methods) keep their initialisation",
             len(names) - len(missing), path, len(missing))
    return _overlay(params, loaded)

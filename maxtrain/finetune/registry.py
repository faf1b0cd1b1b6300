"""The finetuning methods: one row each, and the few functions that read the table.

A method is one module under maxtrain/finetune/ plus one `Method` row here. The row says
everything the rest of the stack needs: the config class (the `finetune.<name>` key, also
recorded in the checkpoint's model so `generate`, `eval`, `export` and `convert` rebuild
it), the parameters it adds at the hook points the model exposes, the trainable alias of
those parameters, how `init_from` treats them (new leaves keep their fresh, base-preserving
initialisation), and how it exports (merged into the weights, as a PEFT adapter, or a
clear refusal). Nothing outside this table names a method.

Hook points (each a function of the method's module, called by the model for every active
method that has one):

    linear_input(module, cfg, x) -> x        a projection's input (Linear, named q k v o gate up down)
    linear_output(module, cfg, x, y) -> y    a projection's output (x is its input)
    sublayer(module, cfg, where, h) -> h     a block's attention ("attn") or MLP ("mlp") output, before the residual
    kv_prefix(cfg, model_cfg, dtype, param_dtype) -> flax module, made in the Transformer's setup
                                             under the method's name; called, it returns per-layer keys and
                                             values [L, P, 2, K, H] that every real query attends to
    inputs(cfg, model_cfg, dtype, param_dtype) -> flax module (same); called on (x, positions,
                                             segment_ids) of the input embeddings, it returns them changed
    virtual_tokens(cfg) -> int               positions the method takes in front of each document
    init_from(params, cfg, tokenize, seed) -> params   after pretrained weights load (e.g. a soft
                                             prompt from the loaded word embedding)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterator

from maxtrain.errors import UserError


@dataclasses.dataclass(frozen=True)
class Method:
    """One finetuning method (a row of METHODS).

    name: the key under `finetune:` and the ModelConfig field that carries its config.
    alias: trainable-set alias of its leaves (`finetune.train: [alias]`); leaves: regex (full
      match) of the param paths it adds. efficient: by default only its leaves train (else the
      base trains too, as with a classification head).
    export: "merge" (folded into the weights), "drop" (left out with a warning), or "refuse".
    merge_params: fn(params, cfg) -> params with its leaves folded in and removed.
    merge_lazy: fn(flat {path: lazy leaf}, cfg) -> flat with its leaves folded in (HF export, per layer slice).
    peft: fn(flat, cfg, base ModelConfig, out_dir, base_model, dtype) writing a PEFT adapter dir, or None.
    no_export: what to do instead, for the error when it cannot be exported as asked.
    check: fn(cfg, model ModelConfig, run) -> error line or None (targets the model lacks, room in seq_len).
    conflicts: names of methods it cannot be combined with.
    """

    name: str
    config: type
    alias: str
    leaves: str
    efficient: bool = True
    export: str = "merge"
    merge_params: Callable | None = None
    merge_lazy: Callable | None = None
    peft: Callable | None = None
    no_export: str = ""
    check: Callable | None = None
    conflicts: tuple[str, ...] = ()
    linear_input: Callable | None = None
    linear_output: Callable | None = None
    sublayer: Callable | None = None
    kv_prefix: Callable | None = None
    inputs: Callable | None = None
    virtual_tokens: Callable | None = None
    init_from: Callable | None = None


def _rows() -> tuple[Method, ...]:
    from maxtrain.finetune import adapter, classifier, ia3, lora, prefix, prompt

    return (lora.METHOD, classifier.METHOD, adapter.METHOD, ia3.METHOD, prompt.METHOD, prefix.METHOD)


_METHODS: tuple[Method, ...] | None = None


def methods() -> tuple[Method, ...]:
    """Every registered method (imported on first use: the model's config imports the config classes)."""
    global _METHODS
    if _METHODS is None:
        _METHODS = _rows()
    return _METHODS


def method(name: str) -> Method:
    return {m.name: m for m in methods()}[name]


def names() -> tuple[str, ...]:
    return tuple(m.name for m in methods())


def active(holder: Any) -> Iterator[tuple[Method, Any]]:
    """(method, its config) for every method set on `holder` (a ModelConfig or a FinetuneConfig)."""
    if holder is None:
        return
    for m in methods():
        c = getattr(holder, m.name, None)
        if c is not None:
            yield m, c


def model_updates(finetune: Any) -> dict[str, Any]:
    """ModelConfig fields that carry a run's methods: {name: config or None} for every method."""
    return {m.name: getattr(finetune, m.name, None) for m in methods()}


def base_updates() -> dict[str, None]:
    """ModelConfig fields that remove every method (the base architecture)."""
    return {m.name: None for m in methods()}


def aliases() -> dict[str, str]:
    """Trainable-set aliases of the methods' leaves."""
    return {m.alias: m.leaves for m in methods()}


def new_leaf(name: str) -> bool:
    """Whether a param path is one a method adds (absent from pretrained checkpoints)."""
    return any(re.fullmatch(m.leaves, name) for m in methods())


def default_train(finetune: Any) -> tuple[str, ...]:
    """The trainable set when `finetune.train` is unset: the methods' leaves if any is parameter-efficient, else all."""
    on = list(active(finetune))
    if not any(m.efficient for m, _ in on):
        return ("all",)
    return tuple(m.alias for m, _ in on)


def virtual_tokens(model_cfg: Any) -> int:
    """Positions in front of every document taken by prompt / prefix methods (0 without them)."""
    return sum(m.virtual_tokens(c) for m, c in active(model_cfg) if m.virtual_tokens is not None)


def check_methods(finetune: Any, model_cfg: Any, run: Any = None) -> None:
    """UserError for methods that conflict or that do not fit the model or the run (one line each)."""
    on = list(active(finetune))
    for m, _ in on:
        for other, _ in on:
            if other.name in m.conflicts:
                raise UserError(
                    f"finetune.{m.name} and finetune.{other.name} cannot be combined (both change the same "
                    f"{'inputs' if m.virtual_tokens else 'projections'}); keep one of them"
                )
    for m, c in on:
        problem = m.check(c, model_cfg, run) if m.check is not None else None
        if problem:
            raise UserError(problem)


def targets_check(key: str, targets, model_cfg) -> str | None:
    """The error line for projection targets the model does not have (gate on a plain MLP)."""
    if model_cfg.mlp != "gated" and "gate" in targets:
        return (f"finetune.{key}.targets names 'gate' but model.mlp={model_cfg.mlp} has no gate projection; "
                "remove gate from the targets")
    return None


def export_refusal(model_cfg: Any, *, peft: bool) -> str | None:
    """Why this model cannot be written as asked (to-hf merged, or with --peft-adapter), else None."""
    for m, c in active(model_cfg):
        if peft and m.efficient and m.peft is None:
            return f"finetune.{m.name}: {m.no_export}"
        if not peft and m.export == "refuse":
            return f"finetune.{m.name}: {m.no_export}"
    return None

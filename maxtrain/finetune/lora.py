"""LoRA outside the model: merge adapters into base weights for export, save and load adapters alone.

Inside the model, `Linear` adds (alpha / r) * x A B when its name is a LoRA target (see
maxtrain/model/layers.py); A is [*in, r], B is [r, *out], stacked over layers by the scan.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp

from maxtrain.finetune.init import _select, load_pretrained
from maxtrain.finetune.trainable import new_leaf
from maxtrain.model.config import LoraConfig


def lora_delta(a: jnp.ndarray, b: jnp.ndarray, kernel_shape: tuple[int, ...], scale: float) -> jnp.ndarray:
    """scale * A B in the kernel's layout; works for one layer or a stack (leading layer axis)."""
    lead = a.ndim + b.ndim - len(kernel_shape) - 2  # 1 for scanned layers, 0 otherwise
    rank = a.shape[-1]
    fan_in = math.prod(a.shape[lead:-1])
    fan_out = math.prod(b.shape[lead + 1 :])
    a2 = a.reshape(*a.shape[:lead], fan_in, rank).astype(jnp.float32)
    b2 = b.reshape(*b.shape[:lead], rank, fan_out).astype(jnp.float32)
    return (scale * (a2 @ b2)).reshape(kernel_shape)


def merged_kernel(kernel, a, b, scale: float):
    """kernel + scale * A B, summed in f32 and stored in the kernel's dtype (one layer or a stack)."""
    return (kernel.astype(jnp.float32) + lora_delta(a, b, kernel.shape, scale)).astype(kernel.dtype)


def merge_lora(params: Any, lora: LoraConfig) -> Any:
    """Base-model params with every adapter folded in: kernel + (alpha / r) A B; the LoRA leaves removed.

    The result loads into the model without LoRA (`lora: null`) and gives the adapted logits.
    """
    if not isinstance(params, dict):
        return params
    if "lora_a" in params and "lora_b" in params:
        merged = merged_kernel(params["kernel"], params["lora_a"], params["lora_b"], lora.scale)
        rest = {k: v for k, v in params.items() if k not in ("lora_a", "lora_b", "kernel")}
        return {**rest, "kernel": merged}
    return {k: merge_lora(v, lora) for k, v in params.items()}


def split_lora(params: Any) -> tuple[Any, Any]:
    """(the base params without LoRA leaves, {path: {"lora_a", "lora_b"}} of every adapted kernel)."""
    adapters: dict[str, dict] = {}

    def walk(tree: Any, prefix: str) -> Any:
        if not isinstance(tree, dict):
            return tree
        if "lora_a" in tree and "lora_b" in tree:
            adapters[prefix] = {"lora_a": tree["lora_a"], "lora_b": tree["lora_b"]}
        return {k: walk(v, f"{prefix}/{k}" if prefix else k) for k, v in tree.items() if k not in ("lora_a", "lora_b")}

    return walk(params, ""), adapters


def adapter_params(params: Any) -> Any:
    """Only the leaves a finetune added (LoRA factors and a task head): what `save_adapters` writes."""
    return _select(params, new_leaf)


def save_adapters(path, params: Any, *, cfg, tokenizer_path: str | None = None) -> None:
    """Write the adapters alone (megabytes, not the base model) with the run's LoRA config in maxtrain.json."""
    from maxtrain.checkpoint import save_params

    ft = cfg.finetune
    extra = {
        "kind": "adapters",
        "lora": ft.lora.model_dump(mode="json") if ft.lora else None,
        "classifier": ft.classifier.model_dump(mode="json") if ft.classifier else None,
    }
    save_params(path, adapter_params(params), cfg=cfg, tokenizer_path=tokenizer_path, extra=extra)


def load_adapters(path, params: Any) -> Any:
    """`params` (a base model with fresh adapters) with the adapters saved at `path` restored."""
    return load_pretrained(path, params, partial=True)

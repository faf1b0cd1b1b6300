"""LoRA: y = x W + (alpha / r) dropout(x) A B on the target projections (a registry row, see registry.py).

The hook `linear_output` adds the low-rank term inside the model's `Linear` when its name
is a target; A is [*in, r], B is [r, *out] (zero at init), stacked over layers by the scan.
Outside the model: merge adapters into base weights for export, save and load adapters alone.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp

from maxtrain.finetune.registry import Method, new_leaf, targets_check
from maxtrain.model.config import LoraConfig


def linear_output(module, cfg: LoraConfig, x, y):
    """y + (alpha / r) * dropout(x) A B when `module` (a Linear) is a target; B is zero at init."""
    if module.name not in cfg.targets:
        return y
    import flax.linen as nn
    import jax

    from maxtrain.model.layers import _param, flat_matmul

    a_init = nn.initializers.normal(1.0 / math.sqrt(math.prod(module.in_shape)))
    a = _param(module, "lora_a", a_init, module.in_shape + (cfg.rank,), module.in_axes + (None,), module.param_dtype)
    b = _param(module, "lora_b", nn.initializers.zeros, (cfg.rank,) + module.out_shape, (None,) + module.out_axes, module.param_dtype)
    if cfg.dropout > 0 and module.has_rng("dropout"):  # training passes a dropout rng; eval does not
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - cfg.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - cfg.dropout), 0.0)
    xa = flat_matmul(x, a, len(module.in_shape), module.dtype)
    return y + (cfg.scale * flat_matmul(xa, b, 1, module.dtype)).astype(module.dtype)


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
    from maxtrain.finetune.init import _select

    return _select(params, new_leaf)


def save_adapters(path, params: Any, *, cfg, tokenizer_path: str | None = None) -> None:
    """Write the adapters alone (megabytes, not the base model) with the run's LoRA config in maxtrain.json."""
    from maxtrain.checkpoint import save_params
    from maxtrain.finetune.registry import model_updates

    extra = {"kind": "adapters"}
    extra.update({k: (c.model_dump(mode="json") if c is not None else None) for k, c in model_updates(cfg.finetune).items()})
    save_params(path, adapter_params(params), cfg=cfg, tokenizer_path=tokenizer_path, extra=extra)


def load_adapters(path, params: Any) -> Any:
    """`params` (a base model with fresh adapters) with the adapters saved at `path` restored."""
    from maxtrain.finetune.init import load_pretrained

    return load_pretrained(path, params, partial=True)


def merge_lazy(flat: dict, cfg: LoraConfig) -> dict:
    """{path: leaf} with every adapted kernel replaced by a per-layer merged view and the factors removed."""
    from maxtrain.convert.exporter import MergedKernel

    flat = dict(flat)
    for path in [p for p in flat if p.endswith("/lora_a")]:
        prefix = path[: -len("/lora_a")]
        a, b = flat.pop(prefix + "/lora_a"), flat.pop(prefix + "/lora_b")
        flat[prefix + "/kernel"] = MergedKernel(flat[prefix + "/kernel"], a, b, cfg.scale)
    return flat


def write_peft(flat: dict, cfg: LoraConfig, base_cfg, out_dir, *, base_model: str, dtype) -> None:
    """The factors as a PEFT LoRA adapter dir (maxtrain/convert/peft.py)."""
    from maxtrain.convert.peft import write_peft_adapter

    adapters = {p[: -len("/lora_a")]: {"lora_a": flat[p], "lora_b": flat[p[: -len("a")] + "b"]} for p in flat if p.endswith("/lora_a")}
    write_peft_adapter(adapters, cfg, base_cfg, out_dir, base_model=base_model, dtype=dtype)


METHOD = Method(
    name="lora", config=LoraConfig, alias="lora", leaves=r".*/lora_[ab]",
    export="merge", merge_params=lambda params, cfg: merge_lora(params, cfg), merge_lazy=merge_lazy, peft=write_peft,
    check=lambda cfg, model, run: targets_check("lora", cfg.targets, model),
    conflicts=(), linear_output=linear_output,
)

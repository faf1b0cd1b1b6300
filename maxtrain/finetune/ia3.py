"""(IA)^3 (Liu et al. 2022): learned vectors that scale keys, values and the MLP's intermediate activations.

Hook points: a projection's output (k, v: y * l) and input (the feed-forward `down`:
(x * l) W, PEFT's `feedforward_modules`). Vectors start at one, so the model equals its base
at step 0 (bitwise: x * 1 = x). Mergeable: the vector scales the kernel's output columns
(k, v) or input rows (down). PEFT's IA3 adapter stores the same vectors.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from maxtrain.finetune.registry import Method, targets_check

Target = Literal["q", "k", "v", "o", "gate", "up", "down"]


class IA3Config(BaseModel):
    """targets: projections scaled; feedforward: those of them scaled at their input (the MLP intermediate)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    targets: tuple[Target, ...] = ("k", "v", "down")
    feedforward: tuple[Target, ...] = ("down",)

    @model_validator(mode="after")
    def _ff_in_targets(self) -> "IA3Config":
        if not set(self.feedforward) <= set(self.targets):
            raise ValueError(f"ia3.feedforward {list(self.feedforward)} must be among ia3.targets {list(self.targets)}")
        return self


def _vector(module, shape, axes):
    import flax.linen as nn

    from maxtrain.model.layers import _param

    return _param(module, "ia3_l", nn.initializers.ones, shape, axes, module.param_dtype)


def linear_input(module, cfg: IA3Config, x):
    """x * l for feed-forward targets (l over the contracted input dims)."""
    if module.name not in cfg.feedforward:
        return x
    return x * _vector(module, module.in_shape, module.in_axes).astype(x.dtype)


def linear_output(module, cfg: IA3Config, x, y):
    """y * l for the other targets (l over the output dims)."""
    if module.name not in cfg.targets or module.name in cfg.feedforward:
        return y
    return y * _vector(module, module.out_shape, module.out_axes).astype(y.dtype)


def merge_params(params, cfg: IA3Config):
    """Params with every (IA)^3 vector folded into its kernel and removed (loads with ia3: null)."""
    if not isinstance(params, dict):
        return params
    out = {}
    for k, v in params.items():
        if isinstance(v, dict) and "ia3_l" in v:
            rest = {kk: vv for kk, vv in v.items() if kk not in ("ia3_l", "kernel")}
            out[k] = {**rest, "kernel": fold(v["kernel"], v["ia3_l"], k in cfg.feedforward)}
        else:
            out[k] = merge_params(v, cfg)
    return out


def fold(kernel, l_vec, feedforward: bool):
    """kernel * l: over the input rows (feed-forward) or the output columns; kernel [L, *in, *out], l [L, *dims]."""
    import jax.numpy as jnp

    k32, l32 = jnp.asarray(kernel).astype(jnp.float32), jnp.asarray(l_vec).astype(jnp.float32)
    extra = k32.ndim - l32.ndim  # the dims of the kernel the vector does not cover
    if feedforward:  # [L, *in] -> [L, *in, 1...]
        l32 = l32.reshape(l32.shape + (1,) * extra)
    else:  # [L, *out] -> [L, 1..., *out]
        l32 = l32.reshape(l32.shape[:1] + (1,) * extra + l32.shape[1:])
    return (k32 * l32).astype(kernel.dtype)


class _Folded:
    """A stacked kernel with its vector folded in, one layer slice at a time (HF export)."""

    def __init__(self, kernel, l_vec, feedforward: bool):
        self.kernel, self.l, self.ff = kernel, l_vec, feedforward
        self.shape = kernel.shape

    def __getitem__(self, i: int):
        import numpy as np

        return np.asarray(fold(np.asarray(self.kernel[i])[None], np.asarray(self.l[i])[None], self.ff)[0])


def merge_lazy(flat: dict, cfg: IA3Config) -> dict:
    flat = dict(flat)
    for path in [p for p in flat if p.endswith("/ia3_l")]:
        prefix = path[: -len("/ia3_l")]
        flat[prefix + "/kernel"] = _Folded(flat[prefix + "/kernel"], flat.pop(path), prefix.split("/")[-1] in cfg.feedforward)
    return flat


def write_peft(flat: dict, cfg: IA3Config, base_cfg, out_dir, *, base_model: str, dtype) -> None:
    from maxtrain.convert.peft import write_peft_ia3

    write_peft_ia3(flat, cfg, base_cfg, out_dir, base_model=base_model, dtype=dtype)


METHOD = Method(
    name="ia3", config=IA3Config, alias="ia3", leaves=r".*/ia3_l", export="merge",
    merge_params=merge_params, merge_lazy=merge_lazy, peft=write_peft,
    check=lambda cfg, model, run: targets_check("ia3", cfg.targets, model),
    conflicts=("lora",), linear_input=linear_input, linear_output=linear_output,
)

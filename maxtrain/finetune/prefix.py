"""Prefix tuning (Li & Liang 2021): learned per-layer keys and values in front of every document.

Hook point: attention keys/values. The prefixes are one flat table [P, L * 2 * K * H]
(PEFT's layout: per virtual token, layer-major, keys then values, kv heads for GQA), or,
with `reparameterize`, the output of a small MLP on a [P, D] embedding (tanh between two
dense layers), flattened the same way, which is how PEFT exports it. Every real query of
every packed document attends to them, padding does not; prefix keys carry no rotary
position, and documents move to positions P + their position (as PEFT's cache does). In
KV-cache generation the prefix sits in cache slots 0..P-1.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from maxtrain.finetune.registry import Method


class PrefixTuningConfig(BaseModel):
    """num_virtual_tokens: prefix length; reparameterize: train through an MLP of width `hidden` (0: d_model)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_virtual_tokens: int = Field(8, gt=0)
    reparameterize: bool = False
    hidden: int = Field(0, ge=0)
    init_std: float = Field(0.02, ge=0)


def kv_module(cfg: PrefixTuningConfig, model_cfg, dtype, param_dtype):
    """The flax module (`prefix_tuning/...`) returning the prefixes [L, P, 2, K, H]."""
    import flax.linen as nn
    import jax.numpy as jnp

    p, layers, k, h, d = cfg.num_virtual_tokens, model_cfg.num_layers, model_cfg.kv_heads, model_cfg.dim_per_head, model_cfg.d_model
    flat = layers * 2 * k * h
    init = nn.initializers.normal(cfg.init_std)

    class Prefix(nn.Module):
        def setup(self):
            if cfg.reparameterize:
                hidden = cfg.hidden or d
                self.embedding = self.param("embedding", nn.with_logical_partitioning(init, (None, "embed")), (p, d), param_dtype)
                self.dense_in = self.param("dense_in", nn.with_logical_partitioning(init, ("embed", None)), (d, hidden), param_dtype)
                self.bias_in = self.param("bias_in", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (hidden,), param_dtype)
                self.dense_out = self.param("dense_out", nn.with_logical_partitioning(init, (None, None)), (hidden, flat), param_dtype)
                self.bias_out = self.param("bias_out", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (flat,), param_dtype)
            else:
                self.embedding = self.param("embedding", nn.with_logical_partitioning(init, (None, None)), (p, flat), param_dtype)

        def flat(self):
            """The flat prefix table [P, L * 2 * K * H] (what PEFT stores)."""
            if not cfg.reparameterize:
                return self.embedding.astype(jnp.float32)
            z = jnp.tanh(self.embedding.astype(jnp.float32) @ self.dense_in.astype(jnp.float32) + self.bias_in.astype(jnp.float32))
            return z @ self.dense_out.astype(jnp.float32) + self.bias_out.astype(jnp.float32)

        def __call__(self):
            return self.flat().reshape(p, layers, 2, k, h).transpose(1, 0, 2, 3, 4).astype(dtype)  # [L, P, 2, K, H]

    return Prefix(name="prefix_tuning")


def flat_table(params, cfg: PrefixTuningConfig):
    """The flat [P, L * 2 * K * H] prefix table of stored params (applies the reparameterisation)."""
    import numpy as np

    t = {k: np.asarray(v, np.float32) for k, v in params.items()}
    if not cfg.reparameterize:
        return t["embedding"]
    return np.tanh(t["embedding"] @ t["dense_in"] + t["bias_in"]) @ t["dense_out"] + t["bias_out"]


def check(cfg: PrefixTuningConfig, model_cfg, run) -> str | None:
    from maxtrain.finetune.prompt import room_check

    return room_check("prefix_tuning", cfg.num_virtual_tokens, model_cfg, run)


def write_peft(flat, cfg: PrefixTuningConfig, base_cfg, out_dir, *, base_model: str, dtype) -> None:
    from maxtrain.convert.peft import write_peft_prefix

    write_peft_prefix(flat, cfg, base_cfg, out_dir, base_model=base_model, dtype=dtype)


METHOD = Method(
    name="prefix_tuning", config=PrefixTuningConfig, alias="prefix", leaves=r"prefix_tuning/.*", export="refuse",
    peft=write_peft,
    no_export="prefix keys/values cannot be merged into weights; export them with --peft-adapter DIR (PEFT prefix tuning)",
    check=check, conflicts=("prompt_tuning",), kv_prefix=kv_module,
    virtual_tokens=lambda cfg: cfg.num_virtual_tokens,
)

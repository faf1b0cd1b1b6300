"""Building blocks: projections, norms, rotary embeddings, MLP. Every parameter names its logical axes.

Parameters are stored in `param_dtype` and cast to the compute dtype at use, so f32 master
weights with bf16 matmuls is a config change.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxtrain.finetune import registry
from maxtrain.model.config import ModelConfig, RopeScaling

Dtype = Any


def _param(module: nn.Module, name: str, init, shape: Sequence[int], axes: Sequence[str], dtype: Dtype):
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def flat_matmul(x: jax.Array, kernel: jax.Array, n_in: int, dtype: Dtype) -> jax.Array:
    """Contract the last `n_in` dims of x with the first `n_in` of kernel as one 2-D GEMM.

    XLA:CPU runs [B*S, in] x [in, out] GEMMs far faster than dot_generals with several
    free or contracting dims (whose gradients add transposes); the reshapes are free and
    keep shardings (merged dims stay major-to-minor).
    """
    lead, n_out = x.shape[: x.ndim - n_in], kernel.ndim - n_in
    fan_in, out_shape = math.prod(kernel.shape[:n_in]), kernel.shape[n_in:]
    y = x.reshape(-1, fan_in).astype(dtype) @ kernel.reshape(fan_in, math.prod(out_shape)).astype(dtype)
    return y.reshape(*lead, *out_shape) if n_out else y.reshape(lead)


class Linear(nn.Module):
    """y = x @ W (+ b), where W maps `in_axes` dims of x to `out_shape` with logical names.

    `in_shape`/`in_axes` describe the trailing input dims contracted (e.g. (heads, head_dim)
    for the attention output projection), so weights keep their natural multi-dim layout
    and shard per head.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    use_bias: bool = False
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    # The model whose finetuning methods apply here (their `linear_input` / `linear_output`
    # hooks, e.g. LoRA, (IA)^3); they decide by this module's name (q k v o gate up down).
    finetune: ModelConfig | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hooks = [(m, c) for m, c in registry.active(self.finetune)]
        x_in = x
        for m, c in hooks:
            if m.linear_input is not None:
                x = m.linear_input(self, c, x)
        init = nn.initializers.normal(self.init_std)
        kernel = _param(self, "kernel", init, self.in_shape + self.out_shape, self.in_axes + self.out_axes, self.param_dtype)
        y = flat_matmul(x, kernel, len(self.in_shape), self.dtype)
        if self.use_bias:
            bias = _param(self, "bias", nn.initializers.zeros, self.out_shape, self.out_axes, self.param_dtype)
            y = y + bias.astype(self.dtype)
        for m, c in hooks:
            if m.linear_output is not None:
                y = m.linear_output(self, c, x_in, y)
        return y


class Norm(nn.Module):
    """RMSNorm (Llama, Qwen) or LayerNorm with bias (GPT-2); statistics in f32 for stability."""

    kind: str = "rmsnorm"
    eps: float = 1e-5
    axis_name: str = "norm"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        x32 = x.astype(jnp.float32)
        scale = _param(self, "scale", nn.initializers.ones, (dim,), (self.axis_name,), self.param_dtype)
        if self.kind == "rmsnorm":
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
            return (y * scale.astype(jnp.float32)).astype(self.dtype)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        bias = _param(self, "bias", nn.initializers.zeros, (dim,), (self.axis_name,), self.param_dtype)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
    """Inverse frequencies of RoPE, with Llama-3 wavelength-dependent scaling when configured.

    Llama 3.1+ divides low frequencies (long wavelengths) by `factor`, keeps high ones, and
    interpolates smoothly in between, so long contexts extrapolate without retraining.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    is_medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return jnp.where(is_medium, interpolated, scaled)


def rope_tables(positions_BxS: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sin, cos) of position x frequency, [B, S, 1, H/2] in f32: computed once per forward, shared by every layer.

    Left to itself XLA fuses sin/cos into every q/k rotation (forward and backward), which
    then evaluates them per element of every head: the costliest elementwise op on CPU
    (~8% of the demo step). `computed_once` makes the tables real arrays, read by all.
    """
    angles_BxSxH2 = positions_BxS[..., None].astype(jnp.float32) * inv_freq
    sin_BxSxH2, cos_BxSxH2 = computed_once(jnp.sin(angles_BxSxH2), jnp.cos(angles_BxSxH2), floor=-2.0)
    return sin_BxSxH2[:, :, None, :], cos_BxSxH2[:, :, None, :]


def computed_once(*xs: jax.Array, floor: float) -> tuple[jax.Array, ...]:
    """The arrays unchanged (all values must exceed `floor`), as buffers XLA computes once.

    XLA duplicates elementwise producers into each consuming fusion, and XLA:CPU drops
    `optimization_barrier` before fusing. A max-reduce is a fusion root that is never
    duplicated, so reducing each value against a constant below its range pins it.
    """
    stacked = jnp.stack(xs)
    pinned = jnp.max(jnp.stack([stacked, jnp.full_like(stacked, floor)], axis=-1), axis=-1)
    return tuple(pinned)


def apply_rope(x_BxSxNxH: jax.Array, sin_BxSx1xH2: jax.Array, cos_BxSx1xH2: jax.Array) -> jax.Array:
    """Rotate pairs (i, i + H/2) of each head by position x frequency (the HF/Llama "half" layout)."""
    x32 = x_BxSxNxH.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    sin, cos = sin_BxSx1xH2, cos_BxSx1xH2
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxSxNxH.dtype)


@jax.custom_vjp
def silu_gate(gate: jax.Array, up: jax.Array) -> jax.Array:
    """SwiGLU's silu(gate) * up (in f32, cast back), with a hand-written backward pass.

    Autodiff saves silu(gate) and its derivative as extra [B, S, F] tensors and splits the
    work over several passes; here the forward writes only the product and the backward
    recomputes the sigmoid from `gate` in one fused pass (~2x less elementwise memory
    traffic: on CPU these passes run at memory speed).
    """
    g32 = gate.astype(jnp.float32)
    return (g32 * jax.nn.sigmoid(g32) * up.astype(jnp.float32)).astype(up.dtype)


def _silu_gate_fwd(gate, up):
    return silu_gate(gate, up), (gate, up)


def _silu_gate_bwd(saved, dh):
    gate, up = saved
    g32, u32, dh32 = gate.astype(jnp.float32), up.astype(jnp.float32), dh.astype(jnp.float32)
    sig = jax.nn.sigmoid(g32)
    dgate = dh32 * u32 * sig * (1.0 + g32 * (1.0 - sig))  # d/dg [g sigmoid(g)]
    return dgate.astype(gate.dtype), (dh32 * g32 * sig).astype(up.dtype)


silu_gate.defvjp(_silu_gate_fwd, _silu_gate_bwd)

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


class Mlp(nn.Module):
    """Gated (SwiGLU: down(act(gate x) * up x)) or plain (GPT-2: down(act(up x))) feed-forward."""

    cfg: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxSxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        dense = lambda name, i, o, ia, oa: Linear(  # noqa: E731
            (i,), (o,), (ia,), (oa,), cfg.mlp_bias, cfg.init_std, self.dtype, self.param_dtype, cfg, name=name
        )
        act = ACTIVATIONS[cfg.activation]
        up_BxSxF = dense("up", cfg.d_model, cfg.ffn_dim, "embed", "mlp")(x_BxSxD)
        if cfg.mlp == "gated":
            gate_BxSxF = dense("gate", cfg.d_model, cfg.ffn_dim, "embed", "mlp")(x_BxSxD)
            h_BxSxF = silu_gate(gate_BxSxF, up_BxSxF) if cfg.activation == "silu" else act(gate_BxSxF) * up_BxSxF
        else:
            h_BxSxF = act(up_BxSxF)
        h_BxSxF = nn.with_logical_constraint(h_BxSxF, ("activation_batch", "activation_length", "activation_mlp"))
        return dense("down", cfg.ffn_dim, cfg.d_model, "mlp", "embed")(h_BxSxF)

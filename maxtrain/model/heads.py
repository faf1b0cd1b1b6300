"""Task heads on the final hidden states: sequence classification (last-token or mean pooling)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxtrain.model.config import ClassifierConfig
from maxtrain.model.layers import Dtype, Linear


def pool_hidden(hidden_BxSxD: jax.Array, segment_ids_BxS: jax.Array, pooling: str) -> jax.Array:
    """One vector per row: the last non-padding token's state, or the mean over non-padding tokens.

    Rows hold one example each (left-aligned, padding has segment id 0); a causal model's
    last token has seen the whole example, which is why `last` is the default.
    """
    real_BxS = segment_ids_BxS > 0
    if pooling == "last":
        idx_B = jnp.max(jnp.where(real_BxS, jnp.arange(real_BxS.shape[1]), 0), axis=1)
        return jnp.take_along_axis(hidden_BxSxD, idx_B[:, None, None], axis=1)[:, 0]
    w_BxS = real_BxS.astype(jnp.float32)
    total_BxD = jnp.einsum("bsd,bs->bd", hidden_BxSxD.astype(jnp.float32), w_BxS)
    return (total_BxD / jnp.maximum(w_BxS.sum(axis=1, keepdims=True), 1.0)).astype(hidden_BxSxD.dtype)


class ClassifierHead(nn.Module):
    """Class logits_BxC from pooled hidden states (a new, zero-initialised linear layer)."""

    cfg: ClassifierConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_BxSxD: jax.Array, segment_ids_BxS: jax.Array) -> jax.Array:
        pooled_BxD = pool_hidden(hidden_BxSxD, segment_ids_BxS, self.cfg.pooling)
        d = hidden_BxSxD.shape[-1]
        # Zero init: the head starts at uniform class probabilities (loss log C), whatever the backbone.
        head = Linear((d,), (self.cfg.num_labels,), ("embed",), (None,), True, 0.0, self.dtype, self.param_dtype, name="out")
        return head(pooled_BxD).astype(jnp.float32)

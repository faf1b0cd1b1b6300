"""Heads on the trunk's final hidden states, each applied by the objective that needs it.

Sequence classification (last-token, mean or first-token pooling), BERT's pooler (dense +
tanh on the first token) and the masked-LM head (dense, activation, norm, then a decoder
tied to the word embedding plus a bias over the vocabulary).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxtrain.model.config import ClassifierConfig, ModelConfig
from maxtrain.model.layers import ACTIVATIONS, Dtype, Linear, Norm, _param


def pool_hidden(hidden_BxSxD: jax.Array, segment_ids_BxS: jax.Array, pooling: str) -> jax.Array:
    """One vector per row: the last non-padding token's state, the mean over non-padding tokens, or the first token's.

    Rows hold one example each (left-aligned, padding has segment id 0); a causal model's
    last token has seen the whole example, which is why `last` is the default. `cls` takes
    the first token (an encoder's [CLS] / <s>, which attends to the whole row).
    """
    if pooling == "cls":
        return hidden_BxSxD[:, 0]
    real_BxS = segment_ids_BxS > 0
    if pooling == "last":
        idx_B = jnp.max(jnp.where(real_BxS, jnp.arange(real_BxS.shape[1]), 0), axis=1)
        return jnp.take_along_axis(hidden_BxSxD, idx_B[:, None, None], axis=1)[:, 0]
    w_BxS = real_BxS.astype(jnp.float32)
    total_BxD = jnp.einsum("bsd,bs->bd", hidden_BxSxD.astype(jnp.float32), w_BxS)
    return (total_BxD / jnp.maximum(w_BxS.sum(axis=1, keepdims=True), 1.0)).astype(hidden_BxSxD.dtype)


class Pooler(nn.Module):
    """tanh(dense(x)) of a pooled vector x_BxD (BERT's pooler; RoBERTa's classification head's first layer)."""

    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxD: jax.Array) -> jax.Array:
        d = x_BxD.shape[-1]
        dense = Linear((d,), (d,), ("embed",), (None,), True, self.init_std, self.dtype, self.param_dtype, name="dense")
        return jnp.tanh(dense(x_BxD))


class ClassifierHead(nn.Module):
    """Class logits_BxC from pooled hidden states (a new, zero-initialised linear layer).

    With `cls` pooling the first token goes through dense + tanh first: the caller passes
    the model's pooler output as `pooled_BxD` (BERT), or the head makes its own new dense
    layer (RoBERTa's classification head: dense, tanh, out_proj on <s>).
    """

    cfg: ClassifierConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    init_std: float = 0.02  # the head's own dense layer (cls pooling without a model pooler)

    @nn.compact
    def __call__(self, hidden_BxSxD: jax.Array, segment_ids_BxS: jax.Array, pooled_BxD: jax.Array | None = None) -> jax.Array:
        d = hidden_BxSxD.shape[-1]
        if pooled_BxD is None and self.cfg.pooling == "cls":
            dense = Linear((d,), (d,), ("embed",), (None,), True, self.init_std, self.dtype, self.param_dtype, name="dense")
            pooled_BxD = jnp.tanh(dense(pool_hidden(hidden_BxSxD, segment_ids_BxS, "cls")))
        elif pooled_BxD is None:
            pooled_BxD = pool_hidden(hidden_BxSxD, segment_ids_BxS, self.cfg.pooling)
        # Zero init: the head starts at uniform class probabilities (loss log C), whatever the backbone.
        head = Linear((d,), (self.cfg.num_labels,), ("embed",), (None,), True, 0.0, self.dtype, self.param_dtype, name="out")
        return head(pooled_BxD).astype(jnp.float32)


class MlmHead(nn.Module):
    """Masked-LM logits_BxSxV: norm(act(dense(h))) @ embedding^T + bias (BERT's cls.predictions, RoBERTa's lm_head)."""

    cfg: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_BxSxD: jax.Array, embedding_VxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        d = cfg.d_model
        dense = Linear((d,), (d,), ("embed",), (None,), True, cfg.init_std, self.dtype, self.param_dtype, name="dense")
        h_BxSxD = ACTIVATIONS[cfg.activation](dense(hidden_BxSxD))
        h_BxSxD = Norm(cfg.norm, cfg.norm_eps, "norm", self.dtype, self.param_dtype, name="norm")(h_BxSxD)
        bias_V = _param(self, "bias", nn.initializers.zeros, (cfg.vocab_size,), ("vocab",), self.param_dtype)
        logits_BxSxV = jnp.einsum("bsd,vd->bsv", h_BxSxD, embedding_VxD.astype(self.dtype)) + bias_V.astype(self.dtype)
        return nn.with_logical_constraint(logits_BxSxV, ("activation_batch", "activation_length", "activation_vocab"))

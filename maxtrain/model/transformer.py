"""The transformer stack: embeddings, pre-norm blocks scanned over layers, final norm, LM head."""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxtrain.model.attention import Attention, attention_mask
from maxtrain.model.config import ModelConfig
from maxtrain.model.heads import ClassifierHead
from maxtrain.model.layers import Dtype, Linear, Mlp, Norm, rope_frequencies, rope_tables

RematPolicy = Literal["none", "full", "dots"]

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything: least memory
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}

_ACT = ("activation_batch", "activation_length", "activation_embed")


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    cfg: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    decode: bool = False  # KV-cache generation (see Attention.decode)
    query_block: int = 0  # causal attention in query blocks (see attention.dot_product_attention)
    attention_kernel: str = "xla"  # see Attention.kernel

    @nn.compact
    def __call__(self, x_BxSxD, positions_BxS, mask_BxSxT, rope=None):
        cfg = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = dict(kind=cfg.norm, eps=cfg.norm_eps, axis_name="norm", **kw)
        h = Norm(name="attn_norm", **norm)(x_BxSxD)
        attn = Attention(
            cfg, name="attn", decode=self.decode, query_block=self.query_block, kernel=self.attention_kernel, **kw
        )
        x_BxSxD = x_BxSxD + attn(h, positions_BxS, mask_BxSxT, rope)
        h = Norm(name="mlp_norm", **norm)(x_BxSxD)
        x_BxSxD = x_BxSxD + Mlp(cfg, name="mlp", **kw)(h)
        return nn.with_logical_constraint(x_BxSxD, _ACT), None


class Transformer(nn.Module):
    """Decoder (or, with `causal=False`, encoder) stack over token ids.

    Returns logits_BxSxV in the compute dtype, or the final normed hidden states when
    `return_hidden` is set (for task heads and memory-lean losses).
    """

    cfg: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: RematPolicy = "none"
    unroll_layers: bool = False  # unroll the scan in HLO; the params keep their stacked layout
    attention_query_block: int = 0  # causal attention in query blocks of this many tokens; 0: one block
    attention_kernel: str = "xla"  # xla, or cudnn: fused flash attention on GPU (attention.fused_attention)
    # Generation: positions index a per-layer KV cache in the "cache" collection, passed and
    # returned with apply(..., mutable=["cache"]); see maxtrain/generate.py.
    decode: bool = False

    def setup(self):
        cfg = self.cfg
        init = nn.initializers.normal(cfg.init_std)
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(init, ("vocab", "embed")), (cfg.vocab_size, cfg.d_model), self.param_dtype
        )
        if cfg.positions == "learned":
            self.position_embedding = self.param(
                "position_embedding",
                nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, "embed")),
                (cfg.max_seq_len, cfg.d_model),
                self.param_dtype,
            )
        block = Block
        if self.remat != "none":
            block = nn.remat(Block, policy=_REMAT_POLICIES[self.remat], prevent_cse=False)
        self.layers = nn.scan(
            block,
            variable_axes={"params": 0, "cache": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            unroll=cfg.num_layers if self.unroll_layers else 1,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, self.dtype, self.param_dtype, self.decode, self.attention_query_block, self.attention_kernel, name="layers")
        self.final_norm = Norm(cfg.norm, cfg.norm_eps, "norm", self.dtype, self.param_dtype)
        if cfg.classifier is not None:
            self.classifier = ClassifierHead(cfg.classifier, self.dtype, self.param_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = Linear(
                (cfg.d_model,), (cfg.vocab_size,), ("embed",), ("vocab",), False, cfg.init_std, self.dtype, self.param_dtype
            )

    def __call__(
        self, tokens_BxS, positions_BxS=None, segment_ids_BxS=None, *, return_hidden: bool = False, classify: bool = False
    ):
        cfg = self.cfg
        if positions_BxS is None:
            positions_BxS = jnp.broadcast_to(jnp.arange(tokens_BxS.shape[1]), tokens_BxS.shape)
        if segment_ids_BxS is None:
            segment_ids_BxS = jnp.ones_like(tokens_BxS)
        x_BxSxD = jnp.take(self.embedding, tokens_BxS, axis=0).astype(self.dtype)
        if cfg.positions == "learned":
            x_BxSxD = x_BxSxD + jnp.take(self.position_embedding, positions_BxS, axis=0).astype(self.dtype)
        x_BxSxD = nn.with_logical_constraint(x_BxSxD, _ACT)
        mask_BxSxT = attention_mask(segment_ids_BxS, causal=cfg.causal, sliding_window=cfg.sliding_window)
        rope = None
        if cfg.positions == "rope":
            rope = rope_tables(positions_BxS, rope_frequencies(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling))
        x_BxSxD, _ = self.layers(x_BxSxD, positions_BxS, mask_BxSxT, rope)
        hidden_BxSxD = self.final_norm(x_BxSxD)
        if classify or (self.cfg.classifier is not None and self.is_initializing()):
            class_logits_BxC = self.classifier(hidden_BxSxD, segment_ids_BxS)  # init must create the head too
            if classify:
                return class_logits_BxC
        if return_hidden:
            return hidden_BxSxD
        return self.logits(hidden_BxSxD)

    def logits(self, hidden_BxSxD):
        """Project hidden states onto the vocabulary (the tied embedding or the LM head)."""
        if self.cfg.tie_embeddings:
            return jnp.einsum("bsd,vd->bsv", hidden_BxSxD, self.embedding.astype(self.dtype))
        return self.lm_head(hidden_BxSxD)

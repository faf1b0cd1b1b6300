"""The transformer stack: embeddings, pre- or post-norm blocks scanned over layers, final norm, LM head.

Encoders (BERT, RoBERTa) are the same stack with switches: bidirectional attention,
post-norm blocks, token-type embeddings and a norm on the embeddings; their heads (pooler,
MLM head, classifier) live in heads.py and are reached through methods (`mlm_logits`,
`pool`, `class_logits`) that objectives call with `apply(..., method=...)`.
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxtrain.finetune import registry
from maxtrain.model.attention import Attention, attention_mask
from maxtrain.model.config import ModelConfig
from maxtrain.model.heads import ClassifierHead, MlmHead, Pooler, pool_hidden
from maxtrain.model.layers import Dtype, Linear, Mlp, Norm, rope_frequencies, rope_tables

RematPolicy = Literal["none", "full", "dots"]

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything: least memory
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}

_ACT = ("activation_batch", "activation_length", "activation_embed")


class Block(nn.Module):
    """Residual block. Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)).

    Post-norm (BERT, RoBERTa): norm(x + attn(x)), then norm(x + mlp(x)), with the same norm names.
    """

    cfg: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    decode: bool = False  # KV-cache generation (see Attention.decode)
    query_block: int = 0  # causal attention in query blocks (see attention.dot_product_attention)
    attention_kernel: str = "xla"  # see Attention.kernel

    @nn.compact
    def __call__(self, x_BxSxD, positions_BxS, mask_BxSxT, rope=None, prefix_Px2xKxH=None):
        """prefix_Px2xKxH: this layer's prefix keys/values (prefix tuning), else None."""
        cfg = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = dict(kind=cfg.norm, eps=cfg.norm_eps, axis_name="norm", **kw)
        attn = Attention(
            cfg, name="attn", decode=self.decode, query_block=self.query_block, kernel=self.attention_kernel, **kw
        )
        mlp = Mlp(cfg, name="mlp", **kw)

        def sublayer(where, h):  # the finetuning hook on a sublayer's output, before the residual (adapters)
            for m, c in registry.active(cfg):
                if m.sublayer is not None:
                    h = m.sublayer(self, c, where, h)
            return h

        if cfg.norm_position == "post":
            a = sublayer("attn", attn(x_BxSxD, positions_BxS, mask_BxSxT, rope, prefix_Px2xKxH))
            x_BxSxD = Norm(name="attn_norm", **norm)(x_BxSxD + a)
            x_BxSxD = Norm(name="mlp_norm", **norm)(x_BxSxD + sublayer("mlp", mlp(x_BxSxD)))
            return nn.with_logical_constraint(x_BxSxD, _ACT), None
        h = Norm(name="attn_norm", **norm)(x_BxSxD)
        x_BxSxD = x_BxSxD + sublayer("attn", attn(h, positions_BxS, mask_BxSxT, rope, prefix_Px2xKxH))
        h = Norm(name="mlp_norm", **norm)(x_BxSxD)
        x_BxSxD = x_BxSxD + sublayer("mlp", mlp(h))
        return nn.with_logical_constraint(x_BxSxD, _ACT), None


class Transformer(nn.Module):
    """Decoder (or, with `causal=False`, encoder) stack over token ids.

    Returns logits_BxSxV in the compute dtype (the MLM head's when the model has one), or
    the final hidden states when `return_hidden` is set (for task heads and memory-lean losses).
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
                (cfg.max_seq_len + cfg.position_offset, cfg.d_model),
                self.param_dtype,
            )
        if cfg.type_vocab_size:
            self.token_type_embedding = self.param(
                "token_type_embedding",
                nn.with_logical_partitioning(init, (None, "embed")),
                (cfg.type_vocab_size, cfg.d_model),
                self.param_dtype,
            )
        if cfg.embed_norm:
            self.embed_norm = Norm(cfg.norm, cfg.norm_eps, "norm", self.dtype, self.param_dtype)
        block = Block
        if self.remat != "none":
            block = nn.remat(Block, policy=_REMAT_POLICIES[self.remat], prevent_cse=False)
        self.layers = nn.scan(
            block,
            variable_axes={"params": 0, "cache": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),  # the last: per-layer prefix keys/values
            length=cfg.num_layers,
            unroll=cfg.num_layers if self.unroll_layers else 1,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, self.dtype, self.param_dtype, self.decode, self.attention_query_block, self.attention_kernel, name="layers")
        # Finetuning methods with model-level parts (a soft prompt, prefix keys/values) keep
        # them in a submodule named after the method (registry.py: `inputs`, `kv_prefix`).
        for m, c in registry.active(cfg):
            for make in (m.inputs, m.kv_prefix):
                if make is not None:
                    setattr(self, m.name, make(c, cfg, self.dtype, self.param_dtype))
        if cfg.norm_position == "pre":  # post-norm blocks end normed
            self.final_norm = Norm(cfg.norm, cfg.norm_eps, "norm", self.dtype, self.param_dtype)
        if cfg.pooler:
            self.pooler = Pooler(cfg.init_std, self.dtype, self.param_dtype)
        if cfg.mlm_head:
            self.mlm_head = MlmHead(cfg, self.dtype, self.param_dtype)
        if cfg.classifier is not None:
            self.classifier = ClassifierHead(cfg.classifier, self.dtype, self.param_dtype, cfg.init_std)
        if not cfg.tie_embeddings:
            self.lm_head = Linear(
                (cfg.d_model,), (cfg.vocab_size,), ("embed",), ("vocab",), False, cfg.init_std, self.dtype, self.param_dtype
            )

    def __call__(
        self, tokens_BxS, positions_BxS=None, segment_ids_BxS=None, *, token_type_ids_BxS=None,
        return_hidden: bool = False, classify: bool = False,
    ):  # fmt: skip
        """token_type_ids_BxS: segment A/B ids of models with token types (default: all 0)."""
        cfg = self.cfg
        if positions_BxS is None:
            positions_BxS = jnp.broadcast_to(jnp.arange(tokens_BxS.shape[1]), tokens_BxS.shape)
        if segment_ids_BxS is None:
            segment_ids_BxS = jnp.ones_like(tokens_BxS)
        x_BxSxD = jnp.take(self.embedding, tokens_BxS, axis=0).astype(self.dtype)
        if cfg.type_vocab_size:
            types_BxS = jnp.zeros_like(tokens_BxS) if token_type_ids_BxS is None else token_type_ids_BxS
            x_BxSxD = x_BxSxD + jnp.take(self.token_type_embedding, types_BxS, axis=0).astype(self.dtype)
        prefix_LxPx2xKxH = None
        for m, c in registry.active(cfg):  # finetuning hooks on the input embeddings and keys/values
            if m.inputs is not None:  # a soft prompt in front of each row (shared segment -1)
                x_BxSxD, positions_BxS, segment_ids_BxS = getattr(self, m.name)(x_BxSxD, positions_BxS, segment_ids_BxS)
            if m.kv_prefix is not None:  # prefix keys/values take positions 0..P-1
                prefix_LxPx2xKxH = getattr(self, m.name)()
                positions_BxS = positions_BxS + prefix_LxPx2xKxH.shape[1]
        if cfg.positions == "learned":
            rows_BxS = positions_BxS + cfg.position_offset if cfg.position_offset else positions_BxS
            x_BxSxD = x_BxSxD + jnp.take(self.position_embedding, rows_BxS, axis=0).astype(self.dtype)
        if cfg.embed_norm:
            x_BxSxD = self.embed_norm(x_BxSxD)
        x_BxSxD = nn.with_logical_constraint(x_BxSxD, _ACT)
        mask_BxSxT = attention_mask(segment_ids_BxS, causal=cfg.causal, sliding_window=cfg.sliding_window)
        if prefix_LxPx2xKxH is not None:  # every real query sees the prefix; padding does not
            b, s, p = mask_BxSxT.shape[0], mask_BxSxT.shape[1], prefix_LxPx2xKxH.shape[1]
            sees_BxSxP = jnp.broadcast_to((segment_ids_BxS != 0)[:, :, None], (b, s, p))
            mask_BxSxT = jnp.concatenate([sees_BxSxP, mask_BxSxT], axis=2)
        rope = None
        if cfg.positions == "rope":
            rope = rope_tables(positions_BxS, rope_frequencies(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling))
        x_BxSxD, _ = self.layers(x_BxSxD, positions_BxS, mask_BxSxT, rope, prefix_LxPx2xKxH)
        x_BxSxD = x_BxSxD[:, x_BxSxD.shape[1] - tokens_BxS.shape[1] :]  # drop a soft prompt's states
        segment_ids_BxS = segment_ids_BxS[:, segment_ids_BxS.shape[1] - tokens_BxS.shape[1] :]
        hidden_BxSxD = self.final_norm(x_BxSxD) if cfg.norm_position == "pre" else x_BxSxD
        if self.is_initializing():  # init creates every head the config names
            if cfg.pooler:
                self.pool(hidden_BxSxD)
            if cfg.mlm_head:
                self.mlm_logits(hidden_BxSxD)
        if classify or (self.cfg.classifier is not None and self.is_initializing()):
            class_logits_BxC = self.class_logits(hidden_BxSxD, segment_ids_BxS)
            if classify:
                return class_logits_BxC
        if return_hidden:
            return hidden_BxSxD
        return self.mlm_logits(hidden_BxSxD) if cfg.mlm_head else self.logits(hidden_BxSxD)

    def logits(self, hidden_BxSxD):
        """Project hidden states onto the vocabulary (the tied embedding or the LM head)."""
        if self.cfg.tie_embeddings:
            return jnp.einsum("bsd,vd->bsv", hidden_BxSxD, self.embedding.astype(self.dtype))
        return self.lm_head(hidden_BxSxD)

    def mlm_logits(self, hidden_BxSxD):
        """Masked-LM logits_BxSxV of hidden states (heads.MlmHead, decoding with the word embedding)."""
        return self.mlm_head(hidden_BxSxD, self.embedding)

    def pool(self, hidden_BxSxD):
        """The pooler's tanh(dense(first token)), pooled_BxD (models with `pooler`)."""
        return self.pooler(pool_hidden(hidden_BxSxD, None, "cls"))

    def class_logits(self, hidden_BxSxD, segment_ids_BxS):
        """Class logits_BxC of the classification head; `cls` pooling goes through the model's pooler when it has one."""
        pooled_BxD = self.pool(hidden_BxSxD) if self.cfg.classifier.pooling == "cls" and self.cfg.pooler else None
        return self.classifier(hidden_BxSxD, segment_ids_BxS, pooled_BxD)

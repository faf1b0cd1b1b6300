"""Grouped-query self-attention with segment-aware masks (packed documents never see each other)."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxtrain.model.config import ModelConfig
from maxtrain.model.layers import Dtype, Linear, Norm, apply_rope


def attention_mask(
    segment_ids_BxS: jax.Array, *, causal: bool, sliding_window: int | None, kv_segment_ids_BxT: jax.Array | None = None
) -> jax.Array:
    """Boolean mask_BxSxT: True where query s may attend to key t.

    Keys must belong to the same segment (packed document); causal masks use token order,
    which within a segment equals position order. Padding (segment 0) attends to padding
    only, so no row is fully masked (no NaN) and padding never leaks into real tokens.
    Keys of the shared segment -1 (a soft prompt in front of the row) are visible to every
    real query; they themselves attend only to each other.
    """
    kv_seg = segment_ids_BxS if kv_segment_ids_BxT is None else kv_segment_ids_BxT
    mask = segment_ids_BxS[:, :, None] == kv_seg[:, None, :]
    mask |= (kv_seg[:, None, :] == -1) & (segment_ids_BxS[:, :, None] != 0)
    s_idx = jnp.arange(segment_ids_BxS.shape[1])[:, None]
    t_idx = jnp.arange(kv_seg.shape[1])[None, :]
    if causal:
        mask &= (t_idx <= s_idx)[None]
    if sliding_window is not None:
        mask &= (s_idx - t_idx < sliding_window)[None]
    return mask


def dot_product_attention(
    q_BxSxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array, mask_BxSxT: jax.Array, *,
    causal: bool = False, sliding_window: int | None = None, query_block: int = 0,
) -> jax.Array:
    """softmax(q k^T / sqrt(H)) v with N query heads sharing K kv heads; softmax in f32.

    With `query_block` > 0 and `causal`, queries go in blocks and block [s0, s1) reads only
    keys [s0 - window + 1, s1): the keys every row of the block could see. The mask still
    decides (segments, padding), so the result is exact; the blocks skip the masked upper
    triangle (~1/4 of the work at 2 blocks) and give XLA:CPU independent, cache-sized
    matmuls. Heads move ahead of the sequence (B K G S H) so each product is a plain
    batched GEMM with leading batch dims.
    """
    k_BxKxTxH, v_BxKxTxH = k_BxTxKxH.transpose(0, 2, 1, 3), v_BxTxKxH.transpose(0, 2, 1, 3)
    return heads_first_attention(
        q_BxSxNxH, k_BxKxTxH, v_BxKxTxH, mask_BxSxT, causal=causal, sliding_window=sliding_window, query_block=query_block
    )


def heads_first_attention(
    q_BxSxNxH: jax.Array, k_BxKxTxH: jax.Array, v_BxKxTxH: jax.Array, mask_BxSxT: jax.Array, *,
    causal: bool = False, sliding_window: int | None = None, query_block: int = 0,
) -> jax.Array:
    """dot_product_attention of keys/values stored heads first, [B, K, T, H] (the KV cache's layout).

    Reading them as they lie matters in decode: transposing a [B, T, K, H] cache would copy
    all of it every step, several times the work of the attention itself.
    """
    b, s, n, h = q_BxSxNxH.shape
    k, t = k_BxKxTxH.shape[1], k_BxKxTxH.shape[2]
    g = n // k
    q_BxKxGxSxH = (q_BxSxNxH * (1.0 / math.sqrt(h))).reshape(b, s, k, g, h).transpose(0, 2, 3, 1, 4)
    blocked = causal and 0 < query_block < s and s == t
    bounds = [(s0, min(s0 + query_block, s)) for s0 in range(0, s, query_block)] if blocked else [(0, s)]
    outs = []
    for s0, s1 in bounds:
        t0 = max(0, s0 - sliding_window + 1) if blocked and sliding_window else 0
        t1 = s1 if blocked else t
        q_blk = q_BxKxGxSxH[:, :, :, s0:s1].reshape(b, k, g * (s1 - s0), h)
        scores = jnp.einsum("bkqh,bkth->bkqt", q_blk, k_BxKxTxH[:, :, t0:t1]).astype(jnp.float32)
        scores_BxKxGxSxT = scores.reshape(b, k, g, s1 - s0, t1 - t0)
        keep = mask_BxSxT[:, None, None, s0:s1, t0:t1]
        scores_BxKxGxSxT = jnp.where(keep, scores_BxKxGxSxT, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores_BxKxGxSxT, axis=-1).astype(v_BxKxTxH.dtype)
        out = jnp.einsum("bkqt,bkth->bkqh", probs.reshape(b, k, g * (s1 - s0), t1 - t0), v_BxKxTxH[:, :, t0:t1])
        outs.append(out.reshape(b, k, g, s1 - s0, h))
    out_BxKxGxSxH = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out_BxKxGxSxH.transpose(0, 3, 1, 2, 4).reshape(b, s, n, h)


def fused_attention(
    q_BxSxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array, mask_BxSxT: jax.Array, *,
    causal: bool, sliding_window: int | None = None, implementation: str = "cudnn",
) -> jax.Array:
    """The same attention through `jax.nn.dot_product_attention` (cuDNN flash attention on GPU).

    A fused kernel never writes the [B, N, S, T] scores. Causal and window masks are built
    into the kernel, so it skips masked tiles; a segment mask (packed documents, padding)
    can only go in as an additive bias the kernel reads for every tile. So the batch picks
    one of two compiled branches at run time: rows that are each one unbroken segment run
    the bias-free kernel, batches with document boundaries or padding run it with the mask.
    """
    window = dict(local_window_size=(sliding_window - 1, 0)) if sliding_window else {}
    attend = functools.partial(
        jax.nn.dot_product_attention, is_causal=causal, implementation=implementation, **window
    )
    plain = lambda q, k, v, mask: attend(q, k, v)  # noqa: E731
    masked = lambda q, k, v, mask: attend(q, k, v, mask=mask[:, None])  # noqa: E731
    if not causal:  # a bidirectional row is unbroken only when the mask is all True
        unbroken = jnp.all(mask_BxSxT)
    else:  # causal: the mask must equal the kernel's own (lower triangle, within the window)
        s, t = mask_BxSxT.shape[1:]
        kernel_mask_SxT = attention_mask(jnp.ones((1, s), jnp.int32), causal=True, sliding_window=sliding_window)[0]
        unbroken = jnp.all(mask_BxSxT == kernel_mask_SxT[None]) if s == t else jnp.array(False)
    return jax.lax.cond(unbroken, plain, masked, q_BxSxNxH, k_BxTxKxH, v_BxTxKxH, mask_BxSxT)


class Attention(nn.Module):
    """Self-attention: q/k/v projections (optional bias, qk-norm), RoPE, GQA, output projection."""

    cfg: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    decode: bool = False  # generation: keys/values also go to (and attention reads) the "cache" collection
    query_block: int = 0  # causal attention in query blocks of this size (see dot_product_attention); 0: one block
    kernel: str = "xla"  # xla: dot_product_attention; cudnn: fused_attention (GPU, bf16/f16)

    @nn.compact
    def __call__(
        self, x_BxSxD: jax.Array, positions_BxS: jax.Array, mask_BxSxT: jax.Array, rope=None, prefix_Px2xKxH=None
    ) -> jax.Array:
        """rope: the (sin, cos) tables of layers.rope_tables for these positions (RoPE models).

        prefix_Px2xKxH: this layer's prefix keys and values (prefix tuning), in front of the
        keys every real query attends to (mask_BxSxT then has P + S columns); in decode they
        go to cache slots 0..P-1. They carry no rotary position.
        """
        cfg = self.cfg
        n, k, h, d = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head, cfg.d_model
        kw = dict(init_std=cfg.init_std, dtype=self.dtype, param_dtype=self.param_dtype, finetune=cfg)
        q_BxSxNxH = Linear((d,), (n, h), ("embed",), ("heads", "head_dim"), cfg.qkv_bias, name="q", **kw)(x_BxSxD)
        k_BxSxKxH = Linear((d,), (k, h), ("embed",), ("kv_heads", "head_dim"), cfg.qkv_bias, name="k", **kw)(x_BxSxD)
        v_BxSxKxH = Linear((d,), (k, h), ("embed",), ("kv_heads", "head_dim"), cfg.qkv_bias, name="v", **kw)(x_BxSxD)
        if cfg.qk_norm:
            norm = dict(kind="rmsnorm", eps=cfg.norm_eps, axis_name="head_dim", dtype=self.dtype, param_dtype=self.param_dtype)
            q_BxSxNxH = Norm(name="q_norm", **norm)(q_BxSxNxH)
            k_BxSxKxH = Norm(name="k_norm", **norm)(k_BxSxKxH)
        if rope is not None:
            q_BxSxNxH = apply_rope(q_BxSxNxH, *rope)
            k_BxSxKxH = apply_rope(k_BxSxKxH, *rope)
        if self.decode:
            k_BxKxTxH, v_BxKxTxH, mask_BxSxT = self._update_cache(k_BxSxKxH, v_BxSxKxH, positions_BxS, prefix_Px2xKxH)
        elif prefix_Px2xKxH is not None:
            b = k_BxSxKxH.shape[0]
            pre_BxPx2xKxH = jnp.broadcast_to(prefix_Px2xKxH[None].astype(k_BxSxKxH.dtype), (b,) + prefix_Px2xKxH.shape)
            k_BxSxKxH = jnp.concatenate([pre_BxPx2xKxH[:, :, 0], k_BxSxKxH], axis=1)
            v_BxSxKxH = jnp.concatenate([pre_BxPx2xKxH[:, :, 1].astype(v_BxSxKxH.dtype), v_BxSxKxH], axis=1)
        q_BxSxNxH = nn.with_logical_constraint(q_BxSxNxH, ("activation_batch", "activation_length", "activation_heads", None))
        if self.decode:  # the mask holds causality, the window and each row's length
            out_BxSxNxH = heads_first_attention(q_BxSxNxH, k_BxKxTxH, v_BxKxTxH, mask_BxSxT)
        elif self.kernel == "xla":
            out_BxSxNxH = dot_product_attention(
                q_BxSxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxSxT,
                causal=cfg.causal, sliding_window=cfg.sliding_window, query_block=self.query_block,
            )  # fmt: skip
        else:
            out_BxSxNxH = fused_attention(
                q_BxSxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxSxT,
                causal=cfg.causal and prefix_Px2xKxH is None, sliding_window=cfg.sliding_window, implementation=self.kernel,
            )  # fmt: skip
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)  # GPT-2 residual-projection scaling
        return Linear(
            (n, h), (d,), ("heads", "head_dim"), ("embed",), cfg.out_bias, out_std, self.dtype, self.param_dtype, cfg, name="o"
        )(out_BxSxNxH)

    def _update_cache(self, k_BxSxKxH, v_BxSxKxH, positions_BxS, prefix_Px2xKxH=None):
        """Write these keys/values into the KV cache at their positions; return the whole cache, [B, K, T, H], and its mask.

        Cache slot t holds position t of each row, so rows of one batch may sit at different
        lengths: a query at position p sees slots t <= p (within the window). Slots past a
        row's position hold stale or zero values that the mask hides until they are written.
        Heads come before slots, so attention reads the cache as it lies (no transposed copy).
        """
        cfg = self.cfg
        b, _, k, h = k_BxSxKxH.shape
        shape = (b, k, cfg.max_seq_len, h)  # used only if the caller gave no cache
        cached_k = self.variable("cache", "cached_k", jnp.zeros, shape, k_BxSxKxH.dtype)
        cached_v = self.variable("cache", "cached_v", jnp.zeros, shape, v_BxSxKxH.dtype)
        if prefix_Px2xKxH is not None:  # the prefix owns slots 0..P-1 (rewritten each call: same values)
            p = prefix_Px2xKxH.shape[0]
            pre_BxKxPx2xH = jnp.broadcast_to(prefix_Px2xKxH.transpose(2, 0, 1, 3)[None], (b, k, p, 2, h))
            cached_k.value = cached_k.value.at[:, :, :p].set(pre_BxKxPx2xH[..., 0, :].astype(cached_k.value.dtype))
            cached_v.value = cached_v.value.at[:, :, :p].set(pre_BxKxPx2xH[..., 1, :].astype(cached_v.value.dtype))
        # Row b's S new keys go to slots positions[b]: a scatter of B x S [K, H] pieces, in place.
        rows_Bx1 = jnp.arange(b)[:, None]
        cached_k.value = cached_k.value.at[rows_Bx1, :, positions_BxS].set(k_BxSxKxH.astype(cached_k.value.dtype))
        cached_v.value = cached_v.value.at[rows_Bx1, :, positions_BxS].set(v_BxSxKxH.astype(cached_v.value.dtype))
        slots_T = jnp.arange(cached_k.value.shape[2])
        mask_BxSxT = slots_T[None, None, :] <= positions_BxS[:, :, None]
        if cfg.sliding_window is not None:
            mask_BxSxT &= positions_BxS[:, :, None] - slots_T[None, None, :] < cfg.sliding_window
            if prefix_Px2xKxH is not None:  # a prefix stays visible whatever the window (as in training)
                mask_BxSxT |= (slots_T < prefix_Px2xKxH.shape[0])[None, None, :]
        return cached_k.value.astype(k_BxSxKxH.dtype), cached_v.value.astype(v_BxSxKxH.dtype), mask_BxSxT

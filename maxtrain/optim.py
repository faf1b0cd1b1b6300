"""Learning-rate schedules and the AdamW optimizer with clipping and a weight-decay mask."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from maxtrain.config import OptimizerConfig

# Weight decay applies to matmul weights and embeddings, never to norms' scales or biases.
_DECAYED_LEAVES = ("kernel", "embedding", "position_embedding")


def build_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine / linear decay to `min_lr_ratio * lr`, constant, or WSD.

    WSD (warmup-stable-decay) holds the peak and decays linearly over the last
    `wsd_decay_fraction` of the run, which makes continuing a run cheap.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay = max((cfg.decay_steps or total_steps) - warmup, 1)
    warm = optax.linear_schedule(0.0 if warmup else peak, peak, max(warmup, 1))
    if cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(peak, decay, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(peak, floor, decay)
    elif cfg.schedule == "constant":
        main = optax.constant_schedule(peak)
    else:
        decay_len = max(int(round(decay * cfg.wsd_decay_fraction)), 1)
        main = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay_len)], [decay - decay_len]
        )
    return optax.join_schedules([warm, main], [warmup]) if warmup else main


def weight_decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay (by leaf name, so it is independent of scan stacking)."""

    def decayed(path, _):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", str(last)))
        return name in _DECAYED_LEAVES

    return jax.tree_util.tree_map_with_path(decayed, params)


def build_optimizer(
    cfg: OptimizerConfig,
    total_steps: int,
    trainable: Callable[[tuple], bool] | None = None,
    row_masks: Callable[[tuple, int], Any] | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule): clip by global norm, then AdamW with masked decay.

    trainable: `(key_path) -> bool`; frozen leaves go through `set_to_zero` and hold no
      optimizer state (optax.multi_transform). None: every leaf trains.
    row_masks: `(key_path, ndim) -> 0/1 array or None`, multiplied into gradients before and
      updates after AdamW, so frozen slices of a stacked leaf (the first k layers) neither
      move nor decay.
    """
    schedule = build_schedule(cfg, total_steps)
    chain = []
    if cfg.clip_norm is not None:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    chain.append(
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=weight_decay_mask)
    )
    optimizer = optax.chain(*chain)
    if trainable is not None:
        labels = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
            lambda path, _: "train" if trainable(path) else "frozen", params
        )
        optimizer = optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)
    if row_masks is not None:
        optimizer = optax.chain(_scale_rows(row_masks), optimizer, _scale_rows(row_masks))
    return optimizer, schedule


def _scale_rows(row_masks: Callable[[tuple, int], Any]) -> optax.GradientTransformation:
    """Multiply each leaf by its row mask (stateless)."""

    def update(updates, state, params=None):
        del params

        def one(path, u):
            mask = row_masks(path, u.ndim)
            return u if mask is None else u * mask.astype(u.dtype)

        return jax.tree_util.tree_map_with_path(one, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)

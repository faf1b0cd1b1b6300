"""Sequence-level objectives on preference pairs: a Bradley-Terry reward model and DPO (sigmoid, IPO, hinge).

Pairs arrive packed like any document (data/preference.py): in a row, a pair is two
consecutive segments, prompt+chosen with an odd segment id s and prompt+rejected with s+1.
Everything per sequence comes from one helper, `sequence_sums`: a segment sum over
row * (S+1) + segment id (jax.ops.segment_sum), so the batch only gains id fields and the
step never learns what a pair is. Objectives return sums over pairs plus
metric_sums["weight"] = the number of pairs, so microbatches add up exactly (a pair never
spans two rows, and microbatches are sets of rows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maxtrain.objectives import ApplyFn, Batch, Objective, _dropout_rngs, token_cross_entropy


def sequence_sums(values_BxS: jax.Array, segment_ids_BxS: jax.Array) -> jax.Array:
    """Per-sequence sums [B, S+1] of per-token values: column s is segment s of the row (0: padding)."""
    b, s = segment_ids_BxS.shape
    flat = (jnp.arange(b)[:, None] * (s + 1) + segment_ids_BxS).reshape(-1)
    return jax.ops.segment_sum(values_BxS.reshape(-1), flat, num_segments=b * (s + 1)).reshape(b, s + 1)


def last_token_index(segment_ids_BxS: jax.Array) -> jax.Array:
    """[B, S+1]: the column of each segment's last token in its row (0 for absent segments)."""
    b, s = segment_ids_BxS.shape
    flat = (jnp.arange(b)[:, None] * (s + 1) + segment_ids_BxS).reshape(-1)
    cols = jnp.broadcast_to(jnp.arange(s), (b, s)).reshape(-1)
    last = jax.ops.segment_max(cols, flat, num_segments=b * (s + 1)).reshape(b, s + 1)
    return jnp.maximum(last, 0)  # empty segments give the dtype's minimum


def pairs(x_BxM: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(chosen [B, P], rejected [B, P]) columns of a per-sequence array: segments 1, 3, ... and 2, 4, ...."""
    p = (x_BxM.shape[1] - 1) // 2
    return x_BxM[:, 1 : 2 * p : 2], x_BxM[:, 2 : 2 * p + 1 : 2]


def pair_mask(segment_ids_BxS: jax.Array) -> jax.Array:
    """[B, P] float: 1 where the row holds a pair at that slot."""
    counts = sequence_sums(jnp.ones(segment_ids_BxS.shape, jnp.float32), segment_ids_BxS)
    c, r = pairs(counts)
    return ((c > 0) & (r > 0)).astype(jnp.float32)


def sequence_logps(apply_fn: ApplyFn, params, batch: Batch, rng=None) -> tuple[jax.Array, jax.Array]:
    """(sum of log p(target) over each sequence's weighted targets [B, S+1], weighted target count [B, S+1])."""
    logits_BxSxV = apply_fn(params, batch["tokens"], batch["positions"], batch["segment_ids"], **_dropout_rngs(rng))
    nll_BxS, _, _ = token_cross_entropy(logits_BxSxV, batch["targets"])
    w_BxS = batch["loss_weights"].astype(jnp.float32)
    seg = batch["segment_ids"]
    return sequence_sums(-nll_BxS * w_BxS, seg), sequence_sums(w_BxS, seg)


def last_token_hidden(hidden_BxSxD: jax.Array, segment_ids_BxS: jax.Array) -> jax.Array:
    """[B, S+1, D]: each segment's last-token hidden state (a causal model's summary of the sequence)."""
    idx_BxM = last_token_index(segment_ids_BxS)
    return jnp.take_along_axis(hidden_BxSxD, idx_BxM[..., None], axis=1)


def sequence_rewards(apply_fn: ApplyFn, params, batch: Batch, rng=None) -> jax.Array:
    """Scalar rewards [B, S+1]: the one-label head (heads.ClassifierHead) on each sequence's last token."""
    hidden_BxSxD = apply_fn(params, batch["tokens"], batch["positions"], batch["segment_ids"], return_hidden=True,
                            **_dropout_rngs(rng))
    h_BxMxD = last_token_hidden(hidden_BxSxD, batch["segment_ids"])
    b, m, d = h_BxMxD.shape
    # Each last token is its own one-token "row" for the head's `last` pooling.
    scores = apply_fn(params, h_BxMxD.reshape(b * m, 1, d), jnp.ones((b * m, 1), jnp.int32), method="class_logits")
    # The reward is kernel . h: no bias, like the bias-free `score` of HF's ...ForSequenceClassification
    # (a pairwise loss never sees a constant; centring would otherwise move it).
    bias = params["classifier"]["out"].get("bias")
    if bias is not None:
        scores = scores - bias.astype(jnp.float32)
    return scores[:, 0].reshape(b, m).astype(jnp.float32)


def reward_objective(apply_fn: ApplyFn, *, center_rewards: float = 0.0) -> Objective:
    """Bradley-Terry: -log sigmoid(r_chosen - r_rejected - margin) per pair, + center_rewards * (r_c + r_r)^2.

    The margin is the record's `margin` (batch field sequence_margin on the chosen sequence's
    last token). Metric sums: accuracy (r_c > r_r), margin (r_c - r_r), reward_chosen,
    reward_rejected, and weight = pairs; `correct` repeats accuracy for eval's report.
    """

    def objective(params, batch: Batch, rng):
        r_BxM = sequence_rewards(apply_fn, params, batch, rng)
        seg = batch["segment_ids"]
        rc, rr = pairs(r_BxM)
        margin, _ = pairs(sequence_sums(batch["sequence_margin"].astype(jnp.float32), seg))
        w = pair_mask(seg)
        per_pair = -jax.nn.log_sigmoid(rc - rr - margin)
        if center_rewards:
            per_pair = per_pair + center_rewards * jnp.square(rc + rr)
        loss_sum = jnp.sum(per_pair * w)
        acc = jnp.sum((rc > rr).astype(jnp.float32) * w)
        return loss_sum, {
            "weight": jnp.sum(w), "accuracy": acc, "correct": acc, "margin": jnp.sum((rc - rr) * w),
            "reward_chosen": jnp.sum(rc * w), "reward_rejected": jnp.sum(rr * w),
        }

    return objective


def adapters_off(params):
    """The base model inside LoRA params: every lora_b zeroed (no second copy of the base weights)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if getattr(path[-1], "key", None) == "lora_b" else x, params
    )


def dpo_pair_loss(delta: jax.Array, delta_ipo: jax.Array, *, loss: str, beta: float, label_smoothing: float) -> jax.Array:
    """Per-pair DPO-family loss of delta = (pi_c - ref_c) - (pi_r - ref_r) (TRL's definitions).

    sigmoid: -(1-ls) log sigmoid(beta delta) - ls log sigmoid(-beta delta) (conservative DPO
    when ls > 0); hinge: relu(1 - beta delta); ipo: (delta_ipo - 1/(2 beta))^2 on the
    log-ratios averaged per completion token (TRL's IPO normalisation).
    """
    if loss == "sigmoid":
        return -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * delta) - label_smoothing * jax.nn.log_sigmoid(-beta * delta)
    if loss == "hinge":
        return jax.nn.relu(1 - beta * delta)
    if loss == "ipo":
        return jnp.square(delta_ipo - 1 / (2 * beta))
    raise ValueError(f"unknown DPO loss {loss!r}")


FROZEN_REFERENCE = "reference"  # params[FROZEN_REFERENCE]: reference=frozen's copy (checkpoint.params.FROZEN_SUBTREES)


def dpo_objective(apply_fn: ApplyFn, *, beta: float = 0.1, loss: str = "sigmoid", label_smoothing: float = 0.0,
                  reference: str = "adapters_off", rpo_alpha: float = 0.0) -> Objective:
    """DPO against a frozen reference; metric sums carry TRL's names (rewards/chosen, ..., logps/rejected).

    reference: adapters_off (LoRA runs: the same params with every lora_b zeroed, under
      stop_gradient: no second copy of the weights, one extra forward pass), frozen
      (params["reference"], a frozen copy of the init_from weights that the trainable set
      keeps out of the optimizer: one copy of the weights, no optimizer state, one extra
      forward pass) or precomputed (the batch's reference_logps, from the records'
      ref_chosen_logps / ref_rejected_logps: no extra pass, no extra memory).
    rpo_alpha: adds rpo_alpha x the chosen reply's mean per-token NLL to each pair's loss
      (TRL's rpo_alpha), which keeps DPO from lowering the chosen likelihood; metric `nll/chosen`.
    """

    def reference_logps(params, batch):
        if reference == "precomputed":
            return sequence_sums(batch["reference_logps"].astype(jnp.float32), batch["segment_ids"])
        frozen = params[FROZEN_REFERENCE] if reference == "frozen" else adapters_off(params)
        ref, _ = sequence_logps(apply_fn, jax.lax.stop_gradient(frozen), batch)
        return jax.lax.stop_gradient(ref)

    def objective(params, batch: Batch, rng):
        logps, counts = sequence_logps(apply_fn, params, batch, rng)
        ref = reference_logps(params, batch)
        (pc, pr), (rc, rr), (nc, nr) = pairs(logps), pairs(ref), pairs(counts)
        w = pair_mask(batch["segment_ids"])
        ratio_c, ratio_r = pc - rc, pr - rr
        delta_ipo = ratio_c / jnp.maximum(nc, 1.0) - ratio_r / jnp.maximum(nr, 1.0)
        per_pair = dpo_pair_loss(ratio_c - ratio_r, delta_ipo, loss=loss, beta=beta, label_smoothing=label_smoothing)
        nll_c = -pc / jnp.maximum(nc, 1.0)
        if rpo_alpha:
            per_pair = per_pair + rpo_alpha * nll_c
        reward_c, reward_r = jax.lax.stop_gradient(beta * ratio_c), jax.lax.stop_gradient(beta * ratio_r)
        total = lambda x: jnp.sum(jax.lax.stop_gradient(x) * w)  # noqa: E731
        return jnp.sum(per_pair * w), {
            "weight": jnp.sum(w),
            "rewards/chosen": total(reward_c), "rewards/rejected": total(reward_r),
            "rewards/accuracies": total((reward_c > reward_r).astype(jnp.float32)),
            "rewards/margins": total(reward_c - reward_r),
            "logps/chosen": total(pc), "logps/rejected": total(pr), "nll/chosen": total(nll_c),
            "correct": total((reward_c > reward_r).astype(jnp.float32)),
        }  # fmt: skip

    return objective

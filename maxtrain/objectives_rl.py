"""Reinforcement learning from a reward: the clipped policy-gradient loss of GRPO / RLOO.

The rollout source (maxtrain/rl/rollouts.py) hands the step ordinary rows: prompt +
completion tokens, loss weights on the completion's targets, and per-token `advantages`,
`old_logps` (the policy's log-probs when it sampled) and `reference_logps` (the frozen
reference's). This objective only turns them into a loss; it never samples, scores or knows
about groups, so the step compiles once and microbatches like any other batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from maxtrain.objectives import ApplyFn, Batch, Objective, _dropout_rngs


def token_logps(apply_fn: ApplyFn, params, batch: Batch, *, temperature: float = 1.0, rng=None) -> tuple[jax.Array, jax.Array]:
    """(log p(target) [B, S], entropy of the next-token distribution [B, S]) at the sampling temperature, f32."""
    logits_BxSxV = apply_fn(params, batch["tokens"], batch["positions"], batch["segment_ids"], **_dropout_rngs(rng))
    logp_BxSxV = jax.nn.log_softmax(logits_BxSxV.astype(jnp.float32) / temperature, axis=-1)
    target_BxS = jnp.take_along_axis(logp_BxSxV, batch["targets"][..., None], axis=-1)[..., 0]
    entropy_BxS = -jnp.sum(jnp.exp(logp_BxSxV) * logp_BxSxV, axis=-1)
    return target_BxS, entropy_BxS


def group_advantages(rewards_NxG: jax.Array, *, baseline: str = "group_mean", scale: str = "group") -> jax.Array:
    """Advantages [N, G] of G completions per prompt: reward minus a baseline, optionally scaled.

    baseline: group_mean (GRPO) or leave_one_out (RLOO: the mean of the other G-1 rewards).
    scale: group (divide by the group's sample std + 1e-4), batch (the batch's std) or none.
    Works on numpy arrays too (the rollout source computes advantages on the host).
    """
    xp = jnp if isinstance(rewards_NxG, jax.Array) else np
    g = rewards_NxG.shape[1]
    total = rewards_NxG.sum(axis=1, keepdims=True)
    base = (total - rewards_NxG) / (g - 1) if baseline == "leave_one_out" else total / g
    adv = rewards_NxG - base
    if scale == "group":
        adv = adv / (xp.std(rewards_NxG, axis=1, ddof=1, keepdims=True) + 1e-4)
    elif scale == "batch":
        adv = adv / (xp.std(rewards_NxG, ddof=1) + 1e-4)
    return adv


def grpo_objective(apply_fn: ApplyFn, *, epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
                   aggregation: str = "sequence", max_completion_len: int = 1, temperature: float = 1.0,
                   fresh_rollouts: bool = True) -> Objective:
    """The clipped surrogate -min(r A, clip(r, 1-eps, 1+eps_high) A) + beta * KL_k3(policy || reference) per token.

    r = exp(logp - old_logp). fresh_rollouts (one optimisation step per rollout batch): the
    old log-probs are the current ones (r = 1 with its gradient; no extra forward pass);
    otherwise they come from the batch. KL is the k3 estimator exp(ref - logp) - (ref - logp) - 1.
    aggregation: sequence (the mean over each completion's tokens, then over completions),
    token (the mean over all completion tokens) or constant (the token sum over completions x
    max_completion_len). The step divides sums by metric_sums["weight"] once, so each choice
    is exact under microbatching. Metrics (kl, clip_ratio, entropy, advantage) are means over
    completions (token means for token aggregation).
    """
    high = epsilon if epsilon_high is None else epsilon_high

    def objective(params, batch: Batch, rng):
        logp_BxS, entropy_BxS = token_logps(apply_fn, params, batch, temperature=temperature, rng=rng)
        w_BxS = batch["loss_weights"].astype(jnp.float32)
        old_BxS = jax.lax.stop_gradient(logp_BxS) if fresh_rollouts else batch["old_logps"].astype(jnp.float32)
        adv_BxS = batch["advantages"].astype(jnp.float32)
        ratio_BxS = jnp.exp(logp_BxS - old_BxS)
        clipped_BxS = jnp.clip(ratio_BxS, 1 - epsilon, 1 + high)
        per_token = -jnp.minimum(ratio_BxS * adv_BxS, clipped_BxS * adv_BxS)
        log_ref_ratio = batch["reference_logps"].astype(jnp.float32) - logp_BxS
        kl_BxS = jnp.exp(log_ref_ratio) - log_ref_ratio - 1.0
        if beta:
            per_token = per_token + beta * kl_BxS
        # The clip bites where the ratio left the range in the direction the advantage pushes.
        is_clipped = ((ratio_BxS < 1 - epsilon) & (adv_BxS < 0)) | ((ratio_BxS > 1 + high) & (adv_BxS > 0))
        n_B = jnp.sum(w_BxS, axis=1)
        completions = jnp.sum((n_B > 0).astype(jnp.float32))

        def seq_mean_sum(x_BxS):  # sum over completions of each completion's token mean
            return jnp.sum(jnp.sum(x_BxS * w_BxS, axis=1) / jnp.maximum(n_B, 1.0))

        if aggregation == "sequence":
            loss_sum, weight, metric = seq_mean_sum(per_token), completions, seq_mean_sum
        elif aggregation == "token":
            loss_sum, weight = jnp.sum(per_token * w_BxS), jnp.sum(w_BxS)
            metric = lambda x: jnp.sum(x * w_BxS)  # noqa: E731
        elif aggregation == "constant":
            loss_sum, weight, metric = jnp.sum(per_token * w_BxS) / max_completion_len, completions, seq_mean_sum
        else:
            raise ValueError(f"unknown aggregation {aggregation!r}")
        sg = jax.lax.stop_gradient
        metrics = {"weight": weight, "clip_ratio": metric(is_clipped.astype(jnp.float32)),
                   "entropy": metric(sg(entropy_BxS)), "advantage": metric(adv_BxS)}
        if beta:  # without a reference there is no KL to report
            metrics["kl"] = metric(sg(kl_BxS))
        return loss_sum, metrics

    return objective

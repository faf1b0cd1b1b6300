"""Training objectives: pure `objective(params, batch, rng) -> (loss_sum, metric_sums)`.

Objectives return *sums* over tokens plus `metric_sums["weight"]` (the summed loss weights),
so the step can accumulate microbatches exactly and divide once: accumulation over k
microbatches equals the full batch regardless of how padding falls.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Batch = dict[str, jax.Array]
Objective = Callable[[Any, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
ApplyFn = Callable[..., jax.Array]


def token_cross_entropy(logits_BxSxV: jax.Array, targets_BxS: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(nll_BxS, logsumexp_BxS, correct_BxS) in f32; correct: the target has the top logit.

    "Correct" compares the target's logit with the row max (a plain reduce that XLA shares
    with logsumexp's) rather than an argmax, whose index-carrying reduce costs as much as
    the loss on CPU. A tie counts as correct.
    """
    logits = logits_BxSxV.astype(jnp.float32)
    max_BxS = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    lse_BxS = jnp.log(jnp.sum(jnp.exp(logits - max_BxS[..., None]), axis=-1)) + max_BxS
    target_logit_BxS = jnp.take_along_axis(logits, targets_BxS[..., None], axis=-1)[..., 0]
    correct_BxS = (target_logit_BxS >= max_BxS).astype(jnp.float32)
    return lse_BxS - target_logit_BxS, lse_BxS, correct_BxS


def chunked_token_cross_entropy(
    logits_of: Callable[[jax.Array], jax.Array], hidden_BxSxD: jax.Array, targets_BxS: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """token_cross_entropy over sequence chunks of `chunk` positions, logits recomputed in the backward pass.

    logits_of: hidden [B, c, D] -> logits [B, c, V]. Chunks run under `lax.scan` with
    `jax.checkpoint`, so only one chunk's logits (and their gradient) are live at a time.
    Chunking the sequence axis keeps the batch axis, and its sharding, intact.
    """
    b, s, d = hidden_BxSxD.shape
    n = -(-s // chunk)
    pad = n * chunk - s  # a short last chunk is padded; its extra positions are dropped below
    h_NxBxCxD = jnp.pad(hidden_BxSxD, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    t_NxBxC = jnp.pad(targets_BxS, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(h_BxCxD, t_BxC):
        return token_cross_entropy(logits_of(h_BxCxD), t_BxC)

    _, per_chunk = jax.lax.scan(lambda carry, xs: (carry, one_chunk(*xs)), None, (h_NxBxCxD, t_NxBxC))
    return tuple(x.swapaxes(0, 1).reshape(b, n * chunk)[:, :s] for x in per_chunk)


def causal_lm_objective(apply_fn: ApplyFn, *, z_loss: float = 0.0, loss_chunk: int = 0) -> Objective:
    """Next-token cross-entropy weighted by `loss_weights`, plus optional z-loss (z * logsumexp^2).

    The batch carries explicit `targets`, so packing, prompt masking (SFT) and masked-LM
    targets are all data-format concerns, not objective code.
    loss_chunk: > 0 computes the loss in sequence chunks (chunked_token_cross_entropy).
    """

    def objective(params, batch: Batch, rng: jax.Array):
        del rng  # no dropout in the base stack
        inputs = (params, batch["tokens"], batch["positions"], batch["segment_ids"])
        if loss_chunk:
            hidden_BxSxD = apply_fn(*inputs, return_hidden=True)
            logits_of = lambda h: apply_fn(params, h, method="logits")  # noqa: E731
            nll_BxS, lse_BxS, correct_BxS = chunked_token_cross_entropy(logits_of, hidden_BxSxD, batch["targets"], loss_chunk)
        else:
            nll_BxS, lse_BxS, correct_BxS = token_cross_entropy(apply_fn(*inputs), batch["targets"])
        w_BxS = batch["loss_weights"].astype(jnp.float32)
        nll_sum = jnp.sum(nll_BxS * w_BxS)
        z_sum = jnp.sum(jnp.square(lse_BxS) * w_BxS)
        metrics = {"weight": jnp.sum(w_BxS), "nll": nll_sum, "correct": jnp.sum(correct_BxS * w_BxS)}
        if z_loss:
            metrics["z_loss"] = z_loss * z_sum
        return nll_sum + z_loss * z_sum, metrics

    return objective


def _dropout_rngs(rng: jax.Array | None) -> dict:
    # Training passes the step's rng (LoRA dropout draws from it); evaluation passes None.
    return {} if rng is None else {"rngs": {"dropout": rng}}


def sft_objective(apply_fn: ApplyFn, *, z_loss: float = 0.0, loss_chunk: int = 0) -> Objective:
    """Instruction tuning: the causal-LM loss, with the step's rng as the dropout rng.

    Which tokens count (responses only, EOS included) is the SFT data format's job: it sets
    loss_weights to zero on prompts, so this objective adds nothing but dropout.
    """

    def objective(params, batch: Batch, rng: jax.Array | None):
        apply = lambda *args, **kw: apply_fn(*args, **kw, **_dropout_rngs(rng))  # noqa: E731
        return causal_lm_objective(apply, z_loss=z_loss, loss_chunk=loss_chunk)(params, batch, rng)

    return objective


def classification_objective(apply_fn: ApplyFn) -> Objective:
    """Cross-entropy of the classification head on `labels` [B] (label < 0: a padding row, no weight)."""

    def objective(params, batch: Batch, rng: jax.Array | None):
        logits_BxC = apply_fn(
            params, batch["tokens"], batch["positions"], batch["segment_ids"], classify=True, **_dropout_rngs(rng)
        ).astype(jnp.float32)
        labels_B = batch["labels"]
        w_B = (labels_B >= 0).astype(jnp.float32)
        safe_B = jnp.maximum(labels_B, 0)
        nll_B = jax.nn.logsumexp(logits_BxC, axis=-1) - jnp.take_along_axis(logits_BxC, safe_B[:, None], axis=-1)[:, 0]
        correct_B = (jnp.argmax(logits_BxC, axis=-1) == labels_B).astype(jnp.float32)
        nll_sum = jnp.sum(nll_B * w_B)
        return nll_sum, {"weight": jnp.sum(w_B), "nll": nll_sum, "correct": jnp.sum(correct_B * w_B)}

    return objective

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


def weighted_sums(nll: jax.Array, lse: jax.Array, correct: jax.Array, w: jax.Array) -> dict[str, jax.Array]:
    """Loss-weighted sums of token_cross_entropy's outputs: nll, lse^2 (the z-loss term), correct."""
    return {"nll": jnp.sum(nll * w), "z": jnp.sum(jnp.square(lse) * w), "correct": jnp.sum(correct * w)}


def chunked_lm_loss(
    logits_of: Callable[[Any, jax.Array], jax.Array], head_params: Any, hidden_BxSxD: jax.Array,
    targets_BxS: jax.Array, weights_BxS: jax.Array, *, chunk: int, z_loss: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted LM loss sum (cross-entropy + z_loss * logsumexp^2) over sequence chunks, and its metric sums.

    logits_of: (head_params, hidden [B, c, D]) -> logits [B, c, V]. Only one chunk's logits
    ever exist, and the gradient is taken as the chunks go by: the loss is the step's final
    scalar, so each chunk's d loss / d logits (softmax minus one-hot, weighted) is known in
    the forward pass and is pushed through the head right away. The backward pass only scales
    the stored gradients by the incoming cotangent, so no logits are recomputed (recomputing
    them cost 10% of a Llama 3.2 1B step on an H100). Gradients flow to head_params and hidden_BxSxD
    through the loss sum only; the metric sums are constants to autodiff.
    Chunking the sequence axis keeps the batch axis, and its sharding, intact.
    """
    b, s, d = hidden_BxSxD.shape
    n = -(-s // chunk)
    pad = n * chunk - s  # a short last chunk is padded with zero weights

    def chunks(x):  # [B, S, ...] -> [N, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)

    zeros = {k: jnp.zeros((), jnp.float32) for k in ("nll", "z", "correct")}

    def forward(head_params, hidden, targets, weights):
        def body(acc, x):
            h_BxCxD, t_BxC, w_BxC = x
            return jax.tree.map(jnp.add, acc, weighted_sums(*token_cross_entropy(logits_of(head_params, h_BxCxD), t_BxC), w_BxC)), None

        out, _ = jax.lax.scan(body, zeros, (chunks(hidden), chunks(targets), chunks(weights)))
        return out["nll"] + z_loss * out["z"], out

    def forward_with_grads(head_p, hidden_p, targets_p, weights_p):
        # symbolic_zeros: each leaf comes as (value, perturbed); frozen head leaves (a LoRA
        # finetune's embedding) get no gradient matmul at all.
        is_primal = lambda x: isinstance(x, jax.custom_derivatives.CustomVJPPrimal)  # noqa: E731
        head_leaves, treedef = jax.tree.flatten(jax.tree.map(lambda p: p.value, head_p, is_leaf=is_primal))
        wants = [p.perturbed for p in jax.tree.leaves(head_p, is_leaf=is_primal)]
        hidden, targets, weights = hidden_p.value, targets_p.value, weights_p.value

        def logits_of_trained(trained, h):
            it = iter(trained)
            return logits_of(treedef.unflatten([next(it) if w else x for x, w in zip(head_leaves, wants)]), h)

        def body(carry, x):
            acc, g_trained = carry
            h_BxCxD, t_BxC, w_BxC = x
            logits_BxCxV, pullback = jax.vjp(logits_of_trained, [x for x, w in zip(head_leaves, wants) if w], h_BxCxD)
            nll, lse, correct = token_cross_entropy(logits_BxCxV, t_BxC)
            probs_BxCxV = jnp.exp(logits_BxCxV.astype(jnp.float32) - lse[..., None])
            # d/dlogits of w * (lse - logit[t]) + z_loss * w * lse^2
            scale_BxC = w_BxC * (1.0 + 2.0 * z_loss * lse)
            onehot_BxCxV = jax.nn.one_hot(t_BxC, logits_BxCxV.shape[-1], dtype=jnp.float32)
            dlogits = probs_BxCxV * scale_BxC[..., None] - onehot_BxCxV * w_BxC[..., None]
            dtrained, dh_BxCxD = pullback(dlogits.astype(logits_BxCxV.dtype))
            return (jax.tree.map(jnp.add, acc, weighted_sums(nll, lse, correct, w_BxC)), jax.tree.map(jnp.add, g_trained, dtrained)), dh_BxCxD

        init = (zeros, [jnp.zeros_like(x) for x, w in zip(head_leaves, wants) if w])
        (out, g_trained), dh_NxBxCxD = jax.lax.scan(body, init, (chunks(hidden), chunks(targets), chunks(weights)))
        dh_BxSxD = dh_NxBxCxD.swapaxes(0, 1).reshape(b, n * chunk, d)[:, :s] if hidden_p.perturbed else None
        it = iter(g_trained)
        g_head = [next(it) if w else None for w in wants]  # None: a zero cotangent
        return (out["nll"] + z_loss * out["z"], out), (g_head, dh_BxSxD)

    def backward(grads, cotangents):
        ct = cotangents[0]  # the metric sums' cotangents are ignored (see docstring)
        zero = isinstance(ct, jax.custom_derivatives.SymbolicZero)
        scaled = lambda g: None if g is None or zero else (g * ct).astype(g.dtype)  # noqa: E731
        g_head, dh = grads
        return jax.tree.structure(head_params).unflatten([scaled(g) for g in g_head]), scaled(dh), None, None

    loss = jax.custom_vjp(forward)
    loss.defvjp(forward_with_grads, backward, symbolic_zeros=True)
    return loss(head_params, hidden_BxSxD, targets_BxS, weights_BxS.astype(jnp.float32))


def causal_lm_objective(apply_fn: ApplyFn, *, z_loss: float = 0.0, loss_chunk: int = 0) -> Objective:
    """Next-token cross-entropy weighted by `loss_weights`, plus optional z-loss (z * logsumexp^2).

    The batch carries explicit `targets`, so packing, prompt masking (SFT) and masked-LM
    targets are all data-format concerns, not objective code.
    loss_chunk: > 0 computes the loss in sequence chunks (chunked_lm_loss).
    """

    def objective(params, batch: Batch, rng: jax.Array):
        del rng  # no dropout in the base stack
        hidden_BxSxD = apply_fn(params, batch["tokens"], batch["positions"], batch["segment_ids"], return_hidden=True)
        logits_of = lambda head, h: apply_fn(head, h, method="logits")  # noqa: E731  (tied embedding or lm_head)
        return vocabulary_loss(logits_of, params, hidden_BxSxD, batch, z_loss=z_loss, loss_chunk=loss_chunk)

    return objective


def vocabulary_loss(logits_of, params, hidden_BxSxD: jax.Array, batch: Batch, *, z_loss: float, loss_chunk: int):
    """(loss sum, metric sums) of a vocabulary head on `targets` weighted by `loss_weights`.

    logits_of: (params, hidden) -> logits (the LM head, or the MLM head). loss_chunk > 0 runs
    it over sequence chunks (chunked_lm_loss) with only the head's parameters: every
    top-level parameter but the layer stack (embedding, lm_head or mlm_head).
    """
    w_BxS = batch["loss_weights"].astype(jnp.float32)
    if loss_chunk:
        head = {k: v for k, v in params.items() if k != "layers"}
        loss_sum, sums = chunked_lm_loss(logits_of, head, hidden_BxSxD, batch["targets"], w_BxS, chunk=loss_chunk, z_loss=z_loss)
    else:
        sums = weighted_sums(*token_cross_entropy(logits_of(params, hidden_BxSxD), batch["targets"]), w_BxS)
        loss_sum = sums["nll"] + z_loss * sums["z"]
    metrics = {"weight": jnp.sum(w_BxS), "nll": sums["nll"], "correct": sums["correct"]}
    if z_loss:
        metrics["z_loss"] = z_loss * sums["z"]
    return loss_sum, metrics


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


def masked_lm_objective(apply_fn: ApplyFn, *, z_loss: float = 0.0, loss_chunk: int = 0) -> Objective:
    """Masked-LM cross-entropy of the MLM head on `targets`, weighted by `loss_weights`.

    The mlm data format chooses and corrupts the positions: `tokens` is the corrupted input,
    `targets` the original ids, and `loss_weights` is 1 on the selected positions only, so
    the loss and "correct" (masked-token accuracy) count those alone. `token_type_ids` is
    read when the batch has it (BERT's segment A/B; absent means all 0). The step's rng is
    the dropout rng, as in the other finetuning objectives.
    loss_chunk: > 0 computes the loss in sequence chunks (chunked_lm_loss) through the MLM head.
    """

    def objective(params, batch: Batch, rng: jax.Array | None):
        kw = {"token_type_ids_BxS": batch["token_type_ids"]} if "token_type_ids" in batch else {}
        hidden_BxSxD = apply_fn(
            params, batch["tokens"], batch["positions"], batch["segment_ids"], return_hidden=True, **kw, **_dropout_rngs(rng)
        )
        logits_of = lambda head, h: apply_fn(head, h, method="mlm_logits")  # noqa: E731
        return vocabulary_loss(logits_of, params, hidden_BxSxD, batch, z_loss=z_loss, loss_chunk=loss_chunk)

    return objective

"""TrainState, sharded initialisation, and the one train step every mode shares.

A mode is an objective, a trainable set (the optimizer's masks) and a data format; the
step below knows none of them by name. It is compiled once with explicit in/out
shardings and donates the old state's buffers.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maxtrain.mesh import BATCH_AXES, logical_to_spec
from maxtrain.objectives import Objective


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree of arrays."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key: plain array, checkpoints as-is


def state_shardings(abstract_boxed: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree whose leaves may be `nn.Partitioned` (logical axes) or plain."""

    def one(leaf):
        if isinstance(leaf, nn.Partitioned) and not hasattr(leaf.value, "shape"):
            return leaf.value  # optax.MaskedNode: a frozen leaf's absent optimizer state stays absent
        if isinstance(leaf, nn.Partitioned):
            spec = logical_to_spec(leaf.names, leaf.value.shape, mesh, rules)
        else:
            spec = P()
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def init_train_state(
    init_params: Callable[[jax.Array], Any], optimizer: optax.GradientTransformation, seed: int, mesh: Mesh, rules
) -> tuple[TrainState, Any]:
    """Initialise params and optimizer state directly into their shardings (never whole on a host).

    `init_params(rng)` returns params boxed with logical axis names; the optimizer state
    inherits the boxes (Adam's moments mirror the params) and so their shardings.
    """

    def boxed_state(rng):
        params_rng, train_rng = jax.random.split(rng)
        params = init_params(params_rng)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=train_rng)

    rng = jax.random.PRNGKey(seed)
    shardings = state_shardings(jax.eval_shape(boxed_state, rng), mesh, rules)
    init = jax.jit(lambda r: nn.unbox(boxed_state(r)), out_shardings=shardings)
    return init(rng), shardings


def _split_microbatches(x: jax.Array, k: int) -> jax.Array:
    # Strided split: microbatch i takes rows i, i+k, ... so every device holds a slice of
    # every microbatch and all devices work on each one (a contiguous split would idle most).
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def build_train_step(
    objective: Objective,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    microbatches: int = 1,
    mesh: Mesh | None = None,
    trainable: Callable[[tuple], bool] | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure step: grads summed over microbatches, normalised once by the loss weight, AdamW update.

    trainable: `(key_path) -> bool` over parameter leaves; only those are differentiated (the
      frozen ones enter the objective as constants, so no gradient is ever computed for them).
      None: all leaves. Every training mode is this same function; modes differ only by the
      objective, this set and the data format.
    """

    def grad_fn(params, batch, rng):
        # Differentiate w.r.t. the trainable leaves only: a flat list, rebuilt into the tree.
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        keep = [trainable is None or trainable(path) for path, _ in flat]
        leaves = [x for _, x in flat]

        def of_trainable(train_leaves):
            it = iter(train_leaves)
            full = [next(it) if k else x for x, k in zip(leaves, keep)]
            return objective(treedef.unflatten(full), batch, rng)

        return jax.value_and_grad(of_trainable, has_aux=True)([x for x, k in zip(leaves, keep) if k])

    def full_grads(params, train_grads):
        """The gradient tree the optimizer expects; frozen leaves get zeros it never reads."""
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        it = iter(train_grads)
        return treedef.unflatten([next(it) if trainable is None or trainable(p) else jnp.zeros_like(x) for p, x in flat])

    def sums_and_grads(params, batch, rng):
        if microbatches == 1:
            (loss_sum, sums), grads = grad_fn(params, batch, rng)
            return loss_sum, sums, grads
        micro = jax.tree.map(lambda x: _split_microbatches(x, microbatches), batch)
        if mesh is not None:
            spec = NamedSharding(mesh, P(None, BATCH_AXES))
            micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, spec), micro)
        rngs = jax.random.split(rng, microbatches)
        first = jax.tree.map(lambda x: x[0], micro)
        (l0, s0), g0 = jax.eval_shape(grad_fn, params, first, rng)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (l0, s0, g0))

        def body(acc, inputs):
            mb, r = inputs
            (loss_sum, sums), grads = grad_fn(params, mb, r)
            return jax.tree.map(jnp.add, acc, (loss_sum, sums, grads)), None

        (loss_sum, sums, grads), _ = jax.lax.scan(body, zeros, (micro, rngs))
        return loss_sum, sums, grads

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)
        loss_sum, sums, train_grads = sums_and_grads(state.params, batch, step_rng)
        weight = jnp.maximum(sums["weight"], 1.0)
        train_grads = jax.tree.map(lambda g: (g / weight).astype(g.dtype), train_grads)
        grads = full_grads(state.params, train_grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss_sum / weight,
            "grad_norm": optax.tree.norm(train_grads),
            "lr": schedule(state.step),
            "tokens": sums["weight"],
            **{k: v / weight for k, v in sums.items() if k != "weight"},
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

    return train_step


def build_eval_step(objective: Objective) -> Callable[[Any, dict], dict]:
    """Sums of the objective's metrics on one batch (the caller adds batches, then divides); rng=None."""

    def eval_step(params, batch):
        loss_sum, sums = objective(params, batch, None)  # no rng: no dropout in evaluation
        return {"loss_sum": loss_sum, **sums}

    return eval_step


# XLA:CPU hands matmuls and reductions to YNNPACK by default. On the CPU benchmark
# (benchmarks/train_throughput.py: demo shape, 2 cores) the step ran ~6% faster on XLA's own
# kernels (Eigen matmuls, which also overlap with the elementwise work), measured step
# against step in one process. An XLA_FLAGS setting of the same flag wins.
_YNN_FUSIONS = "xla_cpu_experimental_ynn_fusion_type"


def xla_options(mesh: Mesh, configured: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The compiler options for the step: `configured` if given, else the measured platform defaults."""
    if configured is not None:
        return dict(configured) or None
    if mesh.devices.flat[0].platform != "cpu" or _YNN_FUSIONS in os.environ.get("XLA_FLAGS", ""):
        return None
    return {_YNN_FUSIONS: ""} if _xla_knows(_YNN_FUSIONS) else None


@functools.cache
def _xla_knows(option: str) -> bool:
    """Whether this jaxlib accepts the CPU compiler option (older and newer XLAs may not have it)."""
    try:
        jax.jit(lambda x: x + 1).lower(jnp.zeros((), jnp.float32)).compile(compiler_options={option: ""})
        return True
    except Exception:  # an unknown option is an INVALID_ARGUMENT from XLA
        return False


def jit_train_step(step_fn, state_shardings_: Any, batch_sharding: NamedSharding, options: dict[str, Any] | None = None):
    """Compile the step with explicit shardings; the incoming state's buffers are donated.

    options: XLA compiler options (see `xla_options`).
    """
    replicated = NamedSharding(batch_sharding.mesh, P())
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings_, batch_sharding),
        out_shardings=(state_shardings_, replicated),
        donate_argnums=(0,),
        compiler_options=options,
    )

"""Fit check: compile the train step for a target mesh from abstract shapes, report what each device holds.

`maxtrain plan CONFIG --devices 64` (or `maxtrain train ... --dry-run --devices 64`) runs on
a CPU with that many fake devices: the state is only `jax.ShapeDtypeStruct`s carrying their
shardings (nothing is materialised, so llama3.1-8b plans on a laptop), the step is lowered
and compiled by XLA with the real partitioner, and the report gives per-device bytes of
parameters, optimizer state, batch and XLA's temporaries (activations, gradients,
collective buffers), plus FLOPs per step.

The CPU compiler's buffer assignment is not a GPU's or TPU's, so temporaries are an
estimate (usually within tens of percent); parameter and optimizer bytes are exact.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from typing import Any

from maxtrain.config import RunConfig
from maxtrain.errors import UserError

GIB = 2**30


def _shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with NamedShardings (the largest shard)."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        total += math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    return total


def _global_bytes(tree: Any) -> int:
    import jax

    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def _abstract(tree: Any, shardings: Any) -> Any:
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def plan_run(cfg: RunConfig, *, target: str = "gpu", devices=None, compile: bool = True) -> dict[str, Any]:
    """Compile `cfg`'s train step for a mesh over `devices` (default: all) and measure it.

    target: gpu|tpu make `train.compute_dtype=auto` bf16 as it would be there; cpu keeps f32.
    compile: False skips XLA (state and batch bytes only; temporaries and XLA FLOPs are 0/nan).
    Returns a dict of per-device bytes (params, optimizer, batch, temporaries, peak),
    FLOPs per step (XLA's count and the analytic 6N+attention count) and the mesh.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from maxtrain import experiment as ex
    from maxtrain.mesh import batch_sharding, build_mesh
    from maxtrain.optim import build_optimizer
    from maxtrain.step import TrainState, build_train_step, jit_train_step, state_shardings, xla_options

    # The same pieces build_experiment wires, minus materialising the state.
    mesh = build_mesh(cfg.mesh, devices)
    ex.check_batch_geometry(cfg, mesh)
    if jax.default_backend() != "gpu":
        # cuDNN kernels compile only on a GPU: plan the XLA attention, whose [B, N, S, S]
        # scores make the temporaries an upper bound for a GPU run.
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"attention": "xla"})})
    model = ex.build_model(cfg, target)
    dtype = model.dtype
    rules = cfg.mesh.rules
    apply_fn = ex.make_apply_fn(model, rules)
    objective = ex.build_objective(cfg, apply_fn)
    _, is_trainable, row_masks = ex.trainable_parts(cfg)
    optimizer, schedule = build_optimizer(cfg.optimizer, cfg.steps, is_trainable, row_masks)
    example = jnp.zeros((1, min(cfg.train.seq_len, 8)), jnp.int32)

    def boxed_state(rng):
        params_rng, train_rng = jax.random.split(rng)
        with nn.logical_axis_rules(rules):
            params = model.init(params_rng, example)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=train_rng)

    with jax.set_mesh(mesh):
        boxed = jax.eval_shape(boxed_state, jax.random.PRNGKey(cfg.seed))
        shardings = state_shardings(boxed, mesh, rules)
        state = _abstract(nn.unbox(boxed), shardings)
        rows, seq = cfg.train.global_batch, cfg.train.seq_len
        bsh = batch_sharding(mesh)
        fields = {"tokens": jnp.int32, "targets": jnp.int32, "loss_weights": jnp.float32,
                  "segment_ids": jnp.int32, "positions": jnp.int32}  # fmt: skip
        batch = {k: jax.ShapeDtypeStruct((rows, seq), t, sharding=bsh) for k, t in fields.items()}
        step = build_train_step(objective, optimizer, schedule, microbatches=cfg.train.microbatches, mesh=mesh,
                                trainable=is_trainable)  # fmt: skip
        options = xla_options(mesh, cfg.train.xla_options)
        compiled = jit_train_step(step, shardings, bsh, options).lower(state, batch).compile() if compile else None

    memory = compiled.memory_analysis() if compiled is not None else None
    cost = compiled.cost_analysis() if compiled is not None else None
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    n = mesh.devices.size
    params_b, opt_b, batch_b = _shard_bytes(state.params), _shard_bytes(state.opt_state), _shard_bytes(batch)
    temp_b = int(getattr(memory, "temp_size_in_bytes", 0)) if memory is not None else 0
    analytic = cfg.model.flops_per_token(seq) * rows * seq
    return {
        "devices": n,
        "mesh": dict(mesh.shape),
        "target": target,
        "compute_dtype": jnp.dtype(dtype).name,
        "attention": model.attention_kernel,
        "params_bytes": _global_bytes(state.params),
        "param_count": sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
        "params_bytes_per_device": params_b,
        "optimizer_bytes_per_device": opt_b,
        "batch_bytes_per_device": batch_b,
        "temp_bytes_per_device": temp_b,  # activations, gradients, collective buffers (XLA's temporaries)
        # Params and optimizer state are donated and updated in place, so the peak is the state
        # plus the batch plus the temporaries.
        "peak_bytes_per_device": params_b + opt_b + batch_b + temp_b,
        "flops_per_step_xla": float(cost.get("flops", float("nan"))) * n,
        "flops_per_step_analytic": analytic,
    }


def format_plan(report: dict[str, Any], memory_gib: float | None = None) -> str:
    """The report as a few aligned lines, with a fits/does-not-fit verdict when memory_gib is given."""
    def size(b: float) -> str:
        for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
            if b >= scale:
                return f"{b / scale:9.2f} {unit}"
        return f"{b:9.0f} B  "

    mesh = " x ".join(f"{k}={v}" for k, v in report["mesh"].items())
    lines = [
        f"plan: {report['param_count'] / 1e6:.1f}M params on {report['devices']} devices ({mesh}), "
        f"compute {report['compute_dtype']} (target {report['target']})",
        f"  params            {size(report['params_bytes_per_device'])} per device",
        f"  optimizer state   {size(report['optimizer_bytes_per_device'])} per device",
        f"  batch             {size(report['batch_bytes_per_device'])} per device",
        f"  activations+temp  {size(report['temp_bytes_per_device'])} per device (XLA CPU estimate)",
        f"  peak              {size(report['peak_bytes_per_device'])} per device",
        f"  FLOPs per step    {report['flops_per_step_analytic']:.4g} (6N + attention; "
        f"XLA's cost analysis says {report['flops_per_step_xla']:.4g}, counting a scanned layer once)",
    ]
    if memory_gib:
        peak = report["peak_bytes_per_device"] / GIB
        verdict = "fits" if peak <= memory_gib else "does NOT fit"
        lines.append(f"  {verdict} in {memory_gib:g} GiB per device ({100 * peak / memory_gib:.0f}% used)")
    return "\n".join(lines)


def _backends_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # an internal API moved: assume started, so we re-exec (always correct)
        return True


def fake_device_env(num_devices: int, environ=os.environ) -> dict[str, str]:
    """The environment for a CPU process with `num_devices` fake devices (other XLA flags kept)."""
    env = dict(environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={num_devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def ensure_fake_devices(num_devices: int, argv: list[str]) -> int | None:
    """Make this process see `num_devices` CPU devices, or re-run `argv` in a child that does.

    Returns None to continue here, or the child's exit code. XLA reads the device count
    once, when the backend starts; if it already started, a fresh process is the only way.
    """
    if num_devices < 1:
        raise UserError(f"--devices must be positive, got {num_devices}")
    if not _backends_started():
        os.environ.update(fake_device_env(num_devices))
        return None
    import jax

    if jax.default_backend() == "cpu" and jax.device_count() == num_devices:
        return None
    return subprocess.call([sys.executable, "-m", "maxtrain.cli", *argv], env=fake_device_env(num_devices))


def add_plan_arguments(parser) -> None:
    """The fit-check options shared by `maxtrain plan` and `maxtrain train --dry-run`."""
    parser.add_argument("--devices", type=int, default=None,
                        help="target device count (default: the product of the mesh degrees when none is -1)")
    parser.add_argument("--target", choices=("gpu", "tpu", "cpu"), default="gpu",
                        help="the accelerator planned for: compute_dtype=auto means bf16 on gpu/tpu (default gpu)")
    parser.add_argument("--memory-gb", type=float, default=None, metavar="GIB",
                        help="memory per device, to print whether the plan fits (e.g. 80 for an H100)")  # fmt: skip


def run_plan(args: list[str], devices: int | None, target: str, memory_gib: float | None) -> int:
    """`maxtrain plan`: load the config, get fake devices (re-executing if needed), print the plan."""
    from maxtrain.config import load_config

    path, overrides = (args[0], args[1:]) if args and "=" not in args[0] else (None, args)
    cfg = load_config(path, overrides)
    if devices is None:
        degrees = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
        if -1 in degrees:
            raise UserError("the mesh has a -1 degree, so the device count is open; pass --devices N (e.g. --devices 64)")
        devices = math.prod(degrees)
    argv = ["plan", *args, "--devices", str(devices), "--target", target]
    if memory_gib:
        argv += ["--memory-gb", str(memory_gib)]
    code = ensure_fake_devices(devices, argv)
    if code is not None:
        return code
    report = plan_run(cfg, target=target)
    print(format_plan(report, memory_gib))
    return 0


def register_commands(sub) -> None:
    """Add `maxtrain plan` to the CLI's subcommands."""
    plan = sub.add_parser(
        "plan",
        help="fit check: per-device memory and FLOPs of a config on N devices, without running it",
        description="Compile the train step for a target mesh on fake CPU devices (abstract shapes only) and "
        "print per-device bytes of params, optimizer state and activations, and FLOPs per step.",
    )
    plan.add_argument("args", nargs="*", metavar="[CONFIG.yaml] key=value", help="config file, then overrides")
    add_plan_arguments(plan)
    plan.set_defaults(func=lambda ns: run_plan(ns.args, ns.devices, ns.target, ns.memory_gb))

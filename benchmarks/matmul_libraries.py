"""The demo step's GEMMs on XLA:CPU and on torch (MKL), each library in a process of its own.

    python benchmarks/matmul_libraries.py                   # 5 alternations, f32, the demo shapes
    python benchmarks/matmul_libraries.py --rounds 9 xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT
    python benchmarks/matmul_libraries.py --one-core        # each library on one core, one thread

Times the forward product and both gradient products (dX = dY W^T, dW = X^T dY) of each
projection shape the demo step runs ([batch*seq, in] x [in, out]) in f32. XLA compiles them
with the step's CPU options (maxtrain.step.xla_options) plus any key=value given. One child
process per library per round, alternating (xla, torch, xla, ...): timed in one process,
each library's idle but spinning workers slow the other's next product by 1.4-1.7x. The
machine's speed drifts between rounds, so the medians over rounds are the result.

Prints one JSON line per product: GFLOP/s of each library (median over rounds) and the
ratio xla / torch.

--one-core pins each child to one CPU with one compute thread (XLA_FLAGS
--xla_cpu_multi_thread_eigen=false; torch.set_num_threads(1)): each kernel's speed on a
core, apart from how it splits one product over threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {  # name: (rows = batch * seq, in, out) of the demo step at B8 S256
    "attn_proj": (2048, 256, 256),
    "mlp_up": (2048, 256, 1024),
    "mlp_down": (2048, 1024, 256),
    "lm_head": (2048, 256, 4096),
}
PRODUCTS = ("fwd", "dX", "dW")


def _time(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _xla(options: dict, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from maxtrain.step import xla_options

    mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
    opts = {**(xla_options(mesh) or {}), **options}
    products = {"fwd": lambda x, w, d: x @ w, "dX": lambda x, w, d: d @ w.T, "dW": lambda x, w, d: x.T @ d}
    out = {}
    for name, (t, i, o) in SHAPES.items():
        key = jax.random.split(jax.random.key(0), 3)
        x, w, d = (jax.random.normal(k, s, jnp.float32) for k, s in zip(key, [(t, i), (i, o), (t, o)]))
        for product, fn in products.items():
            compiled = jax.jit(fn).lower(x, w, d).compile(compiler_options=opts or None)
            out[f"{name}.{product}"] = _time(lambda: compiled(x, w, d).block_until_ready(), repeats)
    return out


def _torch(repeats: int, one_core: bool) -> dict:
    import torch

    if one_core:
        torch.set_num_threads(1)
    out = {}
    for name, (t, i, o) in SHAPES.items():
        gen = torch.Generator().manual_seed(0)
        x, w, d = (torch.randn(*s, generator=gen) for s in [(t, i), (i, o), (t, o)])
        products = {"fwd": lambda: x @ w, "dX": lambda: d @ w.t(), "dW": lambda: x.t() @ d}
        for product, fn in products.items():
            out[f"{name}.{product}"] = _time(fn, repeats)
    return out


def _child(library: str, options: dict, repeats: int, one_core: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", library, "--repeats", str(repeats)] + ["--one-core"] * one_core
    cmd += [f"{k}={json.dumps(v)}" for k, v in options.items()]
    env = dict(os.environ)
    if one_core:  # a runtime flag: XLA reads it from the environment, not from compiler options
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen=false".strip()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="alternations of one child process per library")
    p.add_argument("--repeats", type=int, default=30, help="timed calls of each product in a child")
    p.add_argument("--one-core", action="store_true", help="each child on one CPU with one compute thread")
    p.add_argument("--child", choices=["xla", "torch"], help=argparse.SUPPRESS)
    p.add_argument("options", nargs="*", help="extra XLA compiler options, key=value (value as JSON or a string)")
    args = p.parse_args()
    options = {}
    for item in args.options:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    if args.child:
        if args.one_core:
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        seconds = _xla(options, args.repeats) if args.child == "xla" else _torch(args.repeats, args.one_core)
        print(json.dumps(seconds))
        return 0
    runs = {"xla": [], "torch": []}
    for _ in range(args.rounds):
        runs["xla"].append(_child("xla", options, args.repeats, args.one_core))
        runs["torch"].append(_child("torch", {}, args.repeats, args.one_core))
    for product in runs["xla"][0]:
        name = product.split(".")[0]
        t, i, o = SHAPES[name]
        flops = 2 * t * i * o
        rate = {lib: statistics.median(flops / r[product] for r in rs) / 1e9 for lib, rs in runs.items()}
        print(json.dumps({
            "product": product, "shape": [t, i, o], "xla_gflops": round(rate["xla"], 1),
            "torch_gflops": round(rate["torch"], 1), "ratio": round(rate["xla"] / rate["torch"], 3),
            "rounds": args.rounds, "one_core": args.one_core, "extra_xla_options": options,
        }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decode tokens/s of the demo model with the KV cache vs recomputing the whole prefix per token.

    python benchmarks/decode_speed.py [--batch 4] [--prompt 32] [--new 128]

Random demo-shaped weights (the speed does not depend on their values), f32 on the host
CPU, one device. "No cache" runs the ordinary forward over a fixed [B, prompt+new] buffer
each step (compiled once) and takes the logits at the current position.
"""

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maxtrain.config import load_config
from maxtrain.generate import Generator, Sampling
from maxtrain.model.transformer import Transformer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    args = parser.parse_args()
    cfg = load_config(None, ["model=demo"]).model
    model = Transformer(cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    from maxtrain.config import MeshConfig
    from maxtrain.mesh import build_mesh

    mesh = build_mesh(MeshConfig(), jax.devices()[:1])
    gen = Generator(cfg, params, mesh=mesh, rules=load_config(None, []).mesh.rules)
    prompts = np.random.default_rng(0).integers(4, cfg.vocab_size, (args.batch, args.prompt)).tolist()
    s = Sampling(max_new_tokens=args.new)
    gen.generate(prompts, s)  # compile
    t0 = time.perf_counter()
    with_cache = gen.generate(prompts, s)
    cached_s = time.perf_counter() - t0

    total = args.prompt + args.new
    step = jax.jit(lambda p, buf, i: jnp.argmax(model.apply({"params": p}, buf)[:, i], axis=-1).astype(jnp.int32))
    buf = np.zeros((args.batch, total), np.int32)
    buf[:, : args.prompt] = prompts
    jax.block_until_ready(step(params, jnp.asarray(buf), args.prompt - 1))  # compile
    t0 = time.perf_counter()
    b = jnp.asarray(buf)
    for i in range(args.prompt - 1, total - 1):
        b = b.at[:, i + 1].set(step(params, b, i))
    jax.block_until_ready(b)
    uncached_s = time.perf_counter() - t0
    same = np.array_equal(np.asarray(b)[:, args.prompt :], np.asarray(with_cache))
    tokens = args.batch * args.new
    print(json.dumps({
        "batch": args.batch, "prompt": args.prompt, "new_tokens": args.new,
        "kv_cache_tokens_per_s": round(tokens / cached_s, 1), "no_cache_tokens_per_s": round(tokens / uncached_s, 1),
        "speedup": round(uncached_s / cached_s, 2), "same_greedy_tokens": bool(same),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()

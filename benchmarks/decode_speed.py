"""Decode speed of the KV-cache Generator: ms per decode step by batch size, and the cache vs recomputing the prefix.

    python benchmarks/decode_speed.py                      # Llama d256 L4 V512, 64-token prompts, 64 new tokens
    python benchmarks/decode_speed.py --batches 1,8,32 --repeats 5 --d-model 512

Random weights (the speed does not depend on their values), f32 on the host CPU, one device.

(a) ms per decode step: `Generator.sample` at each batch size on prompts of mixed lengths
    (every other row 24 tokens shorter: rows sit at different cache slots), sampling at
    temperature 1 so no row stops early; (t(new tokens) - t(1 token)) / (new - 1), so the
    prefill is left out, minimum over --repeats. `vs_batch_1` is the step time over batch
    1's: a small model's step is bound by reading its weights, so ideally it stays near 1
    until the batch's matmuls take over; tokens/s is batch / step time.
(b) cache vs no cache at --compare-batch: greedy tokens/s of `generate` vs the ordinary
    forward over a fixed [B, prompt + new] buffer each step (compiled once, logits at the
    current position), and whether both give the same tokens.
"""

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maxtrain.config import MeshConfig
from maxtrain.generate import Generator, Sampling
from maxtrain.mesh import build_mesh
from maxtrain.model.config import ModelConfig
from maxtrain.model.transformer import Transformer


def _best_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def step_ms(gen: Generator, params, batch: int, prompt: int, new: int, repeats: int) -> float:
    """Milliseconds per decode step of Generator.sample at this batch (prefill excluded)."""
    tokens = np.random.default_rng(0).integers(4, gen.cfg.vocab_size, (batch, prompt)).astype(np.int32)
    lengths = np.full((batch,), prompt, np.int32)
    lengths[1::2] = max(1, prompt - 24)
    times = {}
    for n in (1, new):
        s = Sampling(max_new_tokens=n, temperature=1.0)
        times[n] = _best_seconds(lambda: gen.sample(params, tokens, lengths, s, jax.random.PRNGKey(1))[0], repeats)
    return (times[new] - times[1]) / (new - 1) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes for (a)")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare-batch", type=int, default=4, help="batch of (b); 0 skips it")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    args = parser.parse_args()
    heads = max(1, args.d_model // 64)
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers, num_heads=heads,
                      ffn_dim=4 * args.d_model, max_seq_len=2 * (args.prompt + args.new))  # fmt: skip
    model = Transformer(cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    gen = Generator(cfg, params, mesh=build_mesh(MeshConfig(), jax.devices()[:1]), rules=MeshConfig().rules)

    result = {"model": f"llama d{args.d_model} L{args.layers} V{args.vocab}", "prompt": args.prompt, "new_tokens": args.new}
    steps = {}
    for b in (int(x) for x in args.batches.split(",")):
        ms = step_ms(gen, params, b, args.prompt, args.new, args.repeats)
        steps[b] = {"ms_per_step": round(ms, 3), "tokens_per_s": round(b / ms * 1e3, 1)}
    first = steps[min(steps)]["ms_per_step"]
    for v in steps.values():
        v["vs_batch_1"] = round(v["ms_per_step"] / first, 2)
    result["decode_steps"] = steps

    if args.compare_batch:
        b, total = args.compare_batch, args.prompt + args.new
        prompts = np.random.default_rng(0).integers(4, cfg.vocab_size, (b, args.prompt)).tolist()
        s = Sampling(max_new_tokens=args.new)
        gen.generate(prompts, s)  # compile
        t0 = time.perf_counter()
        with_cache = gen.generate(prompts, s)
        cached_s = time.perf_counter() - t0
        step = jax.jit(lambda p, buf, i: jnp.argmax(model.apply({"params": p}, buf)[:, i], axis=-1).astype(jnp.int32))
        buf = np.zeros((b, total), np.int32)
        buf[:, : args.prompt] = prompts
        jax.block_until_ready(step(params, jnp.asarray(buf), args.prompt - 1))  # compile
        t0 = time.perf_counter()
        buf = jnp.asarray(buf)
        for i in range(args.prompt - 1, total - 1):
            buf = buf.at[:, i + 1].set(step(params, buf, i))
        jax.block_until_ready(buf)
        uncached_s = time.perf_counter() - t0
        tokens = b * args.new
        result["cache_vs_no_cache"] = {
            "batch": b, "kv_cache_tokens_per_s": round(tokens / cached_s, 1), "no_cache_tokens_per_s": round(tokens / uncached_s, 1),
            "speedup": round(uncached_s / cached_s, 2),
            "same_greedy_tokens": bool(np.array_equal(np.asarray(buf)[:, args.prompt :], np.asarray(with_cache))),
        }  # fmt: skip
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Attention kernels side by side: forward+backward time and error of each path maxtrain can take.

    python benchmarks/attention_kernels.py                        # llama3.2-1b heads, B8 S2048 bf16
    python benchmarks/attention_kernels.py --batch 4 --seq-len 4096

Rows (one JSON line each): `xla` is model/attention.dot_product_attention (query blocks of
--query-block); `cudnn` is fused_attention on whole rows (the bias-free kernel) and
`cudnn_packed` on rows of several documents (the masked kernel). `rel_err` is
|out - ref| / |ref| against the XLA attention in f32 on the same inputs. The cuDNN rows
need a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from maxtrain.model.attention import attention_mask, dot_product_attention, fused_attention


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--query-block", type=int, default=512)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    b, s, n, k, h = args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, kk, v, dout = (jax.random.normal(key, (b, s, heads, h), jnp.bfloat16) for key, heads in zip(keys, (n, k, k, n)))
    whole = jnp.ones((b, s), jnp.int32)
    docs = jnp.broadcast_to((jnp.arange(s) >= s // 3).astype(jnp.int32) + 1, (b, s))  # two documents per row
    gpu = jax.devices()[0].platform == "gpu"
    kernels = {"xla": lambda q, kk, v, m: dot_product_attention(q, kk, v, m, causal=True, query_block=args.query_block)}
    if gpu:
        kernels["cudnn"] = lambda q, kk, v, m: fused_attention(q, kk, v, m, causal=True)
    flops = 6 * b * s * s * n * h  # model FLOPs: 3 x the causal forward (2 matmuls over half of S x S)
    for name, attend in kernels.items():
        for layout, seg in (("", whole), ("_packed", docs)):
            mask = attention_mask(seg, causal=True, sliding_window=None)
            fwd = jax.jit(attend)
            out = fwd(q, kk, v, mask)
            f32 = [x.astype(jnp.float32) for x in (q, kk, v)]
            ref = dot_product_attention(*f32, mask, causal=True)
            err = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
            grad = jax.jit(jax.grad(lambda q, kk, v, m: jnp.sum(attend(q, kk, v, m) * dout), (0, 1, 2)))
            step = _time(grad, q, kk, v, mask, repeats=args.repeats)
            row = {"kernel": name + layout, "batch": b, "seq_len": s, "heads": n, "kv_heads": k, "head_dim": h,
                   "fwd_bwd_ms": round(step * 1e3, 3), "tflops": round(flops / step / 1e12, 1), "rel_err": round(err, 5)}  # fmt: skip
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

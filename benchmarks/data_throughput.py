"""Data pipeline throughput: raw text to packed local batches, tokens per second.

Not a test: prints one JSON line. Example:
    python benchmarks/data_throughput.py --workers 2 --batches 200
The source defaults to the embedded corpus (tokenizer trained and cached on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from maxtrain.data import DataConfig, build_pipeline, build_tokenizer


def main() -> None:
    """Time `--batches` batches after `--warmup` batches and print tokens/s as JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--data", default=None, help='JSON for DataConfig.sources, e.g. \'[{"type": "jsonl", "path": "x/*.jsonl"}]\'')
    args = p.parse_args()
    sources = json.loads(args.data) if args.data else [{"type": "embedded"}]
    cfg = DataConfig(sources=sources, workers=args.workers, prefetch=args.prefetch)
    tok = build_tokenizer(cfg, vocab_size=args.vocab_size)
    start = time.perf_counter()
    with build_pipeline(cfg, tok, split="train", seq_len=args.seq_len, global_batch=args.global_batch, seed=0) as it:
        for _ in range(args.warmup):
            next(it)
        first_batch_s = time.perf_counter() - start
        start = time.perf_counter()
        tokens = 0
        for _ in range(args.batches):
            tokens += int((next(it)["segment_ids"] > 0).sum())
        elapsed = time.perf_counter() - start
    print(json.dumps({
        "benchmark": "data_throughput", "tokens_per_s": round(tokens / elapsed), "workers": args.workers,
        "prefetch": args.prefetch, "seq_len": args.seq_len, "global_batch": args.global_batch, "batches": args.batches,
        "tokens": tokens, "seconds": round(elapsed, 3), "startup_and_warmup_s": round(first_batch_s, 3),
        "tokenizer": tok.identity, "cpus": os.cpu_count(), "machine": platform.machine(),
    }))


if __name__ == "__main__":
    main()

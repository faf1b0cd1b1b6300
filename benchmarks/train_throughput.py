"""Training throughput: steady-state step time, tokens/s, MFU, compile time, memory.

    python benchmarks/train_throughput.py                       # the demo shape (d256 L4 V4096 S256 B8, f32)
    python benchmarks/train_throughput.py --compare-hf          # + transformers LlamaForCausalLM / torch AdamW
    python benchmarks/train_throughput.py --preset llama3.2-1b --seq-len 2048 --batch 8 --dtype bfloat16 train.loss_chunk=512
    python benchmarks/train_throughput.py --mlm --compare-hf    # masked LM: demo-bert (V4096 S256 B8) vs BertForMaskedLM

On a GPU with --compare-hf, give each framework part of the memory:
XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 (JAX otherwise takes 75% at start).

Prints one JSON line. With --compare-hf both stacks run the identical shape in the same
process, alternating step by step (the default rounds of one step), so drifts in machine
speed hit both alike; `ratio` is maxtrain tokens/s over transformers tokens/s (median step
times). Coarser alternation (rounds of 5-10 steps) moved the ratio by +-0.05 run to run on
a shared host; step-by-step alternation of two identical programs agrees within 0.1%.

Like the `maxtrain` command, the benchmark first re-executes itself with glibc's huge-page
tunable where that helps (maxtrain/hostmem.py); `host_hugepages` in the JSON says whether it
did, and MAXTRAIN_HUGEPAGES=0 measures without. torch does not ask for huge pages by
default, so on CPU its steps run with them switched off for the process (`ratio`: each stack
as it comes), and a third series times torch with them too (`ratio_hf_hugepages`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

_PR_SET_THP_DISABLE = 41  # linux/prctl.h


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    p.add_argument("--steps", type=int, default=1, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=30, help="rounds; with --compare-hf each round times both stacks")
    p.add_argument("--docs-per-row", type=int, default=1,
                   help="documents packed per row (segment ids): >1 times the masked attention of packed data")
    p.add_argument("--compare-hf", action="store_true")
    p.add_argument("--mlm", action="store_true",
                   help="masked-LM step (objective masked_lm, 15%% of positions weighted; default preset demo-bert); "
                        "--compare-hf then times transformers' BertForMaskedLM")
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides, e.g. model.num_layers=2")
    args = p.parse_intermixed_args()  # overrides may come before or after the options
    if args.mlm and args.preset == "demo":
        args.preset = "demo-bert"
    return args


def _maxtrain_runner(args):
    from maxtrain.config import load_config
    from maxtrain.experiment import build_experiment

    # The demo preset at vocab 4096 is the reference shape (d256 L4 H4 ff1024 V4096).
    shape = ["model.vocab_size=4096"] if args.preset in ("demo", "demo-bert") else []
    shape += ["train.objective=masked_lm"] if args.mlm else []
    overrides = [
        f"model={args.preset}", *shape, f"train.seq_len={args.seq_len}", f"train.global_batch={args.batch}",
        f"train.compute_dtype={args.dtype}", f"train.remat={args.remat}", "mesh.data=1", "mesh.fsdp=-1",
        "steps=1000000", "optimizer.warmup_steps=10", *args.overrides,
    ]  # fmt: skip
    base = Path(__file__).resolve().parent.parent / "configs" / "base.yaml"  # the demo's settings (unrolled layers)
    cfg = load_config(base if args.preset == "demo" else None, overrides)
    exp = build_experiment(cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, (args.batch, args.seq_len + 1), dtype=np.int32)
    doc_len = -(-args.seq_len // args.docs_per_row)
    segment_ids = (np.arange(args.seq_len, dtype=np.int32) // doc_len) + 1
    positions = np.arange(args.seq_len, dtype=np.int32) % doc_len
    local = {
        "tokens": tokens[:, :-1], "targets": tokens[:, 1:],
        "loss_weights": np.ones((args.batch, args.seq_len), np.float32),
        "segment_ids": np.broadcast_to(segment_ids, (args.batch, args.seq_len)).copy(),
        "positions": np.broadcast_to(positions, (args.batch, args.seq_len)).copy(),
    }  # fmt: skip
    if args.mlm:  # BERT's objective: the original tokens at 15% of the positions
        local.update(targets=tokens[:, :-1], loss_weights=mlm_weights(args).astype(np.float32))
    batch = jax.device_put(local, exp.batch_sharding)
    t0 = time.perf_counter()
    compiled = exp.train_step.lower(exp.state, batch).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    state = [exp.state]

    def run(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            state[0], metrics = compiled(state[0], batch)
        jax.block_until_ready(metrics)
        return (time.perf_counter() - t) / n

    run(2)  # warm-up
    from maxtrain.step import xla_options

    return cfg, run, compile_s, memory, xla_options(exp.mesh, cfg.train.xla_options), exp.model.attention_kernel


def mlm_weights(args) -> np.ndarray:
    """The benchmark's masked positions: the same 15% for both stacks."""
    return np.random.default_rng(1).random((args.batch, args.seq_len)) < 0.15


def _hf_model(cfg, args):
    """(transformers model class, config) of the benchmarked shape."""
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

    m = cfg.model
    if args.mlm:
        return BertForMaskedLM, BertConfig(
            vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn_dim, num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads, max_position_embeddings=max(args.seq_len, m.max_seq_len),
            type_vocab_size=max(m.type_vocab_size, 1), layer_norm_eps=m.norm_eps, hidden_act="gelu",
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,  # maxtrain's stack has no dropout
            attn_implementation="sdpa",
        )  # fmt: skip
    return LlamaForCausalLM, LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn_dim, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, num_key_value_heads=m.kv_heads, head_dim=m.dim_per_head,
        max_position_embeddings=max(args.seq_len, 128), rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
        attn_implementation="sdpa",
    )  # fmt: skip


def _hf_runner(cfg, args):
    import torch

    m = cfg.model
    model_cls, hf_cfg = _hf_model(cfg, args)
    gpu = jax.devices()[0].platform == "gpu"
    device = torch.device("cuda" if gpu else "cpu")
    bf16 = args.dtype == "bfloat16"
    # On GPU both stacks train the same way: f32 master weights, bf16 autocast compute, fused
    # AdamW (HF Trainer's bf16=True with adamw_torch_fused). On CPU the model runs in the dtype.
    model = model_cls(hf_cfg).to(device, torch.float32 if gpu or not bf16 else torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=gpu)
    tokens = torch.randint(0, m.vocab_size, (args.batch, args.seq_len), device=device)
    labels = tokens
    if args.mlm:
        labels = torch.where(torch.from_numpy(mlm_weights(args)).to(device), tokens, -100)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=gpu and bf16)

    def one_step():
        with autocast:
            loss = model(input_ids=tokens, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def run(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            one_step()
        if gpu:
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / n

    run(2)
    return run


def _steady(run, steps: int) -> float:
    """run(steps) right after one untimed step of the same stack, as steps follow each other in training.

    Timed straight after the other stack's step, a step paid for that stack's idle workers
    (torch's OpenMP threads spin-wait before they sleep; XLA's pool spins too) and for its
    caches: the stack timed second lost 5-10% on 2 cores. A pause between them was worse (a
    vCPU that idled for 0.2 s ran the next step 10-15% slower).
    """
    run(1)
    return run(steps)


@contextlib.contextmanager
def _no_hugepages(active: bool):
    """Within: no transparent huge pages for this process (prctl PR_SET_THP_DISABLE), as if started without them."""
    libc = ctypes.CDLL(None, use_errno=True) if active else None
    if libc is not None and libc.prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_THP_DISABLE) failed")
    try:
        yield
    finally:
        if libc is not None:
            libc.prctl(_PR_SET_THP_DISABLE, 0, 0, 0, 0)


def main() -> int:
    from maxtrain.hostmem import hugepages_on, reexec_with_hugepages

    reexec_with_hugepages()  # as the maxtrain command does (torch runs without them below, as it comes)
    args = _parse()
    from maxtrain.metrics import peak_flops_total

    # Measured first, on an idle host: timed after torch's steps, its still-spinning OpenMP
    # workers slowed the probe, and a low peak had a d512 L8 shape report MFU 1.33.
    peak = peak_flops_total(None)
    cfg, run_maxtrain, compile_s, memory, options, attention = _maxtrain_runner(args)
    run_hf = _hf_runner(cfg, args) if args.compare_hf else None
    # The maxtrain command runs with huge-page mallocs (maxtrain/hostmem.py); torch, as users
    # start it, does not. So where this process has them, torch's steps run with the kernel's
    # transparent huge pages switched off, and a third series times torch with them too.
    split = run_hf is not None and hugepages_on() and jax.devices()[0].platform == "cpu"
    ours, theirs, theirs_hugepages = [], [], []
    for _ in range(args.rounds):
        ours.append(_steady(run_maxtrain, args.steps) if run_hf else run_maxtrain(args.steps))
        if run_hf is not None:
            with _no_hugepages(split):
                theirs.append(_steady(run_hf, args.steps))
            if split:
                theirs_hugepages.append(_steady(run_hf, args.steps))
    tokens = args.batch * args.seq_len
    step_s = statistics.median(ours)
    if jax.devices()[0].platform == "cpu":  # probe again: a busy moment only reads low, so the larger is closer
        from maxtrain.metrics import measure_cpu_peak_flops

        peak = max(peak, measure_cpu_peak_flops())
    result = {
        "preset": args.preset, "objective": cfg.train.objective, "seq_len": args.seq_len, "batch": args.batch, "dtype": args.dtype,
        "docs_per_row": args.docs_per_row, "remat": args.remat, "overrides": args.overrides,
        "devices": jax.device_count(), "platform": jax.devices()[0].platform,
        "step_s": round(step_s, 4), "tokens_per_s": round(tokens / step_s, 1),
        "tokens_per_s_per_device": round(tokens / step_s / jax.device_count(), 1),
        "mfu": round(tokens / step_s * cfg.model.flops_per_token(args.seq_len) / peak, 4),
        "compile_s": round(compile_s, 2), "peak_flops": peak,
        "argument_bytes": memory.argument_size_in_bytes, "temp_bytes": memory.temp_size_in_bytes,
        "xla_options": options or {}, "host_hugepages": hugepages_on(),
    }  # fmt: skip
    if jax.devices()[0].platform == "gpu":
        stats = jax.devices()[0].memory_stats() or {}
        result["peak_memory_bytes"] = stats.get("peak_bytes_in_use")
        result["device_kind"] = jax.devices()[0].device_kind
    result["attention"] = attention
    if theirs:
        hf_step = statistics.median(theirs)
        result.update(hf_step_s=round(hf_step, 4), hf_tokens_per_s=round(tokens / hf_step, 1), ratio=round(hf_step / step_s, 3))
    if theirs_hugepages:
        hf_step = statistics.median(theirs_hugepages)
        result.update(hf_hugepages_tokens_per_s=round(tokens / hf_step, 1), ratio_hf_hugepages=round(hf_step / step_s, 3))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

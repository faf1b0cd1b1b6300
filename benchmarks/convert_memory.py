"""Peak RSS of `convert from-hf` and `convert to-hf` on a synthetic Llama checkpoint (f32, 2 shards).

    python benchmarks/convert_memory.py [--layers 8] [--d-model 2048]   # ~1.6 GB

Writes random safetensors shards directly (no torch), converts them to maxtrain in a fresh
process, then back to Hugging Face in another, and reports each process's peak RSS growth
(ru_maxrss after the conversion minus after importing jax and orbax) against the largest HF
tensor, the largest stacked maxtrain leaf and the model size. Not a test: numbers depend on
the machine.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_checkpoint(path: Path, layers: int, d: int, ffn: int, vocab: int) -> dict:
    from maxtrain.convert.safetensors_io import PlannedTensor, write_safetensors

    rng = np.random.default_rng(0)

    def t(name, shape):
        return PlannedTensor(name, shape, np.dtype(np.float32), lambda: rng.standard_normal(shape, np.float32) * 0.02)

    tensors = [t("model.embed_tokens.weight", (vocab, d))]
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors += [t(p + "input_layernorm.weight", (d,)), t(p + "post_attention_layernorm.weight", (d,))]
        tensors += [t(p + f"self_attn.{x}_proj.weight", (d, d)) for x in "qkvo"]
        tensors += [t(p + "mlp.gate_proj.weight", (ffn, d)), t(p + "mlp.up_proj.weight", (ffn, d)), t(p + "mlp.down_proj.weight", (d, ffn))]
    tensors += [t("model.norm.weight", (d,)), t("lm_head.weight", (vocab, d))]
    path.mkdir(parents=True)
    total = sum(x.nbytes for x in tensors)
    write_safetensors(path, tensors, max_shard_bytes=total // 2 + 1)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": d,
              "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": d // 64,
              "num_key_value_heads": d // 64, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
    (path / "config.json").write_text(json.dumps(config))
    return {"model_bytes": total, "largest_hf_tensor_bytes": max(x.nbytes for x in tensors),
            "largest_stacked_leaf_bytes": layers * ffn * d * 4}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        from maxtrain.convert import convert_from_hf, convert_to_hf

        import jax  # noqa: F401  (count the framework's own footprint in the baseline)
        import orbax.checkpoint  # noqa: F401

        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        (convert_from_hf if args.child[0] == "from-hf" else convert_to_hf)(args.child[1], args.child[2])
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"baseline_rss_bytes": base * 1024, "peak_rss_bytes": peak * 1024, "seconds": time.perf_counter() - t0}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        sizes = write_checkpoint(Path(tmp) / "hf", args.layers, args.d_model, args.ffn, args.vocab)
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        report = dict(sizes)
        for direction, src, dst in (("from-hf", "hf", "mt"), ("to-hf", "mt", "back")):
            cmd = [sys.executable, __file__, "--child", direction, f"{tmp}/{src}", f"{tmp}/{dst}"]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:
                sys.exit(out.stderr[-2000:])
            child = json.loads(out.stdout.strip().splitlines()[-1])
            growth = child["peak_rss_bytes"] - child["baseline_rss_bytes"]
            report[direction] = {**child, "peak_growth_bytes": growth,
                                 "growth_over_largest_hf_tensor": round(growth / sizes["largest_hf_tensor_bytes"], 2),
                                 "growth_over_largest_stacked_leaf": round(growth / sizes["largest_stacked_leaf_bytes"], 2),
                                 "growth_over_model": round(growth / sizes["model_bytes"], 3)}
        print(json.dumps(report, indent=2))

if __name__ == "__main__":
    main()

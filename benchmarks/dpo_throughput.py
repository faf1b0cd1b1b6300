"""DPO throughput side by side: maxtrain's step vs TRL's DPOTrainer, same model shape, same pairs, one process.

    python benchmarks/dpo_throughput.py                  # a small Llama (d256 L4 V4096), LoRA r16, 32 pairs/step
    python benchmarks/dpo_throughput.py --pairs 16 --rounds 10

Both train LoRA adapters on every projection with the base as the reference (maxtrain:
train.preference.reference=adapters_off; TRL: a PEFT model with the adapters disabled for
the reference pass), sigmoid loss, AdamW, f32 on CPU. The pairs are the same token ids:
maxtrain packs whole pairs into rows of --seq-len (two segments each), TRL pads prompt +
chosen and prompt + rejected to the batch's longest. Throughput counts real tokens (prompt
and reply of both sequences) per second; steps alternate (one maxtrain step, one TRL
step) so drifts of a shared host hit both alike; `ratio` = maxtrain tokens/s over TRL's
(median step times). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--pairs", type=int, default=32, help="pairs per step")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens (replies are 24-64)")
    p.add_argument("--seq-len", type=int, default=512, help="maxtrain row length")
    p.add_argument("--rounds", type=int, default=8)
    return p.parse_args()


def _pairs(args):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(args.pairs):
        prompt = [1] + list(rng.integers(3, args.vocab, args.prompt - 1))
        c, r = (list(rng.integers(3, args.vocab, rng.integers(24, 65))) + [2] for _ in range(2))
        out.append((prompt, c, r))
    return out


def _maxtrain(args, pairs):
    import jax

    from maxtrain.config import load_config
    from maxtrain.data.lanes import LaneBatcher
    from maxtrain.data.preference import SEQUENCE_FIELDS, pair_element_from_ids
    from maxtrain.experiment import build_experiment

    docs = [pair_element_from_ids(p, c, r) for p, c, r in pairs]
    # Rows: the fewest (a multiple of the device count) whose first batch holds every pair whole.
    n_dev = len(jax.devices())
    rows = n_dev
    while True:
        batch = next(LaneBatcher(docs, global_batch=rows, rows=range(rows), seq_len=args.seq_len, pad_id=0, fill="whole",
                                 fields=SEQUENCE_FIELDS))  # fmt: skip
        pairs_in = int(batch["segment_ids"].max(axis=1).sum()) // 2
        if pairs_in >= len(pairs):
            break
        rows += n_dev
    heads = max(1, args.d_model // 64)
    cfg = load_config(None, [
        "model=tiny-llama", f"model.d_model={args.d_model}", f"model.num_layers={args.layers}", f"model.num_heads={heads}",
        f"model.num_kv_heads={heads}", f"model.ffn_dim={4 * args.d_model}", f"model.vocab_size={args.vocab}",
        f"model.max_seq_len={args.seq_len}", f"train.global_batch={rows}", f"train.seq_len={args.seq_len}",
        "train.objective=dpo", "data.format.type=preference", "finetune.lora={rank: 16, alpha: 32, targets: [q, k, v, o, gate, up, down]}",
    ])  # fmt: skip
    exp = build_experiment(cfg)
    with jax.set_mesh(exp.mesh):
        dev = jax.device_put(batch, exp.batch_sharding)
        exp.state, m = exp.train_step(exp.state, dev)  # compile
        jax.block_until_ready(m)

        def step() -> float:
            t = time.perf_counter()
            exp.state, m = exp.train_step(exp.state, dev)
            jax.block_until_ready(m)
            return time.perf_counter() - t

    return step, {"rows": rows, "pairs_in_batch": pairs_in}


def _trl(args, pairs):
    import datasets
    import peft
    import torch
    import transformers
    import trl
    from tokenizers import Tokenizer, models

    torch.manual_seed(0)
    heads = max(1, args.d_model // 64)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=4 * args.d_model, num_hidden_layers=args.layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=args.seq_len,
        bos_token_id=1, eos_token_id=2, pad_token_id=0))  # fmt: skip
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(args.vocab)}, unk_token="t3"))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="t1", eos_token="t2", pad_token="t0")
    ds = datasets.Dataset.from_list([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in pairs])
    trl.DPOTrainer._prepare_dataset = lambda self, dataset, *a, **kw: dataset  # the pairs are token ids already
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    cfg = trl.DPOConfig(output_dir="/tmp/dpo-bench-trl", report_to=[], per_device_train_batch_size=len(pairs), use_cpu=True,
                        bf16=False, max_length=None, beta=0.1, learning_rate=1e-4)  # fmt: skip
    trainer = trl.DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lora)
    inputs = trainer.data_collator([ds[i] for i in range(len(ds))])
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    m = trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which this times step by step

    def step() -> float:
        t = time.perf_counter()
        trainer.training_step(m, inputs)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        return time.perf_counter() - t

    step()  # warm-up
    return step, {"padded_shape": list(inputs["input_ids"].shape)}


def main() -> int:
    args = _parse()
    pairs = _pairs(args)
    tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in pairs)
    ours, ours_info = _maxtrain(args, pairs)
    theirs, their_info = _trl(args, pairs)
    t_ours, t_theirs = [], []
    for _ in range(args.rounds):
        t_ours.append(ours())
        t_theirs.append(theirs())
    a, b = statistics.median(t_ours), statistics.median(t_theirs)
    print(json.dumps({
        "shape": {"d_model": args.d_model, "layers": args.layers, "vocab": args.vocab, "pairs": args.pairs, "tokens": tokens},
        "maxtrain": {"step_s": round(a, 4), "tokens_per_s": round(tokens / a, 1), **ours_info},
        "trl": {"step_s": round(b, 4), "tokens_per_s": round(tokens / b, 1), **their_info},
        "ratio": round(b / a, 3),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

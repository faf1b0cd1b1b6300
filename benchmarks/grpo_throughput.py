"""GRPO throughput side by side: maxtrain vs transformers/TRL on the same weights, prompts and lengths, one process.

    python benchmarks/grpo_throughput.py                         # Llama d256 L4 V512, 4 prompts x G=8, 64 + 64 tokens
    python benchmarks/grpo_throughput.py --rounds 5 --out benchmarks/results/grpo_throughput.json

One random Llama is built in transformers (seeded), saved with a word-level tokenizer (token
<i> is id i) whose chat template is the user's text alone, and converted with `maxtrain
convert from-hf`; both sides then load those files, so weights and prompt token ids agree.
f32 on the host CPU.

(a) Generation alone: maxtrain's KV-cache Generator vs `model.generate(do_sample=True,
    max_new_tokens=C, min_new_tokens=C)`, both pure sampling at temperature 1 (no top-k,
    no top-p), prompts x G rows of exactly C new tokens. tokens/s counts new tokens.
(b) One GRPO step, generation + update: maxtrain's RolloutSource + train.objective=grpo
    (what `maxtrain train` runs) vs TRL's GRPOTrainer, same G, C, prompts per step,
    constant reward, beta 0 (no reference), one optimisation pass per rollout batch,
    per-sequence token mean (TRL loss_type=grpo), AdamW. TRL samples exactly C tokens
    (min_new_tokens); maxtrain stops a row at EOS, so tokens/s counts each side's sampled
    completion tokens per second of step time.

Rounds alternate (one maxtrain call, one other) so drifts of a shared host hit both alike;
times are medians after one warm-up call each (compiles). `ratio` = maxtrain tokens/s over
the other side's. Prints a table; --out writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The user's text and nothing else: both sides' prompts are then exactly the prompt's token ids.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (a multiple of 16: no padding)")
    p.add_argument("--completion-len", type=int, default=64, help="C: new tokens per completion")
    p.add_argument("--rounds", type=int, default=3, help="timed calls per side, after one warm-up")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--only", choices=("generate", "grpo"), help="run one part only")
    p.add_argument("--out", help="write the results as JSON here")
    return p.parse_args()


def _prompt_texts(args) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(f"<{i}>" for i in rng.integers(3, args.vocab, args.prompt_len)) for _ in range(args.prompts)]


def _write_model(args, root: Path) -> Path:
    """A seeded random HF Llama + tokenizer in root/hf, converted to a maxtrain export in root/mt."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from maxtrain.convert import convert_from_hf

    torch.manual_seed(0)
    heads = max(1, args.d_model // 64)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=4 * args.d_model, num_hidden_layers=args.layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2 * (args.prompt_len + args.completion_len),
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False))  # fmt: skip
    tk = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(args.vocab)}, unk_token="<3>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<1>", eos_token="<2>", pad_token="<0>")
    tok.chat_template = CHAT_TEMPLATE
    model.save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    # transformers 5 writes the template to chat_template.jinja; maxtrain reads tokenizer_config.json's.
    config = json.loads((root / "hf" / "tokenizer_config.json").read_text())
    (root / "hf" / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    convert_from_hf(root / "hf", root / "mt")
    return root


def _alternate(a, b, rounds: int) -> tuple[float, float]:
    """Median seconds of a() and b() over `rounds` alternating calls."""
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(a())
        tb.append(b())
    return statistics.median(ta), statistics.median(tb)


# -- (a) generation alone ---------------------------------------------------------------------------------------------

def _generation(args, root: Path, prompts: list[str]) -> dict:
    import jax
    import torch
    import transformers

    from maxtrain.generate import Sampling, load_generator

    ids = [[int(t[1:-1]) for t in p.split()] for p in prompts]
    rows = [p for p in ids for _ in range(args.group)]  # each prompt G times, as a rollout batch
    gen, _, _ = load_generator(str(root / "mt"), devices=jax.devices()[:1])
    calls = iter(range(10**6))

    def ours() -> float:
        s = Sampling(max_new_tokens=args.completion_len, temperature=1.0, seed=next(calls))
        t = time.perf_counter()
        out = gen.generate(rows, s)  # no end-of-sequence ids: every row samples exactly C tokens
        took = time.perf_counter() - t
        assert all(len(o) == args.completion_len for o in out)
        return took

    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    input_ids = torch.tensor(rows)

    def theirs() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
                              temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.completion_len,
                              min_new_tokens=args.completion_len, pad_token_id=0)  # fmt: skip
        took = time.perf_counter() - t
        assert out.shape == (len(rows), args.prompt_len + args.completion_len)
        return took

    # Same weights: the two models' logits on the first prompt.
    from maxtrain.model.transformer import Transformer

    with torch.no_grad():
        hf_logits = hf(input_ids=input_ids[:1]).logits.numpy()
    mt_logits = np.asarray(Transformer(gen.cfg).apply({"params": gen.params}, np.asarray(rows[:1], np.int32)))
    logit_diff = float(np.abs(hf_logits - mt_logits).max())
    ours(), theirs()  # warm-up: maxtrain compiles
    a, b = _alternate(ours, theirs, args.rounds)
    tokens = len(rows) * args.completion_len
    return {"new_tokens": tokens, "max_abs_logit_diff": logit_diff, "maxtrain": {"s": round(a, 4), "tokens_per_s": round(tokens / a, 1)},
            "transformers": {"s": round(b, 4), "tokens_per_s": round(tokens / b, 1)}, "ratio": round(b / a, 3)}


# -- (b) one GRPO step ------------------------------------------------------------------------------------------------

def constant_reward(prompts, completions, **fields):
    """The same reward for every completion (throughput only: advantages are all zero, the work is the same)."""
    return [1.0] * len(completions)


def _maxtrain_grpo(args, root: Path, prompts: list[str]):
    """A callable running one maxtrain GRPO step (rollout + update); returns (seconds, completion tokens).

    Driven as the trainer drives it (and tests/test_rl_training.py): the rollout source's next batch from the
    current params, then the one jitted train step.
    """
    import jax

    from maxtrain.checkpoint import init_state_from
    from maxtrain.config import load_config
    from maxtrain.data import build_tokenizer, local_rows
    from maxtrain.experiment import build_experiment
    from maxtrain.rl.rollouts import RolloutSource

    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    # The reward module must be importable by name: this file's folder is on sys.path when run as a script.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    n = args.prompts * args.group
    heads = max(1, args.d_model // 64)
    cfg = load_config(None, [
        "model=tiny-llama", f"model.d_model={args.d_model}", f"model.num_layers={args.layers}", f"model.num_heads={heads}",
        f"model.num_kv_heads={heads}", f"model.ffn_dim={4 * args.d_model}", f"model.vocab_size={args.vocab}",
        f"model.max_seq_len={2 * (args.prompt_len + args.completion_len)}", f"init_from={root / 'mt'}",
        f"train.global_batch={n}", f"train.seq_len={args.prompt_len + args.completion_len}", "train.objective=grpo",
        f"train.rl.group_size={args.group}", f"train.rl.max_completion_len={args.completion_len}",
        "train.rl.temperature=1.0", "train.rl.beta=0", "train.rl.aggregation=sequence", "train.rl.iterations=1",
        "train.rl.rewards=[{type: function, function: 'grpo_throughput:constant_reward'}]",
        f"optimizer.lr={args.lr}", "optimizer.warmup_steps=0", "mesh.data=1",
        f"data.sources=[{{type: jsonl, path: {root / 'prompts.jsonl'}}}]", "data.format={type: prompts, template: model}",
        f"data.tokenizer.path={root / 'hf' / 'tokenizer.json'}", "data.tokenizer.bos_token=<1>",
        "data.tokenizer.eos_token=<2>", "data.tokenizer.pad_token=<0>", "data.eval_fraction=0",
    ])  # fmt: skip
    exp = build_experiment(cfg, devices=jax.devices()[:1])
    tok = build_tokenizer(cfg.data, vocab_size=cfg.model.vocab_size)
    exp.state = init_state_from(exp, cfg.init_from, tok)  # as the trainer starts a run with init_from
    source = RolloutSource(cfg, exp, tok, rows=local_rows(exp.batch_sharding, n))
    info: dict = {}

    def step() -> tuple[float, int]:
        with jax.set_mesh(exp.mesh):
            t = time.perf_counter()
            batch = source.next_global(exp.batch_sharding, exp.state.params)
            exp.state, m = exp.train_step(exp.state, batch)
            jax.block_until_ready(m)
            took = time.perf_counter() - t
        sm = source.step_metrics()
        info.update(rollout_s=round(sm["rollout_s"], 4), completion_length=sm["completion_length"],
                    prompt_tokens=int(np.asarray(batch["loss_weights"]).argmax(axis=1)[0]) + 1)
        return took, int(round(sm["completion_length"] * n))

    return step, info


def _trl_grpo(args, root: Path, prompts: list[str]):
    """A callable running one step of TRL's GRPOTrainer (generation + update); returns (seconds, completion tokens)."""
    import datasets
    import torch
    import transformers
    import trl

    torch.manual_seed(0)
    n = args.prompts * args.group
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(root / "hf")
    ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts] * 1000)
    cfg = trl.GRPOConfig(
        output_dir=str(root / "trl"), report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=n,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, num_generations=args.group,
        max_completion_length=args.completion_len, temperature=1.0, top_p=1.0, top_k=0,
        generation_kwargs={"min_new_tokens": args.completion_len}, beta=0.0, loss_type="grpo",
        learning_rate=args.lr, shuffle_dataset=False, logging_steps=10**6, save_strategy="no", disable_dropout=True)  # fmt: skip
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[constant_reward], args=cfg, train_dataset=ds,
                              processing_class=tok)
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    batches = iter(trainer.get_train_dataloader())
    m = trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which this times step by step
    info: dict = {}

    def step() -> tuple[float, int]:
        raw = next(batches)
        t = time.perf_counter()
        # Trainer.training_step runs GRPO's _prepare_inputs (generation and scoring; every step with
        # steps_per_generation=1), then the loss and backward; the optimizer step is the loop's.
        trainer.training_step(m, raw, None)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        took = time.perf_counter() - t
        inputs = trainer._buffered_inputs[0]
        mask = inputs["completion_mask"]
        info.update(prompt_tokens=int(inputs["prompt_ids"].shape[1]), completion_length=float(mask.sum(1).float().mean()))
        return took, int(mask.sum())

    return step, info


def _grpo(args, root: Path, prompts: list[str]) -> dict:
    sides = {"maxtrain": _maxtrain_grpo(args, root, prompts), "trl": _trl_grpo(args, root, prompts)}
    for step, _ in sides.values():
        step()  # warm-up: compiles, TRL's first-step setup
    times: dict[str, list] = {k: [] for k in sides}
    for _ in range(args.rounds):
        for k, (step, _) in sides.items():
            times[k].append(step())
    out: dict = {"rows": args.prompts * args.group}
    for k, (_, info) in sides.items():
        s = statistics.median(t for t, _ in times[k])
        tokens = statistics.median(c for _, c in times[k])
        out[k] = {"step_s": round(s, 4), "completion_tokens": tokens, "tokens_per_s": round(tokens / s, 1), **info}
    out["ratio"] = round(out["maxtrain"]["tokens_per_s"] / out["trl"]["tokens_per_s"], 3)
    out["step_time_ratio"] = round(out["trl"]["step_s"] / out["maxtrain"]["step_s"], 3)  # TRL's step over maxtrain's
    return out


def _table(res: dict) -> str:
    lines = [f"{'':24}{'maxtrain tok/s':>16}{'other tok/s':>14}{'ratio':>8}"]
    if "generate" in res:
        g = res["generate"]
        lines.append(f"{'generate vs transformers':24}{g['maxtrain']['tokens_per_s']:>16}{g['transformers']['tokens_per_s']:>14}"
                     f"{g['ratio']:>8}")
    if "grpo" in res:
        g = res["grpo"]
        lines.append(f"{'GRPO step vs TRL':24}{g['maxtrain']['tokens_per_s']:>16}{g['trl']['tokens_per_s']:>14}{g['ratio']:>8}")
    return "\n".join(lines)


def main() -> int:
    args = _parse()
    import jax
    import torch

    prompts = _prompt_texts(args)
    shape = {"d_model": args.d_model, "layers": args.layers, "vocab": args.vocab, "prompts": args.prompts,
             "group": args.group, "prompt_len": args.prompt_len, "completion_len": args.completion_len,
             "rounds": args.rounds, "torch_threads": torch.get_num_threads(), "jax_devices": len(jax.devices()),
             "cpus": os.cpu_count()}
    res: dict = {"shape": shape}
    load_start = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory() as tmp:
        root = _write_model(args, Path(tmp))
        if args.only in (None, "generate"):
            res["generate"] = _generation(args, root, prompts)
        if args.only in (None, "grpo"):
            res["grpo"] = _grpo(args, root, prompts)
    # A shared host's load moves absolute numbers (ratios much less: the sides alternate); record it.
    res["load_average_1m"] = {"start": load_start, "end": round(os.getloadavg()[0], 2)}
    print(_table(res))
    print(json.dumps(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

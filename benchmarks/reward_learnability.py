"""Does a Bradley-Terry reward model learn the suite's pairs from an SFT run? An oracle outside maxtrain.

    python benchmarks/reward_learnability.py --sft runs/tasks-sft      # the recipe's settings: 600 steps,
                                                                         # 16 pairs, lr 1e-3, centring 0.01

Exports the SFT run with `convert_to_hf`, loads it as transformers'
`LlamaForSequenceClassification` (num_labels=1; the `score` head starts at zero, as maxtrain's
does, or `--head-init hf` at HF's normal(0.02)) and trains it in torch on the same rendered
pairs (maxtrain's tokenizer and chat template) with the reward objective's loss,
-log sigmoid(r_c - r_r) + centring x (r_c + r_r)^2, and torch's AdamW set from maxtrain's
OptimizerConfig (its betas, eps, global-norm clip and `build_schedule`'s learning rate). Every --every steps it prints the training
loss and held-out pairwise accuracy, per task.

When maxtrain's reward model stays below a bar, this separates "Bradley-Terry training from
this SFT model does not get there" from "maxtrain's reward path has a bug": the same
weights, data and loss in another framework.
"""

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", default="runs/tasks-sft", help="the maxtrain run the reward model starts from")
    ap.add_argument("--train", default="runs/tasks-data/pref_train.jsonl")
    ap.add_argument("--eval", default="runs/tasks-data/pref_eval.jsonl")
    ap.add_argument("--tokenizer", default="runs/tasks-base/tokenizer.model")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16, help="pairs per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--center", type=float, default=0.01, help="reward centring coefficient")
    ap.add_argument("--head-init", choices=("zero", "hf"), default="zero")
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        import torch
        from transformers import LlamaForSequenceClassification
    except ImportError:
        raise SystemExit("this benchmark needs torch and transformers: pip install 'maxtrain[test]'") from None
    from maxtrain.config import OptimizerConfig
    from maxtrain.convert import convert_to_hf
    from maxtrain.data.formats import template_for
    from maxtrain.data.preference import PreferenceEncoder, pair_messages
    from maxtrain.data.tokenizer import load_tokenizer
    from maxtrain.optim import build_schedule

    torch.manual_seed(args.seed)
    tok = load_tokenizer(args.tokenizer)
    enc = PreferenceEncoder.with_template(template_for("plain", None, tok), tok)

    def load(path):
        pairs = []
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            rec = json.loads(line)
            parsed = pair_messages(rec)
            if isinstance(parsed, str):
                raise SystemExit(f"{path}:{n}: {parsed}")
            prompt, chosen, rejected, _, _ = parsed
            pairs.append((enc.sequence(prompt, chosen)[0], enc.sequence(prompt, rejected)[0], rec.get("task", "all")))
        return pairs

    train, held = load(args.train), load(args.eval)
    with tempfile.TemporaryDirectory() as tmp:
        convert_to_hf(args.sft, tmp)
        model = LlamaForSequenceClassification.from_pretrained(tmp, num_labels=1, pad_token_id=tok.pad_id)
    if args.head_init == "zero":
        torch.nn.init.zeros_(model.score.weight)

    def rewards(seqs):
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tok.pad_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = torch.as_tensor(s), 1
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        last = hidden[torch.arange(len(seqs)), mask.sum(1) - 1]  # each sequence's last token (right padding)
        return model.score(last).squeeze(-1)

    def accuracy(pairs):
        model.eval()
        right, count = defaultdict(int), defaultdict(int)
        with torch.no_grad():
            for b in range(0, len(pairs), 64):
                chunk = pairs[b : b + 64]
                r = rewards([c for c, _, _ in chunk] + [r for _, r, _ in chunk]).view(2, -1)
                for (_, _, task), ok in zip(chunk, (r[0] > r[1]).tolist()):
                    right[task] += ok
                    count[task] += 1
        model.train()
        per_task = " ".join(f"{t} {right[t] / count[t]:.2f}" for t in sorted(count))
        return sum(right.values()) / len(pairs), per_task

    cfg = OptimizerConfig(lr=args.lr, warmup_steps=args.warmup, weight_decay=0.0)  # reward.yaml's optimizer
    schedule = build_schedule(cfg, args.steps)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: float(schedule(step)) / cfg.lr)
    order = torch.randperm(len(train)).tolist()
    losses, at = [], 0
    acc, per_task = accuracy(held)
    print(f"step 0: held-out pairwise accuracy {acc:.3f} ({per_task})", flush=True)
    for step in range(1, args.steps + 1):
        if at + args.batch > len(order):
            order, at = torch.randperm(len(train)).tolist(), 0
        chunk = [train[i] for i in order[at : at + args.batch]]
        at += args.batch
        r = rewards([c for c, _, _ in chunk] + [r for _, r, _ in chunk]).view(2, -1)
        loss = (-torch.nn.functional.logsigmoid(r[0] - r[1]) + args.center * (r[0] + r[1]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % args.every == 0 or step == args.steps:
            acc, per_task = accuracy(held)
            mean = sum(losses[-args.every :]) / len(losses[-args.every :])
            print(f"step {step}: train loss {mean:.3f}, held-out pairwise accuracy {acc:.3f} ({per_task})", flush=True)
    acc, per_task = accuracy(train[:400])
    print(f"training pairs (first 400): accuracy {acc:.3f} ({per_task})")


if __name__ == "__main__":
    main()

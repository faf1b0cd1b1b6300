"""Is a task of the synthetic suite learnable by a model of the demo's shape? An oracle outside maxtrain.

    python benchmarks/task_learnability.py --task lookup                  # 2000 steps, batch 32, lr 1e-3
    python benchmarks/task_learnability.py --task reverse --steps 500     # a control the model does learn

Trains transformers' LlamaForCausalLM (`pip install maxtrain[test]`) from scratch, in
torch, on `maxtrain tasks make`'s instruction records of one task (--train distinct
prompts) rendered with the `plain` chat template ("User: PROMPT\\nAssistant: ANSWER"), one
character per token, cross-entropy on the answer tokens only. Every --every steps it
prints the training loss and held-out exact match on --eval prompts never trained on
(teacher-forced: every answer token the argmax, which is what greedy decoding produces).

When maxtrain cannot teach a task, this separates "the task needs more than this model and
budget" from "the stack has a bug": the same shape in another framework, the same data.
"""

import argparse
import json
import time

from maxtrain.data.formats import TEMPLATES
from maxtrain.tasks.synthetic import TASKS, instruction_records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="lookup", choices=list(TASKS))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--d-model", type=int, default=128, help="the tasks demo's model: d 128, 4 layers, 4 heads")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--train", type=int, default=6000, help="distinct training prompts")
    ap.add_argument("--eval", type=int, default=300, help="held-out prompts")
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        raise SystemExit("this benchmark needs torch and transformers: pip install 'maxtrain[test]'") from None

    torch.manual_seed(args.seed)
    try:
        train = instruction_records(args.train, args.seed, (args.task,))
        held = instruction_records(args.eval, args.seed + 1, (args.task,), exclude={r["instruction"] for r in train})
    except ValueError as e:  # the task has fewer distinct prompts (add: 1000, reverse: 4608)
        raise SystemExit(f"{e}: ask for fewer --train / --eval prompts") from None
    (user, end_user), (assistant, end_reply) = TEMPLATES["plain"].turn("user"), TEMPLATES["plain"].turn("assistant")
    texts = lambda recs: [(user + r["instruction"] + end_user + assistant, r["output"] + end_reply) for r in recs]  # noqa: E731
    chars = sorted({c for p, a in texts(train + held) for c in p + a})
    ids = {c: i + 1 for i, c in enumerate(chars)}  # 0 pads

    def encode(recs):
        rows = [([ids[c] for c in p], [ids[c] for c in a]) for p, a in texts(recs)]
        width = max(len(p) + len(a) for p, a in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        answer = torch.zeros(len(rows), width, dtype=torch.bool)  # True where the token is an answer token
        for i, (p, a) in enumerate(rows):
            tokens[i, : len(p) + len(a)] = torch.tensor(p + a)
            answer[i, len(p) : len(p) + len(a)] = True
        return tokens, answer

    train_x, train_m = encode(train)
    held_x, held_m = encode(held)
    cfg = LlamaConfig(vocab_size=len(chars) + 1, hidden_size=args.d_model, intermediate_size=4 * args.d_model,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    def answer_logits(x, m):
        logits = model(x[:, :-1], attention_mask=(x[:, :-1] > 0).long()).logits  # right padding: causal is enough
        return logits, x[:, 1:], m[:, 1:]

    def exact_match() -> float:
        with torch.no_grad():
            logits, target, m = answer_logits(held_x, held_m)
            right = (logits.argmax(-1) == target) | ~m
        return right.all(-1).float().mean().item()

    start = time.time()
    for step in range(args.steps + 1):
        if step % args.every == 0 or step == args.steps:
            print(json.dumps({"step": step, "held_out_exact_match": round(exact_match(), 3),
                              "seconds": round(time.time() - start)}), flush=True)
        if step == args.steps:
            break
        rows = torch.randint(0, len(train_x), (args.batch,))
        logits, target, m = answer_logits(train_x[rows], train_m[rows])
        loss = torch.nn.functional.cross_entropy(logits[m], target[m])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.every == 0:
            print(json.dumps({"step": step, "train_loss": round(loss.item(), 4)}), flush=True)


if __name__ == "__main__":
    main()

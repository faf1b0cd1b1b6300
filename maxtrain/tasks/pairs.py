"""More preference pairs for the synthetic task suite: several slips per prompt, or the model's own mistakes.

    maxtrain tasks pairs OUT.jsonl --n 8000 --exclude runs/tasks-data/eval.jsonl --per-prompt 3
    maxtrain tasks pairs OUT.jsonl --from runs/tasks-sft --n 4000 --exclude runs/tasks-data/eval.jsonl

Both write {prompt, chosen, rejected, task} JSONL (data/preference.py's format) whose prompts
never appear in --exclude (the held-out instructions), so held-out pairwise accuracy and
exact match stay honest.

- Slips (default): `wrong_answer` drawn up to --per-prompt times per prompt, distinct
  rejected replies only (the same plausible slips as `tasks make`: input unchanged, two
  symbols swapped, a sum off by 1 or 10, another key's value).
- On-policy (--from RUN): the model samples --samples replies per prompt at --temperature
  with its chat template; each distinct wrong reply becomes a pair's rejected side, chosen
  the right answer. Prompts the model always answers right give no pair (--fill-slips adds
  one slip for them instead). These are the mistakes DPO has to unlearn, which is what makes
  it raise exact match rather than only the margin on someone else's mistakes.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from maxtrain.errors import UserError
from maxtrain.tasks.synthetic import TASKS, instruction_records, wrong_answer

log = logging.getLogger("maxtrain.tasks")


def _normalise(text: str) -> str:
    return " ".join(text.split())


def slip_pairs(records: list[dict], seed: int, per_prompt: int = 1) -> list[dict]:
    """Up to `per_prompt` pairs per instruction record, each rejected a distinct plausible slip."""
    rng = random.Random(seed)
    out = []
    for r in records:
        seen: set[str] = set()
        for _ in range(4 * per_prompt):
            wrong = wrong_answer(r, rng)
            if wrong not in seen and _normalise(wrong) != _normalise(r["output"]):
                seen.add(wrong)
                out.append({"prompt": r["instruction"], "chosen": r["output"], "rejected": wrong, "task": r["task"]})
            if len(seen) == per_prompt:
                break
    return out


def sampled_pairs(path: str, records: list[dict], *, samples: int = 4, temperature: float = 1.0, seed: int = 0,
                  max_new_tokens: int = 16, batch_size: int = 256, per_prompt: int = 1,
                  fill_slips: bool = False) -> tuple[list[dict], dict]:
    """Pairs whose rejected side is a wrong reply the model at `path` sampled; (pairs, counts per task).

    Each prompt is sampled `samples` times (fixed batch shapes: one compile); at most
    `per_prompt` distinct wrong replies per prompt are kept.
    """
    from maxtrain.checkpoint.commands import run_config_of
    from maxtrain.data.formats import prompt_and_reference, template_for
    from maxtrain.generate import Sampling, load_generator

    gen, tok, meta = load_generator(path)
    if tok is None:
        raise UserError(f"'{path}' has no tokenizer next to its params; pass a run dir that has one")
    fmt = run_config_of(meta).data.format
    template = template_for(getattr(fmt, "template", "auto"), gen.cfg.family, tok)
    prompts = []
    for i, r in enumerate(records):
        pr = prompt_and_reference(r, tok, template)
        if isinstance(pr, str):
            raise UserError(f"record {i + 1}: {pr}")
        prompts.append(pr[0].tolist())
    wrong: list[list[str]] = [[] for _ in records]
    size = -(-batch_size // gen.mesh.size) * gen.mesh.size
    for k in range(samples):
        s = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed * 1000 + k)
        for start in range(0, len(prompts), size):
            chunk = prompts[start : start + size]
            outs = gen.generate(chunk + [chunk[0]] * (size - len(chunk)), s, eos_ids=[tok.eos_id], pad_id=tok.pad_id)
            for j, out in enumerate(outs[: len(chunk)]):
                if any(t >= tok.vocab_size for t in out):  # ids in the model's padded vocab only: no text
                    continue
                reply = _normalise(tok.decode([t for t in out if t != tok.eos_id]))
                r = records[start + j]
                if reply and reply != _normalise(r["output"]) and reply not in wrong[start + j]:
                    wrong[start + j].append(reply)
    rng = random.Random(seed)
    pairs, counts = [], {}
    for r, ws in zip(records, wrong):
        c = counts.setdefault(r["task"], {"prompts": 0, "with_mistakes": 0, "pairs": 0})
        c["prompts"] += 1
        c["with_mistakes"] += bool(ws)
        if not ws and fill_slips:
            ws = [wrong_answer(r, rng)]
        for w in ws[:per_prompt]:
            pairs.append({"prompt": r["instruction"], "chosen": r["output"], "rejected": w, "task": r["task"]})
            c["pairs"] += 1
    return pairs, counts


def _excluded(path: str | None) -> set[str]:
    if path is None:
        return set()
    from maxtrain.data.jsonl import read_jsonl

    out = set()
    for n, r in read_jsonl(path, what="--exclude file", hint="pass the held-out instruction JSONL (eval.jsonl)"):
        prompt = r.get("instruction", r.get("prompt")) if isinstance(r, dict) else None
        if not isinstance(prompt, str):
            raise UserError(f"{path}:{n}: --exclude records need an 'instruction' (or 'prompt') string")
        out.add(prompt)
    return out


def _cmd_pairs(ns) -> int:
    tasks = tuple(ns.tasks.split(","))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    exclude = _excluded(ns.exclude)
    try:
        records = instruction_records(ns.n, ns.seed, tasks, exclude=exclude)
    except ValueError as e:
        raise UserError(f"{e}; ask for fewer --n prompts") from None
    if ns.from_run:
        pairs, counts = sampled_pairs(ns.from_run, records, samples=ns.samples, temperature=ns.temperature,
                                      seed=ns.seed, per_prompt=ns.per_prompt, fill_slips=ns.fill_slips)
        for task, c in sorted(counts.items()):
            log.info("%s: %d of %d prompts answered wrong at least once; %d pairs", task, c["with_mistakes"],
                     c["prompts"], c["pairs"])
    else:
        pairs = slip_pairs(records, ns.seed + 4, ns.per_prompt)
    random.Random(ns.seed).shuffle(pairs)
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text("".join(json.dumps(p) + "\n" for p in pairs))
    print(json.dumps({"out": ns.out, "pairs": len(pairs), "prompts": len(records), "excluded": len(exclude)}))
    return 0


def add_pairs_command(tsub) -> None:
    """Add `maxtrain tasks pairs OUT.jsonl` under `maxtrain tasks`."""
    p = tsub.add_parser("pairs", help="write preference pairs: several slips per prompt, or a model's own mistakes")
    p.add_argument("out", help="output .jsonl file")
    p.add_argument("--n", type=int, default=2000, help="distinct prompts (tasks in turn)")
    p.add_argument("--exclude", help="instruction JSONL whose prompts never appear (the held-out eval.jsonl)")
    p.add_argument("--per-prompt", type=int, default=1, help="at most this many pairs (distinct rejected) per prompt")
    p.add_argument("--from", dest="from_run", help="a run / export to sample: rejected = its wrong replies")
    p.add_argument("--samples", type=int, default=4, help="--from: samples per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="--from: sampling temperature")
    p.add_argument("--fill-slips", action="store_true", help="--from: a prompt it never gets wrong gets one slip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {', '.join(TASKS)}")
    p.set_defaults(func=_cmd_pairs)

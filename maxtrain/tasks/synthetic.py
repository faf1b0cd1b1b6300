"""A synthetic instruction suite: reversal, sorting, addition, key lookup; plus a classification task.

Symbols are space-separated single letters and digits, so any tokenizer (a character model
or a BPE trained on English) sees one token per symbol and the tasks stay about the
algorithm, not the tokenizer. Held-out prompts are never among the training prompts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

LETTERS = "abcdefgh"
DIGITS = "0123456789"


# Sizes are chosen for a ~1M-parameter model on CPU: it learns reverse and sort within a few
# hundred steps and these sums within a few thousand (two-digit + two-digit took longer);
# lookup it does not learn at that size and budget, and neither does the same shape in torch
# (benchmarks/task_learnability.py). Every record stays under ~50 tokens, so packed rows hold
# several whole examples.
def _reverse(rng: random.Random) -> tuple[str, str]:
    xs = rng.choices(LETTERS, k=rng.randint(3, 4))
    return "reverse: " + " ".join(xs), " ".join(reversed(xs))


def _sort(rng: random.Random) -> tuple[str, str]:
    xs = rng.choices(DIGITS, k=rng.randint(3, 4))
    return "sort: " + " ".join(xs), " ".join(sorted(xs))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 9)  # 1000 distinct prompts
    return f"add: {' '.join(str(a))} + {' '.join(str(b))}", " ".join(str(a + b))


def _lookup(rng: random.Random) -> tuple[str, str]:
    keys = rng.sample(LETTERS, 3)
    values = rng.choices(DIGITS, k=3)
    k = rng.randrange(3)
    table = " ".join(f"{key} = {v}" for key, v in zip(keys, values))
    return f"lookup {keys[k]} in: {table}", values[k]


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse": _reverse, "sort": _sort, "add": _add, "lookup": _lookup,
}  # fmt: skip


def _distinct(n: int, seed: int, exclude: set[str], draw, what: str) -> list[dict]:
    """n records from `draw(rng, i) -> (key, record) | None`, no key twice nor in `exclude` (None: redraw)."""
    rng = random.Random(seed)
    records, seen, attempts = [], set(exclude), 0
    while len(records) < n:
        attempts += 1
        if attempts > 100 * n:
            raise ValueError(f"cannot draw {n} distinct {what}")
        drawn = draw(rng, len(records))
        if drawn is None or drawn[0] in seen:
            continue
        seen.add(drawn[0])
        records.append(drawn[1])
    return records


def instruction_records(n: int, seed: int, tasks=tuple(TASKS), exclude: set[str] = frozenset()) -> list[dict]:
    """n Alpaca-style records {instruction, input, output, task}, tasks in turn, prompts not in `exclude`."""

    def draw(rng: random.Random, i: int):
        name = tasks[i % len(tasks)]
        prompt, answer = TASKS[name](rng)
        return prompt, {"instruction": prompt, "input": "", "output": answer, "task": name}

    return _distinct(n, seed, exclude, draw, f"prompts for tasks {tasks}")


def classification_records(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """{text, label}: are the digits in ascending order (1), descending order (2), or neither (0)?"""

    def draw(rng: random.Random, i: int):
        label = i % 3
        xs = rng.choices(DIGITS, k=rng.randint(4, 6))
        xs = sorted(xs) if label == 1 else sorted(xs, reverse=True) if label == 2 else xs
        if label == 0 and (xs == sorted(xs) or xs == sorted(xs, reverse=True)):
            return None
        text = " ".join(xs)
        return text, {"text": text, "label": label}

    return _distinct(n, seed, exclude, draw, "classification texts")


def wrong_answer(record: dict, rng: random.Random) -> str:
    """A plausible wrong reply to an instruction record: one slip a half-trained model makes."""
    prompt, answer, task = record["instruction"], record["output"], record["task"]
    xs = answer.split(" ")
    if task in ("reverse", "sort"):
        given = prompt.split(": ", 1)[1].split(" ")
        if given != xs and rng.random() < 0.5:
            return " ".join(given)  # the input unchanged
        for _ in range(20):  # two symbols swapped
            i, j = rng.sample(range(len(xs)), 2)
            ys = list(xs)
            ys[i], ys[j] = ys[j], ys[i]
            if ys != xs:
                return " ".join(ys)
        return " ".join(xs[:-1])  # all symbols equal: one dropped
    if task == "add":
        total = int("".join(xs))
        wrong = total + rng.choice([d for d in (-10, -1, 1, 10) if total + d >= 0])
        return " ".join(str(wrong))
    values = [v for v in prompt.split(" = ")[1:] for v in [v.split(" ")[0]] if v != answer]
    return rng.choice(values) if values else str((int(answer) + 1) % 10)  # lookup: another key's value


def preference_records(records: list[dict], seed: int) -> list[dict]:
    """{prompt, chosen, rejected, task}: chosen is the correct answer, rejected a plausible wrong one."""
    rng = random.Random(seed)
    return [{"prompt": r["instruction"], "chosen": r["output"], "rejected": wrong_answer(r, rng), "task": r["task"]}
            for r in records]


def write_suite(out_dir: str | Path, *, train: int, eval: int, seed: int = 0, tasks=tuple(TASKS)) -> dict[str, Path]:
    """Write train.jsonl / eval.jsonl (instructions), cls_train.jsonl / cls_eval.jsonl and the same prompts
    as preference pairs pref_train.jsonl / pref_eval.jsonl; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_recs = instruction_records(train, seed, tasks)
    eval_recs = instruction_records(eval, seed + 1, tasks, exclude={r["instruction"] for r in train_recs})
    cls_train = classification_records(train, seed + 2)
    cls_eval = classification_records(max(eval, 30), seed + 3, exclude={r["text"] for r in cls_train})
    paths = {}
    pref_train, pref_eval = preference_records(train_recs, seed + 4), preference_records(eval_recs, seed + 5)
    for name, recs in (("train", train_recs), ("eval", eval_recs), ("cls_train", cls_train), ("cls_eval", cls_eval),
                       ("pref_train", pref_train), ("pref_eval", pref_eval)):
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in recs))
    return paths


# The same tasks as plain text outside the instruction template, for pretraining a base that
# already has the skills (README "Every finetuning method on one base"): finetuning then has
# only to map the template onto them, which is the situation parameter-efficient methods are
# made for. The form is the prompt with an arrow: a prose form ("d h b backwards is b h d")
# gave full and partial finetuning much less (README's table notes).
PLAIN_FORMS: dict[str, Callable[[str, str], str]] = {
    name: (lambda prompt, answer: f"{prompt.replace(':', '')} -> {answer}") for name in TASKS
}  # the prompt without its colon, an arrow, the answer: "reverse d h b -> b h d"


def plain_records(n: int, seed: int, *, lines: int = 16, tasks=tuple(TASKS), exclude: set[str] = frozenset()) -> list[dict]:
    """n {text} documents of `lines` solved task examples each (tasks in turn) in PLAIN_FORMS, no prompt in `exclude`.

    Prompts may repeat across documents (the plain text is pretraining data, not a split)."""
    rng = random.Random(seed)
    docs, attempts = [], 0
    while len(docs) < n:
        out = []
        while len(out) < lines:
            attempts += 1
            if attempts > 100 * n * lines:
                raise ValueError(f"cannot draw {n} plain documents outside the excluded prompts")
            name = tasks[(len(docs) * lines + len(out)) % len(tasks)]
            prompt, answer = TASKS[name](rng)
            if prompt not in exclude:
                out.append(PLAIN_FORMS[name](prompt, answer))
        docs.append({"text": "\n".join(out)})
    return docs


def write_plain(path: str | Path, *, docs: int, lines: int = 16, seed: int = 0, tasks=tuple(TASKS),
                exclude_from: str | Path | None = None) -> int:
    """Write plain-text task documents to `path` (JSONL {text}); prompts of `exclude_from` (an instruction
    JSONL, e.g. the held-out eval.jsonl) never appear. Returns the number of excluded prompts."""
    exclude = set()
    if exclude_from is not None:
        exclude = {json.loads(line)["instruction"] for line in Path(exclude_from).read_text().splitlines() if line.strip()}
    recs = plain_records(docs, seed, lines=lines, tasks=tasks, exclude=exclude)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in recs))
    return len(exclude)


def _cmd_make(ns) -> int:
    paths = write_suite(ns.out, train=ns.train, eval=ns.eval, seed=ns.seed, tasks=tuple(ns.tasks.split(",")))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def register_commands(sub) -> None:
    """Add `maxtrain tasks make OUT_DIR` and `maxtrain tasks word-order OUT_DIR` to the CLI."""
    from maxtrain.errors import UserError

    p = sub.add_parser("tasks", help="built-in synthetic task suites: maxtrain tasks make OUT_DIR")
    tsub = p.add_subparsers(dest="tasks_command", required=True)
    make = tsub.add_parser("make", help="write train/eval instruction JSONL, a classification pair and preference pairs")
    make.add_argument("out", help="output directory")
    make.add_argument("--train", type=int, default=2000, help="training records per file")
    make.add_argument("--eval", type=int, default=200, help="held-out records (prompts never in training)")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {', '.join(TASKS)}")

    def run(ns):
        unknown = [t for t in ns.tasks.split(",") if t not in TASKS]
        if unknown:
            raise UserError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
        try:
            return _cmd_make(ns)
        except ValueError as e:  # a task ran out of distinct prompts
            raise UserError(f"{e}; ask for fewer --train/--eval records") from None

    make.set_defaults(func=run)
    from maxtrain.tasks.pairs import add_pairs_command; add_pairs_command(tsub)  # noqa: E702

    order = tsub.add_parser("word-order", help="write a text classification pair: corpus sentences as written or with two words swapped")
    order.add_argument("out", help="output directory")
    order.add_argument("--train", type=int, default=4000)
    order.add_argument("--eval", type=int, default=400)
    order.add_argument("--seed", type=int, default=0)
    order.add_argument("--corruption", choices=("swap", "replace"), default="swap",
                       help="label 0: two words swapped, or --share of the words replaced by corpus words")
    order.add_argument("--share", type=float, default=0.0, help="with --corruption replace: share of the words replaced (at least one)")
    order.add_argument("--heldout-fraction", type=float, default=None,
                       help="held-out sentences from the documents data.eval_fraction=F holds out (unseen by a run pretrained with it)")

    def run_order(ns):
        from maxtrain.tasks.corpus import write_word_order

        try:
            paths = write_word_order(ns.out, train=ns.train, eval=ns.eval, seed=ns.seed, corruption=ns.corruption,
                                     share=ns.share, heldout_fraction=ns.heldout_fraction)  # fmt: skip
        except ValueError as e:
            raise UserError(f"{e}; ask for fewer --train/--eval records") from None
        for name, path in paths.items():
            print(f"{name}: {path}")
        return 0

    order.set_defaults(func=run_order)

    cont = tsub.add_parser("continuations", help="write multiple-choice continuations of held-out corpus sentences (mc.jsonl)")
    cont.add_argument("out", help="output .jsonl file")
    cont.add_argument("-n", type=int, default=80)
    cont.add_argument("--seed", type=int, default=0)
    cont.add_argument("--heldout", default=None, help="also write the held-out documents as {text} JSONL (for --perplexity)")

    def run_cont(ns):
        from maxtrain.tasks.corpus import continuation_records

        try:
            records = continuation_records(ns.n, ns.seed)
        except ValueError as e:
            raise UserError(f"{e}; ask for fewer records (-n)") from None
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out).write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"{len(records)} records: {ns.out}")
        if ns.heldout:
            from maxtrain.tasks.corpus import heldout_documents

            docs = heldout_documents()
            Path(ns.heldout).write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
            print(f"{len(docs)} held-out documents: {ns.heldout}")
        return 0

    cont.set_defaults(func=run_cont)

    plain = tsub.add_parser("plain", help="write the tasks solved in plain text ({text} JSONL) for pretraining a base that has the skills")
    plain.add_argument("out", help="output .jsonl file")
    plain.add_argument("--docs", type=int, default=4000, help="documents")
    plain.add_argument("--lines", type=int, default=16, help="solved examples per document")
    plain.add_argument("--seed", type=int, default=100)
    plain.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {', '.join(TASKS)}")
    plain.add_argument("--exclude", default=None, help="an instruction JSONL (the held-out eval.jsonl) whose prompts never appear")

    def run_plain(ns):
        unknown = [t for t in ns.tasks.split(",") if t not in TASKS]
        if unknown:
            raise UserError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
        if ns.exclude and not Path(ns.exclude).is_file():
            raise UserError(f"--exclude {ns.exclude}: no such file; give the held-out eval.jsonl of `maxtrain tasks make`")
        try:
            excluded = write_plain(ns.out, docs=ns.docs, lines=ns.lines, seed=ns.seed, tasks=tuple(ns.tasks.split(",")),
                                   exclude_from=ns.exclude)  # fmt: skip
        except ValueError as e:
            raise UserError(f"{e}; ask for fewer --docs") from None
        print(f"{ns.docs} documents of {ns.lines} solved examples ({excluded} held-out prompts excluded): {ns.out}")
        return 0

    plain.set_defaults(func=run_plain)

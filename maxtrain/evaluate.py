"""Task evaluation: exact-match accuracy of greedy generation on an instruction JSONL, or a head's accuracy.

    maxtrain eval CONFIG [key=value ...] --data eval.jsonl [--params RUN_DIR|EXPORT]

The config names the model (with its LoRA / head), the tokenizer and the data format
(sft: generation with the chat template; classification: the head). Params come from
--params, else the run dir's latest checkpoint, else `init_from`; a base checkpoint under a
LoRA config evaluates the base model (B = 0). Generation is the KV-cache Generator, greedy.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax
import numpy as np

from maxtrain.data.jsonl import read_jsonl
from maxtrain.errors import UserError

log = logging.getLogger("maxtrain.eval")


def _normalise(text: str) -> str:
    return " ".join(text.split())


def exact_match(generator, tok, records: list[dict], template, *, max_new_tokens: int = 32, batch_size: int = 64) -> dict[str, Any]:
    """Greedy replies to each record's prompt compared with its reference (whitespace-normalised).

    Returns {"accuracy", "count", "per_task": {task: accuracy}, "examples": first few (prompt, reply, reference)}.
    """
    from maxtrain.data.formats import prompt_and_reference
    from maxtrain.generate import Sampling

    items = []
    for i, r in enumerate(records):
        pr = prompt_and_reference(r, tok, template)
        if isinstance(pr, str):
            raise UserError(f"eval record {i + 1}: {pr}")
        items.append((pr[0].tolist(), pr[1], r.get("task", "all")))
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0.0)
    hits, per_task, examples = 0, defaultdict(lambda: [0, 0]), []
    # One fixed batch size (a multiple of the device count, for the batch-sharded cache), so
    # every chunk reuses one compiled generator; the last chunk is filled with copies.
    ndev = jax.device_count()
    size = -(-min(batch_size, len(items)) // ndev) * ndev
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        prompts = [c[0] for c in chunk] + [chunk[0][0]] * (size - len(chunk))
        outs = generator.generate(prompts, sampling, eos_ids=[tok.eos_id], pad_id=tok.pad_id)
        for (prompt, ref, task), out in zip(chunk, outs):
            reply = tok.decode([t for t in out if t != tok.eos_id])
            ok = _normalise(reply) == _normalise(ref)
            hits += ok
            per_task[task][0] += ok
            per_task[task][1] += 1
            if len(examples) < 6:
                examples.append({"prompt": tok.decode(prompt), "reply": reply, "reference": ref, "correct": bool(ok)})
    return {
        "accuracy": hits / len(items),
        "count": len(items),
        "per_task": {t: h / n for t, (h, n) in sorted(per_task.items())},
        "examples": examples,
    }


def classification_accuracy(exp, tok, records: list[dict], fmt, *, seq_len: int, batch_size: int) -> dict[str, Any]:
    """Accuracy and mean loss of the classification head over `records` (one example per row)."""
    from maxtrain.data.formats import RecordEncoder
    from maxtrain.data.lanes import empty_batch

    encode = RecordEncoder(fmt, tok)
    docs = []
    for i, r in enumerate(records):
        doc = encode(r, f"eval record {i + 1}")
        if "bad" in doc:
            raise UserError(f"{doc['bad'][0]}: {doc['bad'][1]}")
        docs.append(doc)
    totals: dict[str, float] = defaultdict(float)
    for start in range(0, len(docs), batch_size):
        batch = empty_batch(batch_size, seq_len, tok.pad_id)
        batch["labels"] = np.full((batch_size,), -1, np.int32)
        for row, doc in enumerate(docs[start : start + batch_size]):
            ids = doc["tokens"][:seq_len]
            batch["tokens"][row, : len(ids)] = ids
            batch["segment_ids"][row, : len(ids)] = 1
            batch["positions"][row, : len(ids)] = np.arange(len(ids))
            batch["labels"][row] = doc["label"]
        sums = jax.device_get(exp.eval_step(exp.state.params, jax.device_put(batch, exp.batch_sharding)))
        for k, v in sums.items():
            totals[k] += float(v)
    n = max(totals["weight"], 1.0)
    return {"accuracy": totals["correct"] / n, "loss": totals["loss_sum"] / n, "count": int(totals["weight"])}


def preference_accuracy(exp, tok, records: list[dict], fmt, *, seq_len: int, batch_size: int) -> dict[str, Any]:
    """Held-out pairwise accuracy (reward: r_chosen > r_rejected; dpo: rewards/accuracies), mean loss and the
    objective's other metrics over preference `records`, pairs packed whole as in training."""
    from maxtrain.data.formats import RecordEncoder
    from maxtrain.data.lanes import LaneBatcher

    encode = RecordEncoder(fmt, tok)
    docs = [encode(r, f"eval record {i + 1}") for i, r in enumerate(records)]
    batches = LaneBatcher(docs, global_batch=batch_size, rows=range(batch_size), seq_len=seq_len, pad_id=tok.pad_id,
                          fill="whole", too_long=fmt.too_long, fields=fmt.batch_fields())  # fmt: skip
    totals: dict[str, float] = defaultdict(float)
    for batch in batches:
        sums = jax.device_get(exp.eval_step(exp.state.params, jax.device_put(batch, exp.batch_sharding)))
        for k, v in sums.items():
            totals[k] += float(v)
    n = max(totals["weight"], 1.0)
    out = {"accuracy": totals["correct"] / n, "loss": totals["loss_sum"] / n, "count": int(totals["weight"])}
    out.update({k: v / n for k, v in totals.items() if k not in ("weight", "correct", "loss_sum")})
    return out


def _params_path(cfg, given: str | None) -> str:
    if given:
        return given
    if (Path(cfg.run_dir) / "checkpoints").is_dir():
        return cfg.run_dir
    if cfg.init_from:
        return cfg.init_from
    raise UserError("no params to evaluate: pass --params, or train into run_dir first, or set init_from")


def evaluate_task(cfg, data: str, *, params: str | None = None, max_new_tokens: int = 32, limit: int | None = None,
                  batch_size: int = 64) -> dict[str, Any]:
    """Exact-match (sft format), classification accuracy or pairwise preference accuracy (preference format:
    reward models and DPO) of the configured model on a JSONL file."""
    from maxtrain.data import build_tokenizer
    from maxtrain.data.formats import template_for
    from maxtrain.experiment import build_experiment, compute_dtype, finetuned_model_config
    from maxtrain.finetune.init import load_pretrained

    records = [r for _, r in read_jsonl(data, what="eval data", hint="pass a JSONL file with --data", limit=limit)]
    fmt = cfg.data.format
    if fmt.type == "text":
        raise UserError("maxtrain eval needs data.format.type sft (exact match) or classification in the config")
    batch_size = -(-batch_size // jax.device_count()) * jax.device_count()
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"global_batch": batch_size, "microbatches": 1})})
    exp = build_experiment(cfg)
    tok = build_tokenizer(cfg.data, vocab_size=cfg.model.vocab_size)
    path = _params_path(cfg, params)
    with jax.set_mesh(exp.mesh):
        exp.state = exp.state.replace(params=load_pretrained(path, exp.state.params))
        if fmt.type == "classification":
            result = classification_accuracy(exp, tok, records, fmt, seq_len=cfg.train.seq_len, batch_size=batch_size)
        elif fmt.type == "preference":
            result = preference_accuracy(exp, tok, records, fmt, seq_len=cfg.train.seq_len, batch_size=batch_size)
        else:
            from maxtrain.generate import Generator

            gen = Generator(finetuned_model_config(cfg), exp.state.params, mesh=exp.mesh, rules=cfg.mesh.rules,
                            dtype=compute_dtype(cfg.train.compute_dtype))
            result = exact_match(gen, tok, records, template_for(fmt.template, cfg.model.family, tok),
                                 max_new_tokens=max_new_tokens, batch_size=batch_size)
    result["params"] = str(path)
    return result


def _eval_config(ns: argparse.Namespace, checkpoint: str | None):
    """The run config: CONFIG [overrides] when given, else the one the checkpoint was trained with."""
    from maxtrain.cli import _split_config_and_overrides
    from maxtrain.config import load_config

    if ns.args or checkpoint is None:
        path, overrides = _split_config_and_overrides(ns.args)
        return load_config(path, overrides)
    from maxtrain.checkpoint.commands import run_config_of
    from maxtrain.checkpoint.source import resolve_model

    return run_config_of(resolve_model(checkpoint).metadata())


def _cmd_eval(ns: argparse.Namespace) -> int:
    from maxtrain.scoring import data_kind, score_checkpoint

    checkpoint = ns.checkpoint or ns.params
    kind = data_kind(ns.data, ns.perplexity)
    if kind != "task":  # log-likelihood scoring needs only the model: no config
        if checkpoint is None:
            checkpoint = _params_path(_eval_config(ns, None), None)
        result = score_checkpoint(checkpoint, ns.data, kind=kind, limit=ns.limit, delimiter=ns.delimiter)
        if ns.out:
            Path(ns.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "loglikelihoods"}))
        return 0
    cfg = _eval_config(ns, checkpoint)
    result = evaluate_task(cfg, ns.data, params=checkpoint, max_new_tokens=ns.max_new_tokens, limit=ns.limit)
    for ex in result.get("examples", [])[:3]:
        log.info("example: %r -> %r (reference %r)", ex["prompt"], ex["reply"], ex["reference"])
    log.info("accuracy %.3f on %d records (%s)%s", result["accuracy"], result["count"], result["params"],
             "".join(f"; {t} {a:.3f}" for t, a in result.get("per_task", {}).items()))
    if ns.out:
        Path(ns.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}))
    return 0


def register_commands(sub) -> None:
    """Add `maxtrain eval` to the CLI."""
    p = sub.add_parser("eval", help="evaluate a model: maxtrain eval [CONFIG] --checkpoint RUN --data FILE",
                       description="Multiple-choice accuracy ({context, choices, label} JSONL: acc, acc_norm), "
                                   "perplexity (a .txt file or {text} JSONL: loss, perplexity, bits per byte), "
                                   "exact match of greedy replies (sft records) or head accuracy (classification).")
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] key=value",
                   help="sft / classification: the run config (default: the checkpoint's own)")
    p.add_argument("--data", required=True, help="JSONL {context, choices, label} | .txt or {text} | sft records | {text, label}")
    p.add_argument("--checkpoint", help="run dir (newest checkpoint), checkpoint step dir or export")
    p.add_argument("--params", help="the same as --checkpoint (default: the config's run_dir, else init_from)")
    p.add_argument("--perplexity", action="store_true", help="score --data as held-out text, whatever its format")
    p.add_argument("--delimiter", default=" ", help="multiple choice: put between context and choice (lm-eval's default)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--limit", type=int, help="evaluate only the first N records")
    p.add_argument("--out", help="also write the result (with examples) to this JSON file")
    p.set_defaults(func=_cmd_eval)

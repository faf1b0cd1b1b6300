"""Reference log-probs computed once, before DPO: `train.preference.reference: precomputed` without adapters.

    maxtrain preference reference --model runs/tasks-sft --data pref_train.jsonl --out pref_train_ref.jsonl

Each record comes back with `ref_chosen_logps` and `ref_rejected_logps` (TRL's column names):
the sum of log p(token) over the chosen / rejected reply under the model, rendered exactly as
the preference format renders it for training (data/preference.py: the same chat template,
the same weighted tokens, the same cut of pairs longer than --seq-len), so the values equal
the in-step reference's (sequence_logps) within float rounding. A DPO run on the written file
with reference=precomputed then holds no reference weights and runs no reference pass;
the cost is this one forward pass over the data. Use the DPO run's data.format.template and
train.seq_len (--template, --seq-len; defaults: the model run's own).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from maxtrain.errors import UserError

log = logging.getLogger("maxtrain.preference")


def pair_rows(elements: list[dict], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """A batch with one pair element per row (segments 1 and 2, positions from 0), as the lane writer lays it out."""
    b = len(elements)
    batch = {"tokens": np.full((b, seq_len), pad_id, np.int32), "targets": np.full((b, seq_len), pad_id, np.int32),
             "loss_weights": np.zeros((b, seq_len), np.float32), "segment_ids": np.zeros((b, seq_len), np.int32),
             "positions": np.zeros((b, seq_len), np.int32)}  # fmt: skip
    for row, el in enumerate(elements):
        toks, segs, w = el["tokens"], el["segments"], el["weights"]
        n = len(toks)
        batch["tokens"][row, :n], batch["segment_ids"][row, :n], batch["loss_weights"][row, :n] = toks, segs, w
        batch["targets"][row, : n - 1] = toks[1:]  # across the chosen/rejected border the weight is 0
        for s in (1, 2):
            idx = np.flatnonzero(segs == s)
            batch["positions"][row, idx] = np.arange(len(idx))
    return batch


def reference_logps(path, records: list[Any], *, template: str | None = None, seq_len: int | None = None,
                    batch_size: int = 16, dtype: str = "auto", mesh=None) -> np.ndarray:
    """float32 [N, 2]: (chosen, rejected) summed reply log-probs of each preference record under the model at `path`."""
    from maxtrain.data.formats import template_for
    from maxtrain.data.preference import PreferenceEncoder, cut_sequences
    from maxtrain.experiment import compute_dtype, make_apply_fn
    from maxtrain.mesh import batch_sharding, data_parallel_size
    from maxtrain.model.transformer import Transformer
    from maxtrain.objectives_preference import pairs, sequence_logps
    from maxtrain.reward_model import load_model

    m = load_model(path, mesh=mesh)
    tok = m.tokenizer
    name = template or getattr(m.run_cfg.data.format, "template", "auto")
    encode = PreferenceEncoder.with_template(template_for(name, m.model_cfg.family, tok), tok)
    length = min(seq_len or (m.run_cfg.train.seq_len if m.meta.get("config") else m.model_cfg.max_seq_len),
                 m.model_cfg.max_seq_len)
    elements = []
    for i, r in enumerate(records):
        el = encode(r, f"record {i + 1}")
        if "bad" in el:
            raise UserError(f"{el['bad'][0]}: {el['bad'][1]}")
        cut = cut_sequences(el, length)
        if cut is None:
            raise UserError(f"record {i + 1}: the pair does not fit in --seq-len {length} tokens even with its prompt cut")
        elements.append(cut)
    apply = make_apply_fn(Transformer(m.model_cfg, dtype=compute_dtype(dtype)), m.rules)
    rows = batch_sharding(m.mesh)
    size = -(-batch_size // data_parallel_size(m.mesh)) * data_parallel_size(m.mesh)

    @jax.jit
    def logps(params, batch):
        per_seq, _ = sequence_logps(apply, params, batch)
        c, r = pairs(per_seq)
        return jax.lax.with_sharding_constraint(jnp.stack([c[:, 0], r[:, 0]], axis=1), NamedSharding(m.mesh, P()))

    out = np.zeros((len(elements), 2), np.float32)
    for start in range(0, len(elements), size):  # every batch one shape: one compile
        chunk = elements[start : start + size]
        batch = pair_rows(chunk + [chunk[0]] * (size - len(chunk)), length, tok.pad_id)
        with jax.set_mesh(m.mesh):
            values = np.asarray(jax.device_get(logps(m.params, jax.device_put(batch, rows))))
        out[start : start + len(chunk)] = values[: len(chunk)]
    return out


def _cmd_reference(ns: argparse.Namespace) -> int:
    from maxtrain.data.jsonl import read_jsonl

    records = [r for _, r in read_jsonl(ns.data, what="preference data", hint="pass a JSONL of {prompt, chosen, "
                                        "rejected} records with --data", limit=ns.limit)]  # fmt: skip
    values = reference_logps(ns.model, records, template=ns.template, seq_len=ns.seq_len, batch_size=ns.batch_size)
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({**r, "ref_chosen_logps": float(c), "ref_rejected_logps": float(x)}) + "\n"
                           for r, (c, x) in zip(records, values)))
    print(json.dumps({"out": str(out), "records": len(records), "mean_ref_chosen_logps": float(values[:, 0].mean()),
                      "mean_ref_rejected_logps": float(values[:, 1].mean())}))
    return 0


def register_commands(sub) -> None:
    """Add `maxtrain preference reference` to the CLI."""
    p = sub.add_parser("preference", help="preference-data tools: maxtrain preference reference --model RUN ...")
    psub = p.add_subparsers(dest="preference_command", required=True)
    ref = psub.add_parser("reference", help="write reference log-probs into preference records (reference: precomputed)")
    ref.add_argument("--model", required=True, help="the reference: run dir, checkpoint step dir or export (the SFT run)")
    ref.add_argument("--data", required=True, help="preference JSONL ({prompt, chosen, rejected} or messages)")
    ref.add_argument("--out", required=True, help="output JSONL: the records with ref_chosen_logps / ref_rejected_logps")
    ref.add_argument("--template", help="chat template (default: the model run's data.format.template)")
    ref.add_argument("--seq-len", type=int, help="the DPO run's train.seq_len (default: the model run's)")
    ref.add_argument("--batch-size", type=int, default=16)
    ref.add_argument("--limit", type=int, help="only the first N records")
    ref.set_defaults(func=_cmd_reference)

"""A trained reward model as a function: text in, one float reward per (prompt, completion) out.

    rm = RewardModel.load("runs/tasks-reward")          # run dir, checkpoint step dir or export
    rm.score(["2+2?"], ["4"])                           # -> np.ndarray float32 [1]

    maxtrain score --checkpoint runs/tasks-reward --data pairs.jsonl

The reward is exactly what the reward objective trains (objectives_preference.sequence_rewards):
the prompt as a user turn and the completion as the assistant reply, rendered with the run's
chat template (data/preference.py), then the one-label head on the sequence's last token,
without the head's bias. Each sequence is scored alone in its row (segment 1, positions from
0), which equals its value packed beside others in training; rows have one fixed shape
(batch_size x seq_len), so repeated calls reuse one compiled program.

Multi-process runs: `score` is collective. Every process calls it the same way at the same
point with its own rows (any count, different per process); the processes agree on the
number of batches, each process's rows fill its devices' share of each global batch, and
each process gets back the rewards of its own rows in order.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from maxtrain.errors import UserError


@dataclasses.dataclass
class LoadedModel:
    """A model on disk read onto a mesh: its configs, sharded params, tokenizer and metadata."""

    model_cfg: Any
    run_cfg: Any
    params: Any
    tokenizer: Any
    meta: dict
    mesh: Any
    rules: Any


def load_model(path, *, mesh=None, rules=None) -> LoadedModel:
    """Params of a run dir / step dir / export (checkpoint.source.resolve_model) sharded over `mesh` by `rules`
    (defaults: every device, MeshConfig's rules), with the model config that rebuilds them (head, LoRA)."""
    from maxtrain.checkpoint.commands import run_config_of
    from maxtrain.checkpoint.params import load_params_onto, model_config_of
    from maxtrain.checkpoint.source import resolve_model
    from maxtrain.config import MeshConfig
    from maxtrain.mesh import build_mesh

    source = resolve_model(path)
    meta = source.metadata()
    model_cfg = model_config_of(meta)
    tok = source.require_tokenizer()
    rules = rules if rules is not None else MeshConfig().rules
    mesh = mesh if mesh is not None else build_mesh(MeshConfig())
    params = load_params_onto(source.params_dir.parent, model_cfg, mesh, rules)
    return LoadedModel(model_cfg, run_config_of(meta), params, tok, meta, mesh, rules)


class RewardModel:
    """A one-label last-token reward model on a mesh (params sharded by the mesh rules).

    Build with `RewardModel.load`; `score` returns rewards for (prompt, completion) pairs.
    seq_len: the row length (default: the training run's train.seq_len, at most the model's
    max_seq_len); a longer sequence loses prompt tokens from the left after BOS (the pair
    format's policy), and one whose completion alone does not fit is a UserError.
    """

    def __init__(self, model_cfg, params, tokenizer, template, *, mesh, rules, seq_len: int, batch_size: int = 16,
                 dtype=jnp.float32):
        from maxtrain.data.preference import PreferenceEncoder
        from maxtrain.experiment import make_apply_fn
        from maxtrain.mesh import batch_sharding, data_parallel_size
        from maxtrain.model.transformer import Transformer

        head = model_cfg.classifier
        if head is None or head.num_labels != 1 or head.pooling != "last":
            raise UserError("this model has no scalar reward head (finetune.classifier={num_labels: 1, pooling: last}); "
                            "pass a run trained with train.objective=reward")
        self.cfg, self.params, self.tokenizer, self.mesh, self.rules = model_cfg, params, tokenizer, mesh, rules
        self.seq_len = seq_len
        dp = data_parallel_size(mesh)
        self.batch_size = -(-batch_size // dp) * dp  # the global batch: rows split over the data-parallel devices
        self._encoder = PreferenceEncoder.with_template(template, tokenizer)
        self._apply = make_apply_fn(Transformer(model_cfg, dtype=dtype), rules)
        self._rows = batch_sharding(mesh)
        self._score = jax.jit(self._rewards, out_shardings=NamedSharding(mesh, P()))

    @classmethod
    def load(cls, path, *, mesh=None, rules=None, seq_len: int | None = None, batch_size: int = 16,
             dtype: str = "auto") -> "RewardModel":
        """A reward run dir (newest checkpoint), checkpoint step dir or export (maxtrain.checkpoint.source).

        mesh: where the params live (default: every device, the default mesh rules); rules:
        logical-axis rules (default: MeshConfig's). The chat template is the run's
        data.format.template (an export without a run config: auto, the family's).
        """
        from maxtrain.data.formats import template_for
        from maxtrain.experiment import compute_dtype

        loaded = load_model(path, mesh=mesh, rules=rules)
        model_cfg, run_cfg, tok = loaded.model_cfg, loaded.run_cfg, loaded.tokenizer
        meta, mesh, rules, params = loaded.meta, loaded.mesh, loaded.rules, loaded.params
        template = template_for(getattr(run_cfg.data.format, "template", "auto"), model_cfg.family, tok)
        length = min(seq_len or (run_cfg.train.seq_len if meta.get("config") else model_cfg.max_seq_len),
                     model_cfg.max_seq_len)
        return cls(model_cfg, params, tok, template, mesh=mesh, rules=rules, seq_len=length, batch_size=batch_size,
                   dtype=compute_dtype(dtype))

    def _rewards(self, params, batch):
        from maxtrain.objectives_preference import sequence_rewards

        return sequence_rewards(self._apply, params, batch)[:, 1]  # segment 1: the row's one sequence

    def encode(self, prompt: Any, completion: Any, where: str = "record") -> np.ndarray:
        """Token ids of prompt + completion as the reward objective renders them (cut to seq_len)."""
        from maxtrain.data.preference import as_messages, cut_sequences

        p = as_messages(prompt, "user", "prompt")
        # An empty reply is a reply to score (a policy that stops at once), not a bad record.
        c = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else \
            as_messages(completion, "assistant", "completion")
        for m in (p, c):
            if isinstance(m, str):
                raise UserError(f"{where}: {m}")
        if len(c) != 1 or c[0]["role"] != "assistant":
            raise UserError(f"{where}: 'completion' must be one assistant reply")
        ids, weights = self._encoder.sequence(p, c[0])
        element = cut_sequences({"tokens": ids, "weights": weights, "segments": np.ones(len(ids), np.int32)},
                                self.seq_len)
        if element is None:
            raise UserError(f"{where}: the completion alone is longer than the model's rows ({self.seq_len} tokens); "
                            "shorten it or load with a larger seq_len")
        return element["tokens"]

    def score(self, prompts: Sequence[Any], completions: Sequence[Any]) -> np.ndarray:
        """float32 [N]: the reward of each (prompt, completion); strings or chat-message lists.

        Collective under several processes: each calls it with its own rows (see the module doc).
        """
        if len(prompts) != len(completions):
            raise UserError(f"score needs one completion per prompt ({len(prompts)} prompts, {len(completions)} completions)")
        seqs = [self.encode(p, c, f"record {i + 1}") for i, (p, c) in enumerate(zip(prompts, completions))]
        return self.score_ids(seqs)

    def score_ids(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """float32 [N]: rewards of already-rendered token sequences (each at most seq_len tokens)."""
        from maxtrain.data.pipeline import local_rows, make_global_batch

        rows = local_rows(self._rows, self.batch_size)
        per_batch = len(rows)
        batches = math.ceil(len(sequences) / per_batch)
        if jax.process_count() > 1:  # every process runs the same number of global batches
            from jax.experimental import multihost_utils

            batches = int(np.max(multihost_utils.process_allgather(np.asarray(batches))))
        out = np.zeros(len(sequences), np.float32)
        pad = self.tokenizer.pad_id
        for b in range(batches):
            chunk = sequences[b * per_batch : (b + 1) * per_batch]
            tokens = np.full((per_batch, self.seq_len), pad, np.int32)
            segments = np.zeros((per_batch, self.seq_len), np.int32)
            positions = np.zeros((per_batch, self.seq_len), np.int32)
            for r, ids in enumerate(chunk):
                n = len(ids)
                if n > self.seq_len:
                    raise UserError(f"a scored sequence has {n} tokens, more than the rows' {self.seq_len}")
                tokens[r, :n], segments[r, :n], positions[r, :n] = ids, 1, np.arange(n)
            batch = make_global_batch({"tokens": tokens, "segment_ids": segments, "positions": positions}, self._rows)
            with jax.set_mesh(self.mesh):
                rewards = np.asarray(jax.device_get(self._score(self.params, batch)))
            out[b * per_batch : b * per_batch + len(chunk)] = rewards[rows][: len(chunk)]
        return out


def _cmd_score(ns: argparse.Namespace) -> int:
    from maxtrain.data.jsonl import read_jsonl

    records = read_jsonl(ns.data, what="score data", hint="pass a JSONL file of {prompt, completion} "
                         "(or {prompt, chosen, rejected}) records with --data", limit=ns.limit)
    pairs = "chosen" in records[0][1] if isinstance(records[0][1], dict) else False
    need = ("prompt", "chosen", "rejected") if pairs else ("prompt", "completion")
    for n, r in records:
        if not isinstance(r, dict):
            raise UserError(f"{ns.data}:{n}: record is {type(r).__name__}, not a JSON object with {', '.join(need)}")
        missing = [k for k in need if k not in r]
        if missing:
            raise UserError(f"{ns.data}:{n}: missing field {missing[0]!r}; every record needs {', '.join(need)} "
                            "(the first record decides which)")
    rm = RewardModel.load(ns.checkpoint, batch_size=ns.batch_size)
    prompts = [r["prompt"] for _, r in records]
    if pairs:
        chosen = rm.score(prompts, [r["chosen"] for _, r in records])
        rejected = rm.score(prompts, [r["rejected"] for _, r in records])
        for (n, _), c, r in zip(records, chosen, rejected):
            print(json.dumps({"line": n, "reward_chosen": float(c), "reward_rejected": float(r)}))
        right = chosen > rejected
        tasks: dict[str, list[bool]] = {}
        for (_, r), ok in zip(records, right):
            if isinstance(r.get("task"), str):
                tasks.setdefault(r["task"], []).append(bool(ok))
        summary = {"accuracy": float(np.mean(right)), "count": len(records), "margin": float(np.mean(chosen - rejected))}
        if tasks:  # records that name their task (the synthetic suite's) get a per-task breakdown
            summary["per_task"] = {t: float(np.mean(v)) for t, v in sorted(tasks.items())}
        print(json.dumps(summary))
    else:
        rewards = rm.score(prompts, [r["completion"] for _, r in records])
        for (n, _), v in zip(records, rewards):
            print(json.dumps({"line": n, "reward": float(v)}))
    return 0


def register_commands(sub) -> None:
    """Add `maxtrain score` to the CLI."""
    p = sub.add_parser("score", help="score text with a reward model: maxtrain score --checkpoint RUN --data FILE",
                       description="One JSON line per record with its reward ({prompt, completion} records), or with "
                                   "both rewards and then the pairwise accuracy ({prompt, chosen, rejected} records).")
    p.add_argument("--checkpoint", required=True, help="reward run dir (newest checkpoint), checkpoint step dir or export")
    p.add_argument("--data", required=True, help="JSONL {prompt, completion} or {prompt, chosen, rejected}")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass (one compile)")
    p.add_argument("--limit", type=int, help="score only the first N records")
    p.set_defaults(func=_cmd_score)

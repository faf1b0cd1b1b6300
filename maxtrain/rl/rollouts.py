"""Rollouts are data: a source that samples completions from the current weights, scores them
and yields ordinary batches for the one train step (see ../shared/DESIGN.md).

Each step's batch is train.global_batch rows: global_batch / G prompts, each repeated in G
consecutive rows, continued by the KV-cache generator on the training mesh from the params
the trainer hands over (never copied). A row is prompt + completion (EOS included when one
was sampled), loss weights on the completion's targets, and per-token fields:
advantages (the group-normalised reward, see objectives_rl.group_advantages), old_logps
(the sampling-time log-probs, for iterations > 1) and reference_logps (the frozen
reference's, for the KL penalty). Shapes never change, so the step compiles once.

Every batch is a function of the seed, the data config and the rollout number, never of
the process count: every process reads the same global prompt batch and samples the same
global completions (one SPMD program); each scores only its own rows, and the rewards are
gathered so every process computes the same advantages. The state (prompt position,
rollout number, and an unfinished rollout batch when iterations > 1) goes into checkpoints,
so a resumed run samples exactly what an uninterrupted one would.
"""

from __future__ import annotations

import base64
import io
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from maxtrain.data.documents import global_documents, open_sources
from maxtrain.data.pipeline import data_fingerprint, make_global_batch
from maxtrain.data.prompts import prompt_text
from maxtrain.errors import UserError
from maxtrain.generate import Generator, Sampling, continuation
from maxtrain.objectives_rl import group_advantages, token_logps

log = logging.getLogger("maxtrain.rl")
_STATE_VERSION = 1
FIELDS = ("tokens", "targets", "loss_weights", "segment_ids", "positions", "advantages", "old_logps", "reference_logps")


def _encode(arrays: dict[str, np.ndarray]) -> str:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _decode(text: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(base64.b64decode(text))) as z:
        return {k: z[k] for k in z.files}


def _gather(x: jax.Array) -> np.ndarray:
    """The whole global array on every process (small: completions, rewards)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def rollout_rows(prompts: list[np.ndarray], completions_NxC: np.ndarray, *, group_size: int, seq_len: int,
                 eos_id: int, pad_id: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(batch fields for N = len(prompts) x G rows, completion lengths [N]) of prompts and their sampled tokens.

    A completion ends after its first EOS (kept: the model learns to stop) or at the token
    limit; its targets carry weight 1, the prompt's and the padding's 0.
    """
    n = completions_NxC.shape[0]
    batch = {k: np.zeros((n, seq_len), np.int32) for k in ("tokens", "segment_ids")}
    batch["tokens"][:] = pad_id
    weights = np.zeros((n, seq_len), np.float32)
    lengths = np.zeros(n, np.int32)
    for r in range(n):
        prompt, new = prompts[r // group_size], completions_NxC[r]
        ends = np.flatnonzero(new == eos_id)
        c = int(ends[0]) + 1 if ends.size else len(new)
        p = len(prompt)
        batch["tokens"][r, :p], batch["tokens"][r, p : p + c] = prompt, new[:c]
        batch["segment_ids"][r, : p + c] = 1
        weights[r, p - 1 : p + c - 1] = 1.0  # weights[j]: predicting token j+1
        lengths[r] = c
    batch["targets"] = np.concatenate([batch["tokens"][:, 1:], np.full((n, 1), pad_id, np.int32)], axis=1)
    batch["loss_weights"] = weights
    batch["positions"] = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy()
    return batch, lengths


class RolloutSource:
    """The train batches of an RL run: next_global(sharding, params) samples, scores and returns one.

    Also get_state / set_state (checkpoints), step_metrics (rewards, lengths, time split) and close.
    """

    def __init__(self, cfg, exp, tokenizer, *, rows: np.ndarray):
        from maxtrain.experiment import rl_reference
        from maxtrain.rl.rewards import build_rewards

        rl, t = cfg.train.rl, cfg.train
        self.cfg, self.exp, self.tok, self.rl = cfg, exp, tokenizer, rl
        self.n, self.g, self.seq_len = t.global_batch, rl.group_size, t.seq_len
        self.prompt_limit = t.seq_len - rl.max_completion_len
        rows = np.asarray(rows)
        blocks = rows.reshape(-1, self.g) if rows.size % self.g == 0 else None
        if blocks is None or np.any(blocks[:, 0] % self.g) or np.any(np.diff(blocks, axis=1) != 1):
            raise UserError(f"each process must hold whole groups of train.rl.group_size={self.g} rollouts; "
                            f"make the rows per process ({rows.size}) a multiple of the group size")
        self.rows = rows
        self.docs = global_documents(cfg.data, tokenizer, open_sources(cfg.data, tokenizer), split="train", seed=cfg.seed)
        self.rewards = build_rewards(rl.rewards, mesh=exp.mesh, rules=cfg.mesh.rules)
        self.reference = rl_reference(cfg)
        self.sampling = Sampling(max_new_tokens=rl.max_completion_len, temperature=rl.temperature, top_k=rl.top_k,
                                 top_p=rl.top_p)
        self.generator = Generator(exp.model.cfg, None, mesh=exp.mesh, rules=cfg.mesh.rules, dtype=exp.model.dtype)
        self.eos_id, self.pad_id = tokenizer.eos_id, tokenizer.pad_id
        shardings = (exp.state_shardings.params, exp.batch_sharding)
        logps = lambda params, batch: token_logps(exp.apply_fn, params, batch, temperature=rl.temperature)[0]  # noqa: E731
        self._logps = jax.jit(logps, in_shardings=shardings, out_shardings=exp.batch_sharding)
        if self.reference == "adapters_off":
            from maxtrain.objectives_preference import adapters_off

            self._ref_logps = jax.jit(lambda p, b: logps(adapters_off(p), b), in_shardings=shardings,
                                      out_shardings=exp.batch_sharding)
        else:
            self._ref_logps = self._logps
        self._zeros = jax.jit(jnp.zeros_like, out_shardings=exp.batch_sharding)  # fields a run does not use
        self._reference_params = None  # reference=init: the init_from weights, loaded at the first rollout
        self._key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0x5A3)  # the sampler's own stream
        self.position, self.skipped, self.rollouts, self.passes = 0, 0, 0, 0
        self.pending: dict | None = None
        self.metrics: dict[str, float] = {}
        self._last_end: float | None = None
        self.fingerprint = data_fingerprint(cfg.data, tokenizer, rl.model_dump(mode="json", exclude={"iterations"}),
                                            t.seq_len, t.global_batch, cfg.seed)

    # -- prompts ---------------------------------------------------------------------------
    def _next_prompts(self) -> list[dict]:
        """The next global prompt batch: global_batch / G elements {tokens, record}, bad ones skipped or refused."""
        out, bad_run = [], 0
        while len(out) < self.n // self.g:
            element = self.docs[self.position]
            self.position += 1
            reason = None
            if "bad" in element:
                where, reason = element["bad"]
            elif len(element["tokens"]) > self.prompt_limit:
                where = f"prompt {self.position - 1}"
                reason = (f"the prompt has {len(element['tokens'])} tokens, more than train.seq_len - "
                          f"train.rl.max_completion_len = {self.prompt_limit}")
            if reason is None:
                out.append(element)
                bad_run = 0
                continue
            if self.cfg.data.on_bad_record != "skip":
                raise UserError(f"bad record in {where}: {reason}; fix the data or set data.on_bad_record: skip")
            self.skipped += 1
            bad_run += 1
            if self.skipped <= 10 or (self.skipped & (self.skipped - 1)) == 0:
                log.warning("skipped bad prompt %d in %s: %s", self.skipped, where, reason)
            if bad_run > 10_000:
                raise UserError("10000 prompts in a row were bad; check data.sources and data.format")
        return out

    # -- one rollout batch -----------------------------------------------------------------
    def _replicated(self, x: np.ndarray) -> jax.Array:
        sharding = NamedSharding(self.exp.mesh, PartitionSpec())
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    def _rollout(self, params) -> dict:
        jax.block_until_ready(params)  # the previous step's update: time it apart from sampling
        start = time.perf_counter()
        train_s = start - self._last_end if self._last_end is not None else None
        elements = self._next_prompts()
        groups = len(elements)
        width = max(len(e["tokens"]) for e in elements)
        width = min(-(-width // 16) * 16, self.prompt_limit)  # few distinct prompt widths: few compiles
        tokens = np.full((self.n, width), self.pad_id, np.int32)
        lengths = np.zeros(self.n, np.int32)
        for r in range(self.n):
            ids = elements[r // self.g]["tokens"]
            tokens[r, : len(ids)], lengths[r] = ids, len(ids)
        key = jax.random.fold_in(self._key, self.rollouts)
        out, _ = self.generator.sample(params, self._replicated(tokens), self._replicated(lengths), self.sampling, key,
                                       eos_ids=(self.eos_id,), pad_id=self.pad_id)
        completions = _gather(out)
        sampled = time.perf_counter()
        prompts = [e["tokens"] for e in elements]
        batch, comp_len = rollout_rows(prompts, completions, group_size=self.g, seq_len=self.seq_len,
                                       eos_id=self.eos_id, pad_id=self.pad_id)
        # Each process scores its own rows; the rewards are gathered so advantages are global.
        local = self.rows
        records = [elements[r // self.g]["record"] for r in local]
        texts = [self._text(prompts[r // self.g], completions[r, : comp_len[r]]) for r in local]
        total_local, parts_local = self.rewards([prompt_text(rec) for rec in records], texts, records)
        names = list(parts_local)
        local_table = np.stack([total_local] + [parts_local[k] for k in names], axis=1).astype(np.float32)
        table = self._all_rows(local_table)
        total = table[:, 0]
        adv = group_advantages(total.reshape(groups, self.g), baseline=self.rl.baseline, scale=self.rl.scale).reshape(-1)
        batch["advantages"] = np.repeat(adv[:, None].astype(np.float32), self.seq_len, axis=1) * (batch["loss_weights"] > 0)
        scored = time.perf_counter()
        device = self._to_device(batch)
        zeros = self._zeros
        device["old_logps"] = self._logps(params, device) if self.rl.iterations > 1 else zeros(device["advantages"])
        if self.reference is None:
            device["reference_logps"] = zeros(device["advantages"])
        else:
            ref_params = params if self.reference == "adapters_off" else self._init_params(params)
            device["reference_logps"] = self._ref_logps(ref_params, device)
        jax.block_until_ready(device)
        end = time.perf_counter()
        generated = int(comp_len.sum())
        self.metrics = {
            "reward": float(total.mean()), "reward_std": float(total.std()),
            **{f"rewards/{k}": float(table[:, i + 1].mean()) for i, k in enumerate(names)},
            **{f"rewards/{k}_std": float(table[:, i + 1].std()) for i, k in enumerate(names)},
            "completion_length": float(comp_len.mean()),
            "completions_clipped": float(np.mean(comp_len == self.rl.max_completion_len)),
            "rollout_s": end - start, "rollout_tokens_per_s": generated / max(sampled - start, 1e-9),
            "scoring_s": scored - sampled,
        }
        if train_s is not None:
            self.metrics.update(train_s=train_s, train_tokens_per_s=self.rl.iterations * self.n * self.seq_len / max(train_s, 1e-9))
        self._last_end = end
        self.rollouts += 1
        return device

    def _text(self, prompt: np.ndarray, new: np.ndarray) -> str:
        """The completion's text as it continues the prompt (without BOS and EOS)."""
        prompt = prompt[1:] if len(prompt) and prompt[0] == self.tok.bos_id else prompt
        # Ids past the tokenizer (a model vocabulary padded for speed) have no text.
        return continuation(self.tok, prompt.tolist(), [int(t) for t in new if t != self.eos_id and t < self.tok.vocab_size])

    def _all_rows(self, local_NxK: np.ndarray) -> np.ndarray:
        """Every process's rows of a per-row table, in global row order."""
        if jax.process_count() == 1:
            full = np.zeros((self.n, local_NxK.shape[1]), np.float32)
            full[self.rows] = local_NxK
            return full
        rows = multihost_utils.process_allgather(self.rows.astype(np.int32))
        values = multihost_utils.process_allgather(local_NxK)
        full = np.zeros((self.n, local_NxK.shape[1]), np.float32)
        full[np.asarray(rows).reshape(-1)] = np.asarray(values).reshape(-1, local_NxK.shape[1])
        return full

    def _to_device(self, batch: dict[str, np.ndarray]) -> dict:
        return make_global_batch({k: v[self.rows] for k, v in batch.items()}, self.exp.batch_sharding)

    def _init_params(self, template):
        if self._reference_params is None:
            from maxtrain.finetune.init import load_pretrained

            loaded = load_pretrained(self.cfg.init_from, template)
            # Leaves the checkpoint lacks would alias the (donated) training params: copy them all.
            self._reference_params = jax.jit(lambda t: jax.tree.map(jnp.copy, t))(loaded)
            log.info("KL reference: the init_from weights (%s), held once, no optimizer state", self.cfg.init_from)
        return self._reference_params

    # -- the data-iterator interface the trainer uses ----------------------------------------
    def next_global(self, sharding, params) -> dict:
        """The next step's global batch; samples a new rollout batch every train.rl.iterations steps."""
        if self.pending is None or self.passes >= self.rl.iterations:
            self.pending, self.passes = self._rollout(params), 0
        self.passes += 1
        return self.pending

    def step_metrics(self) -> dict[str, float]:
        """The metrics of the rollout batch the last next_global returned."""
        return dict(self.metrics)

    def get_state(self) -> dict:
        """The position of the next batch; an unfinished rollout batch (iterations > 1) travels whole."""
        state = {"version": _STATE_VERSION, "kind": "rollouts", "fingerprint": self.fingerprint, "position": self.position,
                 "skipped": self.skipped, "rollouts": self.rollouts, "passes": self.passes}
        if self.pending is not None and self.passes < self.rl.iterations:
            state["pending"] = _encode({k: _gather(v) for k, v in self.pending.items()})
            state["metrics"] = self.metrics
        return state

    def set_state(self, state: dict | list[dict]) -> None:
        """Continue from a get_state() (or a checkpoint's list of every process's, which are equal)."""
        s = state[0] if isinstance(state, list) else state
        if not isinstance(s, dict) or s.get("kind") != "rollouts" or s.get("version") != _STATE_VERSION:
            raise UserError("the checkpoint's data state is not a rollout position of this maxtrain version; "
                            "set checkpoint.restore_data=false to keep the weights and restart the prompts")
        if s.get("fingerprint") != self.fingerprint:
            raise UserError("the checkpoint's rollouts were sampled with different settings (data, train.rl, seq_len, "
                            "global_batch or seed); resume with the same settings or set checkpoint.restore_data=false")
        self.position, self.skipped, self.rollouts, self.passes = s["position"], s["skipped"], s["rollouts"], s["passes"]
        self.pending = None
        if "pending" in s:
            self.pending = self._to_device(_decode(s["pending"]))
            self.metrics = dict(s.get("metrics", {}))

    @property
    def skipped_records(self) -> int:
        """Bad prompts skipped so far (data.on_bad_record: skip)."""
        return self.skipped

    def close(self) -> None:
        """Nothing to stop (the source reads prompts inline)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

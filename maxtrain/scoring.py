"""Log-likelihood scoring: multiple-choice accuracy and held-out perplexity of any model on disk.

    maxtrain eval --checkpoint RUN --data mc.jsonl      # {"context", "choices", "label"}: acc, acc_norm
    maxtrain eval --checkpoint RUN --data text.txt      # (or JSONL {"text"}, or --perplexity): loss, ppl, bits/byte

The conventions are lm-evaluation-harness's, so numbers compare: a choice is scored as the
continuation `delimiter + choice` (default " ") of its context, tokenized as the whole
string with the context's tokens split off; acc_norm picks the highest log-likelihood per
byte of the choice; perplexity scores every token of a text after a BOS (or EOS when the
model takes no BOS), in windows of the model's length, each conditioned on what precedes it.
`Scorer` is the one forward pass behind both, and behind the lm-eval adapter.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maxtrain.data.jsonl import read_jsonl
from maxtrain.errors import UserError

_LENGTH_BUCKET = 32  # rows pad to a multiple of this: few distinct compiles


class Scorer:
    """Per-token log-probabilities of continuations under one model, batched full forward passes (no cache).

    max_len: the longest window scored at once (default: the model's max_seq_len); longer
    requests keep their last max_len tokens of input, as lm-eval truncates them.
    """

    def __init__(self, cfg, params, *, mesh, rules, dtype=jnp.float32, max_len: int | None = None, batch_size: int = 16):
        from maxtrain.model.transformer import Transformer

        self.cfg, self.params, self.mesh, self.rules = cfg, params, mesh, rules
        self.max_len = max_len or cfg.max_seq_len
        self.batch_size = -(-batch_size // mesh.size) * mesh.size  # the batch is split over the mesh's devices
        self.model = Transformer(cfg, dtype=dtype)
        self._score = jax.jit(self._token_scores)

    @classmethod
    def from_generator(cls, generator, **kw) -> "Scorer":
        """A Scorer on the params, mesh and dtype of a loaded `maxtrain.generate.Generator`."""
        return cls(generator.cfg, generator.params, mesh=generator.mesh, rules=generator.rules, dtype=generator.dtype, **kw)

    def _token_scores(self, params, tokens_BxS, segments_BxS, targets_BxS):
        with nn.logical_axis_rules(self.rules):
            logits_BxSxV = self.model.apply({"params": params}, tokens_BxS, None, segments_BxS).astype(jnp.float32)
        logprobs_BxSxV = jax.nn.log_softmax(logits_BxSxV, axis=-1)
        target_BxS = jnp.take_along_axis(logprobs_BxSxV, targets_BxS[..., None], axis=-1)[..., 0]
        greedy_BxS = jnp.argmax(logits_BxSxV, axis=-1) == targets_BxS
        return target_BxS, greedy_BxS

    def loglikelihoods(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per request.

        requests: (context ids, continuation ids); the context needs at least one token (e.g. BOS).
        """
        rows = []
        for context, continuation in requests:
            if not context or not continuation:
                raise UserError("a scored request needs a non-empty context (at least BOS) and continuation")
            whole = (list(context) + list(continuation))[-(self.max_len + 1) :]
            rows.append((whole[:-1], whole[1:], len(continuation)))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = -(-max(len(rows[i][0]) for i in chunk) // _LENGTH_BUCKET) * _LENGTH_BUCKET
            tokens, targets, segments = (np.zeros((self.batch_size, width), np.int32) for _ in range(3))
            for r, i in enumerate(chunk):
                inputs, outputs, _ = rows[i]
                tokens[r, : len(inputs)], targets[r, : len(outputs)], segments[r, : len(inputs)] = inputs, outputs, 1
            with jax.set_mesh(self.mesh):
                scores, greedy = jax.device_get(self._score(self.params, jnp.asarray(tokens), jnp.asarray(segments), jnp.asarray(targets)))
            for r, i in enumerate(chunk):
                n, k = len(rows[i][0]), rows[i][2]
                out[i] = (float(np.sum(scores[r, n - k : n], dtype=np.float64)), bool(np.all(greedy[r, n - k : n])))
        return out

    def rolling_loglikelihoods(self, documents: Sequence[Sequence[int]], prefix_id: int) -> list[float]:
        """log p(every token of each document | prefix_id), in windows of max_len tokens (lm-eval's rolling scheme)."""
        requests, owners = [], []
        for d, ids in enumerate(documents):
            tokens = [prefix_id, *ids]
            for i in range(1, len(tokens), self.max_len):  # targets tokens[i:j], conditioned on what precedes
                j = min(i + self.max_len, len(tokens))
                requests.append((tokens[max(0, j - self.max_len - 1) : i], tokens[i:j]))
                owners.append(d)
        totals = [0.0] * len(documents)
        for d, (logprob, _) in zip(owners, self.loglikelihoods(requests)):
            totals[d] += logprob
        return totals


def split_encode(tokenizer, context: str, continuation: str, prefix: Sequence[int]) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval makes them: trailing context spaces move to the continuation,
    the pair is encoded whole and split after the context's own tokens; prefix (BOS) starts the context."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context) if context else []
    if whole[: len(ctx)] != ctx:  # the boundary merged into one token: encode the parts apart
        cont = tokenizer.encode(continuation)
    else:
        cont = whole[len(ctx) :]
    return [*prefix, *ctx], list(cont)


def read_choice_records(path: str, limit: int | None = None) -> list[dict]:
    """Validated {context, choices, label} records of a JSONL file (UserError naming the line otherwise)."""
    records = []
    hint = 'pass JSON Lines of {"context": str, "choices": [str, ...], "label": int}'
    for n, r in read_jsonl(path, what="multiple-choice data", hint=hint, limit=limit):
        where = f"{path}:{n}"
        if not isinstance(r, dict) or not isinstance(r.get("context"), str):
            raise UserError(f"{where} has no string \"context\"; {hint}")
        choices = r.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise UserError(f"{where}: \"choices\" must be a list of at least two non-empty strings")
        label = r.get("label")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise UserError(f"{where}: label {label!r} is not an index into its {len(choices)} choices (0..{len(choices) - 1})")
        records.append(r)
    return records


def multiple_choice(scorer: Scorer, tokenizer, records: list[dict], *, prefix: Sequence[int], delimiter: str = " ") -> dict[str, Any]:
    """acc (argmax log-likelihood) and acc_norm (argmax log-likelihood per byte of the choice) over `records`."""
    requests, spans = [], []
    for r in records:
        spans.append((len(requests), len(r["choices"])))
        requests += [split_encode(tokenizer, r["context"], delimiter + c, prefix) for c in r["choices"]]
    scores = [s for s, _ in scorer.loglikelihoods(requests)]
    hits = hits_norm = 0
    per_record = []
    for r, (start, k) in zip(records, spans):
        ll = np.array(scores[start : start + k])
        per_byte = ll / np.array([len(c.encode("utf-8")) for c in r["choices"]])
        hits += int(np.argmax(ll)) == r["label"]
        hits_norm += int(np.argmax(per_byte)) == r["label"]
        per_record.append(ll.tolist())
    n = len(records)
    return {"task": "multiple_choice", "acc": hits / n, "acc_norm": hits_norm / n, "count": n, "loglikelihoods": per_record}


def read_texts(path: str, limit: int | None = None) -> list[str]:
    """Documents to score: a JSONL file's "text" fields, else the whole (UTF-8) file as one document."""
    p = Path(path)
    if p.suffix in (".jsonl", ".json"):
        texts = []
        for n, r in read_jsonl(path, what="text data", hint='pass JSON Lines of {"text": ...} or a .txt file', limit=limit):
            if not isinstance(r, dict) or not isinstance(r.get("text"), str) or not r["text"]:
                raise UserError(f"{path}:{n} has no non-empty string \"text\" field")
            texts.append(r["text"])
        return texts
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"text file '{path}' does not exist; pass the held-out text with --data") from None
    except UnicodeDecodeError as e:
        raise UserError(f"'{path}' is not UTF-8 text (byte {e.start}); convert it or pass JSONL") from None
    if not text.strip():
        raise UserError(f"'{path}' holds no text to score")
    return [text]


def perplexity(scorer: Scorer, tokenizer, texts: list[str], *, prefix_id: int) -> dict[str, Any]:
    """Held-out loss (nats/token), perplexity and bits per UTF-8 byte of `texts` under the model."""
    docs = [tokenizer.encode(t) for t in texts]
    total = sum(scorer.rolling_loglikelihoods(docs, prefix_id))
    tokens, n_bytes = sum(len(d) for d in docs), sum(len(t.encode("utf-8")) for t in texts)
    loss = -total / tokens
    return {"task": "perplexity", "loss": loss, "perplexity": math.exp(loss), "bits_per_byte": -total / (n_bytes * math.log(2)),
            "tokens": tokens, "bytes": n_bytes, "documents": len(texts)}  # fmt: skip


def data_kind(path: str, flag_perplexity: bool) -> str:
    """"perplexity", "multiple_choice" or "task" (the config's sft / classification eval) for an eval file."""
    if flag_perplexity or Path(path).suffix not in (".jsonl", ".json"):
        return "perplexity"
    first = next(iter(read_jsonl(path, what="eval data", hint="pass a JSONL file with --data", limit=1)))[1]
    if isinstance(first, dict) and "choices" in first:
        return "multiple_choice"
    if isinstance(first, dict) and set(first) <= {"text", "id", "meta"}:
        return "perplexity"
    return "task"


def score_checkpoint(path: str, data: str, *, kind: str, limit: int | None = None, delimiter: str = " ",
                     batch_size: int = 16) -> dict[str, Any]:  # fmt: skip
    """Multiple-choice accuracy or perplexity of the model at `path` (run dir, step dir or export) on `data`."""
    from maxtrain.checkpoint.source import resolve_model
    from maxtrain.generate import load_generator, special_ids

    source = resolve_model(path)
    records = read_choice_records(data, limit) if kind == "multiple_choice" else None
    texts = read_texts(data, limit) if kind == "perplexity" else None
    generator, tokenizer, meta = load_generator(str(source.params_dir.parent))
    if tokenizer is None:
        source.require_tokenizer()
    eos, _, add_bos = special_ids(tokenizer, meta)
    prefix_id = tokenizer.bos_id if add_bos else (eos[0] if eos else tokenizer.bos_id)
    scorer = Scorer.from_generator(generator, batch_size=batch_size)
    if kind == "multiple_choice":
        result = multiple_choice(scorer, tokenizer, records, prefix=[prefix_id], delimiter=delimiter)
    else:
        result = perplexity(scorer, tokenizer, texts, prefix_id=prefix_id)
    result["params"] = str(source.params_dir.parent)
    return result

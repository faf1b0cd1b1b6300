"""`MaxtrainLM`: any maxtrain model on disk as an lm-evaluation-harness model (registered as "maxtrain").

Imports lm_eval at the top: reach it through `maxtrain.harness` (the `maxtrain harness`
command), which says which extra to install when lm_eval is missing.

    lm = MaxtrainLM(checkpoint="runs/demo")     # run dir, checkpoint step dir or export
    lm_eval.simple_evaluate(model=lm, tasks=[...])

loglikelihood and loglikelihood_rolling run on `maxtrain.scoring.Scorer` (batched full
forward passes, lm-eval's tokenization and window conventions); generate_until runs on the
KV-cache `Generator`, greedy unless a request asks to sample, batched per generation setting.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from maxtrain.errors import UserError
from maxtrain.scoring import Scorer, split_encode

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default when a task names none


@register_model("maxtrain")
class MaxtrainLM(LM):
    """lm-eval's LM interface over a maxtrain model: checkpoint is a run dir, a step dir or an export.

    batch_size: rows per forward pass (scoring) and prompts per decode (generation).
    max_length: the longest window scored or generated into (default: the model's max_seq_len).
    """

    def __init__(self, checkpoint: str, batch_size: int | str = 16, max_length: int | str | None = None, **_: Any):
        super().__init__()
        from maxtrain.checkpoint.source import resolve_model
        from maxtrain.generate import load_generator, special_ids

        source = resolve_model(checkpoint)
        self.generator, tokenizer, meta = load_generator(str(source.params_dir.parent))
        self.tokenizer = tokenizer if tokenizer is not None else source.require_tokenizer()
        self.eos_ids, self.pad_id, add_bos = special_ids(self.tokenizer, meta)
        self.prefix_id = self.tokenizer.bos_id if add_bos else (self.eos_ids[0] if self.eos_ids else self.tokenizer.bos_id)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length) if max_length else self.generator.cfg.max_seq_len
        self.scorer = Scorer.from_generator(self.generator, batch_size=self.batch_size, max_len=self.max_length)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is greedy) per request; an empty context is the BOS (or EOS) alone."""
        pairs = [split_encode(self.tokenizer, context, continuation, [self.prefix_id]) for context, continuation in
                 (r.args for r in requests)]  # fmt: skip
        return self.scorer.loglikelihoods(pairs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text | BOS) of each request's whole text, in windows of max_length tokens."""
        docs = [self.tokenizer.encode(r.args[0]) for r in requests]
        return self.scorer.rolling_loglikelihoods(docs, self.prefix_id)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations cut before the first stop string of each request (its gen_kwargs "until")."""
        from maxtrain.generate import Sampling

        groups: dict[str, list[int]] = defaultdict(list)  # one Sampling (one compiled decode) per setting
        for i, r in enumerate(requests):
            groups[repr(sorted(r.args[1].items()))].append(i)
        out = [""] * len(requests)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new = int(kwargs.get("max_gen_toks") or kwargs.get("max_new_tokens") or DEFAULT_MAX_GEN_TOKS)
            if new >= self.max_length:
                raise UserError(f"a task asks for {new} generated tokens but the model holds {self.max_length}; lower max_gen_toks")
            sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0) > 0
            sampling = Sampling(max_new_tokens=new, temperature=float(kwargs["temperature"]) if sample else 0.0,
                                top_p=float(kwargs.get("top_p") or 1.0), seed=int(kwargs.get("seed") or 0))  # fmt: skip
            prompts = [[self.prefix_id, *self.tokenizer.encode(requests[i].args[0])][-(self.max_length - new) :] for i in indices]
            ndev = self.generator.mesh.size  # the cache is split over the batch: a multiple of the device count
            size = -(-min(self.batch_size, len(prompts)) // ndev) * ndev
            for start in range(0, len(prompts), size):
                chunk = prompts[start : start + size]
                padded = chunk + [chunk[0]] * (size - len(chunk))  # one batch shape, one compile
                outs = self.generator.generate(padded, sampling, eos_ids=self.eos_ids, pad_id=self.pad_id)
                for i, ids in zip(indices[start : start + size], outs):
                    text = self.tokenizer.decode([t for t in ids if t not in self.eos_ids])  # as lm-eval's HF model does
                    for stop in until:
                        text = text.split(stop)[0] if stop else text
                    out[i] = text
        return out

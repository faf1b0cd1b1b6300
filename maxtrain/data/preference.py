"""Preference pairs: one record -> one element holding both sequences, so a pair never splits.

Records (TRL's dataset conventions):

    {"prompt": str, "chosen": str, "rejected": str}            the prompt is a user turn, the
                                                                completions assistant replies
    {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
    {"chosen": [messages], "rejected": [messages]}              the shared prompt is implicit:
                                                                every message before the last
    optional: "margin" (number; the reward objective subtracts it), "ref_chosen_logps" and
    "ref_rejected_logps" (precomputed reference log-probs, TRL's column names).

Both sequences are rendered with the run's chat template (data/formats.py) as prompt + the
completion's assistant turn; only the last assistant turn (content, end-of-turn text, EOS)
is weighted, so the shared prompt carries no loss. The element is

    tokens    prompt+chosen then prompt+rejected, end to end
    weights   per-target weights (weights[j] weighs predicting token j+1); 0 on each
              sequence's last token (its target would be the other sequence's first)
    segments  1 on prompt+chosen, 2 on prompt+rejected: the lane writer numbers them on from
              the row's segment count, so chosen sequences have odd segment ids and rejected
              ones the even id after, and each restarts its positions at 0
    sequence_fields  {"sequence_margin": [margin, 0], "reference_logps": [ref_c, ref_r]}:
              written on each sequence's last token (0 elsewhere), so a segment sum gives the
              per-sequence value
"""

from __future__ import annotations

from typing import Any

import numpy as np

from maxtrain.data.formats import ROLES, render_chat, template_for

# Batch fields the preference format adds (float32, 0 on padding); see lanes.write_piece.
SEQUENCE_FIELDS = ("sequence_margin", "reference_logps")


def as_messages(value: Any, role: str, what: str) -> list[dict] | str:
    """`value` as chat messages (a string becomes one `role` turn), or why it cannot be."""
    if isinstance(value, str):
        if not value.strip():
            return f"'{what}' is empty"
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        return f"'{what}' must be a string or a non-empty list of {{role, content}}"
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f"{what}[{i}] needs role in {ROLES} and a string content"
    return value


def pair_messages(record: Any) -> tuple[list[dict], dict, dict, float, tuple[float, float]] | str:
    """(shared prompt messages, chosen reply, rejected reply, margin, reference log-probs), or why not."""
    if not isinstance(record, dict):
        return f"record is {type(record).__name__}, not a JSON object"
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing:
        return f"missing field {missing[0]!r}; a preference record needs chosen and rejected (and prompt)"
    if "prompt" in record:
        prompt = as_messages(record["prompt"], "user", "prompt")
        if isinstance(prompt, str):
            return prompt
        chosen, rejected = (as_messages(record[k], "assistant", k) for k in ("chosen", "rejected"))
    else:
        chosen, rejected = (as_messages(record[k], "assistant", k) for k in ("chosen", "rejected"))
        for c in (chosen, rejected):
            if isinstance(c, str):
                return c
        if chosen[:-1] != rejected[:-1]:
            return "chosen and rejected must share every message but the last (the implicit prompt)"
        prompt = chosen[:-1]
        chosen, rejected = chosen[-1:], rejected[-1:]
    for name, c in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(c, str):
            return c
        if len(c) != 1 or c[0]["role"] != "assistant":
            return f"'{name}' must be one assistant reply"
        if not c[0]["content"].strip():
            return f"'{name}' is empty"
    if chosen[0]["content"] == rejected[0]["content"]:
        return "chosen and rejected are identical"
    margin = record.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        return f"margin {margin!r} is not a number"
    refs = (record.get("ref_chosen_logps", 0.0), record.get("ref_rejected_logps", 0.0))
    if any(isinstance(r, bool) or not isinstance(r, (int, float)) for r in refs):
        return "ref_chosen_logps and ref_rejected_logps must be numbers"
    return prompt, chosen[0], rejected[0], float(margin), (float(refs[0]), float(refs[1]))


class PreferenceEncoder:
    """Picklable map from a preference record to a two-sequence element, or {"bad": (where, reason)}."""

    def __init__(self, fmt, tok, family: str | None = None):
        self._tok = tok
        self._template = template_for(fmt.template, family, tok)

    @classmethod
    def with_template(cls, template, tok) -> "PreferenceEncoder":
        """An encoder with an already-resolved chat template (data.formats.template_for)."""
        enc = cls.__new__(cls)
        enc._tok, enc._template = tok, template
        return enc

    def sequence(self, prompt: list[dict], reply: dict) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, per-target weights) of prompt + reply rendered with the template; only the reply is weighted."""
        return self._sequence(prompt, reply)

    def _sequence(self, prompt: list[dict], reply: dict) -> tuple[np.ndarray, np.ndarray]:
        ids, trained = render_chat(prompt + [reply], self._tok, self._template)
        prompt_ids, _ = render_chat(prompt, self._tok, self._template, add_generation_prompt=True)
        weights = np.zeros(len(ids), np.float32)
        # Only the final reply learns (earlier assistant turns are shared prompt): weights[j]
        # weighs predicting token j+1, so the reply's first token is weighed at prompt_len - 1.
        p = len(prompt_ids)
        weights[p - 1 : len(ids) - 1] = trained[p:]
        return ids, weights

    def __call__(self, record: Any, where: str) -> dict:
        parsed = pair_messages(record)
        if isinstance(parsed, str):
            return {"bad": (where, parsed)}
        prompt, chosen, rejected, margin, refs = parsed
        (c_ids, c_w), (r_ids, r_w) = self._sequence(prompt, chosen), self._sequence(prompt, rejected)
        if np.array_equal(c_ids, r_ids):
            return {"bad": (where, "chosen and rejected tokenize identically")}
        return pair_element((c_ids, c_w), (r_ids, r_w), margin=margin, reference_logps=refs)


def pair_element(chosen, rejected, *, margin: float = 0.0, reference_logps=(0.0, 0.0)) -> dict:
    """The pipeline element of one pair: chosen then rejected, segments 1 and 2 of one row.

    chosen, rejected: (token ids, per-target weights) of each whole sequence (prompt + reply).
    """
    (c_ids, c_w), (r_ids, r_w) = chosen, rejected
    return {
        "tokens": np.concatenate([c_ids, r_ids]).astype(np.int32),
        "weights": np.concatenate([c_w, r_w]).astype(np.float32),
        "segments": np.concatenate([np.full(len(c_ids), 1, np.int32), np.full(len(r_ids), 2, np.int32)]),
        "sequence_fields": {"sequence_margin": np.asarray([margin, 0.0], np.float32),
                            "reference_logps": np.asarray(reference_logps, np.float32)},
    }


def pair_element_from_ids(prompt: list[int], chosen: list[int], rejected: list[int], **kw) -> dict:
    """pair_element of token-id lists: each reply (not the shared prompt) weighted (tests, benchmarks)."""
    def sequence(reply):
        ids = np.asarray(prompt + reply, np.int32)
        w = np.zeros(len(ids), np.float32)
        w[len(prompt) - 1 : -1] = 1.0  # weights[j] weighs predicting token j+1: the reply's tokens
        return ids, w

    return pair_element(sequence(chosen), sequence(rejected), **kw)


def cut_sequences(element: dict, seq_len: int) -> dict | None:
    """A multi-sequence element shortened to seq_len, or None if it cannot be.

    Policy: the shared prompt loses tokens from the left (after BOS) in every sequence alike,
    as long as each keeps at least the token that predicts its first reply token; if that is
    not enough, every sequence's reply is cut from the right to one common length. A pair
    whose replies would keep no trained target is refused (a bad record).
    """
    tokens, weights, segs = element["tokens"], element["weights"], element["segments"]
    ids = np.unique(segs)
    if len(tokens) <= seq_len:
        return element
    spans = [np.flatnonzero(segs == s) for s in ids]
    k = len(spans)
    firsts = []
    for idx in spans:
        trained = np.flatnonzero(weights[idx] > 0)
        firsts.append(int(trained[0]) if len(trained) else len(idx) - 1)
    removable = min(f - 1 for f in firsts)  # prompt tokens after BOS that every sequence can lose
    cut = min(removable, max(0, -(-(len(tokens) - seq_len) // k)))
    kept = [np.r_[idx[0], idx[1 + cut :]] for idx in spans]
    if sum(len(x) for x in kept) > seq_len:  # replies from the right, to one common length
        lengths = [len(x) for x in kept]
        cap = max(lengths)
        while cap > 0 and sum(min(n, cap) for n in lengths) > seq_len:
            cap -= 1
        kept = [x[:cap] for x in kept]
        if any(len(x) < f - cut + 2 for x, f in zip(kept, firsts)):
            return None  # a reply would keep no target at all
    keep = np.concatenate(kept)
    out = dict(element, tokens=tokens[keep], segments=segs[keep], weights=weights[keep].copy())
    ends = np.cumsum([len(x) for x in kept]) - 1
    out["weights"][ends] = 0.0  # a sequence's last token predicts nothing
    return out

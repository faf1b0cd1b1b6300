"""`maxtrain fill-mask`: the masked LM's top-k fills for each mask in a text.

    maxtrain fill-mask --checkpoint runs/mlm-demo --text "Return a <mask> of the keys." [--top-k 5]

The checkpoint is any model source (run dir, checkpoint step or export, e.g. a converted
BertForMaskedLM); the mask is written `<mask>` or `[MASK]`, whichever the tokenizer has.
"""

from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp
import numpy as np

from maxtrain.errors import UserError

_MASK = re.compile(r"<mask>|\[MASK\]")


def encode_with_masks(tok, text: str) -> np.ndarray:
    """[BOS/CLS] + the text's ids with each mask marker as the mask id + [EOS/SEP]."""
    if getattr(tok, "mask_id", None) is None:
        raise UserError("the model's tokenizer has no mask token (<mask> or [MASK]); fill-mask needs a masked-LM tokenizer")
    parts = _MASK.split(text)
    if len(parts) < 2:
        raise UserError(f"no mask in {text!r}; write <mask> (or [MASK]) where a token should be filled in")
    ids = [tok.bos_id]
    for i, part in enumerate(parts):
        if i:
            ids.append(tok.mask_id)
        if i < len(parts) - 1 and part.endswith(" "):
            # The space before a mask belongs to the masked word, as in "a<mask>" = "a" + " list":
            # word pieces carry their leading space (RoBERTa's <mask> strips it the same way).
            part = part[:-1]
        ids += tok.encode(part) if part else []
    return np.asarray(ids + [tok.eos_id], np.int32)


def fill_mask(model, params, tok, texts: list[str], *, top_k: int = 5) -> list[list[list[tuple[str, float]]]]:
    """For each text, for each mask in it: the top_k (token text, probability), most likely first."""
    from maxtrain.model.transformer import Transformer

    if not model.cfg.mlm_head:
        raise UserError("this model has no masked-LM head (model.mlm_head); fill-mask needs a masked LM such as a BERT")

    @jax.jit
    def probs(params, tokens_BxS, segments_BxS):
        hidden_BxSxD = model.apply({"params": params}, tokens_BxS, None, segments_BxS, return_hidden=True)
        logits_BxSxV = model.apply({"params": params}, hidden_BxSxD, method=Transformer.mlm_logits)
        return jax.nn.softmax(logits_BxSxV.astype(jnp.float32), axis=-1)

    out = []
    for text in texts:
        ids = encode_with_masks(tok, text)
        if len(ids) > model.cfg.max_seq_len:
            raise UserError(f"the text is {len(ids)} tokens, longer than the model's {model.cfg.max_seq_len}; shorten it")
        p_SxV = np.asarray(probs(params, ids[None], np.ones((1, len(ids)), np.int32))[0])
        fills = []
        for pos in np.flatnonzero(ids == tok.mask_id):
            best = np.argsort(-p_SxV[pos], kind="stable")[:top_k]
            fills.append([(tok.decode([int(i)]), float(p_SxV[pos, i])) for i in best])
        out.append(fills)
    return out


def _cmd_fill_mask(ns: argparse.Namespace) -> int:
    from maxtrain.generate import load_generator
    from maxtrain.model.transformer import Transformer

    generator, tok, _ = load_generator(ns.checkpoint)
    if tok is None:
        raise UserError(f"'{ns.checkpoint}' has no tokenizer file; fill-mask needs the model's tokenizer")
    model = Transformer(generator.cfg, dtype=generator.dtype)
    with jax.set_mesh(generator.mesh):
        results = fill_mask(model, generator.params, tok, ns.text, top_k=ns.top_k)
    for text, fills in zip(ns.text, results):
        print(text)
        for m, candidates in enumerate(fills):
            shown = "  ".join(f"{t!r} {p:.3f}" for t, p in candidates)
            print(f"  mask {m + 1}: {shown}")
    return 0


def register_commands(sub) -> None:
    """Add `maxtrain fill-mask` to the CLI."""
    p = sub.add_parser("fill-mask", help="top-k fills of <mask> / [MASK] in a text, from a masked LM")
    p.add_argument("--checkpoint", required=True, help="a run dir, checkpoint step dir or export of a masked LM")
    p.add_argument("--text", action="append", required=True, help="text with <mask> or [MASK]; repeat for several")
    p.add_argument("--top-k", type=int, default=5)
    p.set_defaults(func=_cmd_fill_mask)

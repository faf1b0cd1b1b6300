"""`maxtrain chat`: talk to an instruction-tuned model turn by turn, with its chat template.

    maxtrain chat --checkpoint runs/tasks-sft [--system "..."] [--max-new-tokens 128] [--temperature 0.7]

Each line read from standard input is a user turn; the reply is generated from the whole
conversation so far (rendered with the template the run was trained with, else the
tokenizer's own jinja template, else the model family's) and printed. An empty line or EOF ends it.
"""

from __future__ import annotations

import argparse
import sys

from maxtrain.errors import UserError


def chat_template_of(meta: dict, tok, override: str | None):
    """The template a run was finetuned with (data.format.template), or `override`, or auto."""
    from maxtrain.data.formats import template_for

    config = meta.get("config") or {}
    fmt = ((config.get("data") or {}).get("format")) or {}
    name = override or (fmt.get("template") if fmt.get("type") == "sft" else None) or "auto"
    family = (config.get("model") or {}).get("family") or (meta.get("model") or {}).get("family")
    return template_for(name, family, tok)


def reply(generator, tok, meta: dict, template, messages: list[dict], sampling) -> str:
    """The assistant's next turn for `messages` (text, end-of-turn tokens removed)."""
    from maxtrain.data.formats import render_chat
    from maxtrain.generate import continuation, special_ids

    eos, pad, _ = special_ids(tok, meta)
    ids, _ = render_chat(messages, tok, template, add_generation_prompt=True)
    new = generator.generate([ids.tolist()], sampling, eos_ids=eos, pad_id=pad)[0]
    return continuation(tok, ids.tolist(), [t for t in new if t not in eos]).strip()


def _cmd_chat(ns: argparse.Namespace) -> int:
    from maxtrain.checkpoint.source import resolve_model
    from maxtrain.generate import Sampling, load_generator

    sampling = Sampling(ns.max_new_tokens, ns.temperature, ns.top_k, ns.top_p, ns.seed)
    sampling.check()
    generator, tok, meta = load_generator(ns.checkpoint)
    if tok is None:
        resolve_model(ns.checkpoint).require_tokenizer()
    if not generator.cfg.causal:
        raise UserError("this model is an encoder (model.causal: false) and cannot generate; use `maxtrain fill-mask`")
    template = chat_template_of(meta, tok, ns.template)
    messages = [{"role": "system", "content": ns.system}] if ns.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        messages.append({"role": "user", "content": line.rstrip("\n")})
        answer = reply(generator, tok, meta, template, messages, sampling)
        messages.append({"role": "assistant", "content": answer})
        print(answer, flush=True)


def register_commands(sub) -> None:
    """Add `maxtrain chat` to the CLI."""
    p = sub.add_parser("chat", help="talk to an SFT'd model turn by turn (user turns from stdin)")
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoint step dir or export")
    p.add_argument("--system", default=None, help="a system message first")
    p.add_argument("--template", default=None, help="chat template: model, auto or a built-in name (default: the run's)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_chat)

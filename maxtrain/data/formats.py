"""Data formats: how one record becomes a tokenized document for the packer or the row batcher.

    text            a string -> [BOS] + ids + [EOS], every target weighted (pretraining)
    sft             {instruction, input, output} (Alpaca) or {messages: [{role, content}]} (chat)
                    -> the chat template's tokens with weights 1 only on assistant turns
                    (content, end-of-turn text and the EOS after each response)
    classification  {text, label} -> [BOS] + ids, and an integer label

Weights are aligned with targets: weights[j] is the loss weight of predicting token j+1, so
the packer can copy them next to `targets` and a document split across rows keeps them right.
Malformed records come back as {"bad": (where, reason)} like any other bad record.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from maxtrain.data import config as C
from maxtrain.errors import UserError


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """Text around each turn: (prefix, suffix) per role; `{role}` in a prefix is the role name."""

    name: str
    system: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str]

    def turn(self, role: str) -> tuple[str, str]:
        prefix, suffix = getattr(self, role)
        return prefix.replace("{role}", role), suffix

    def encode(self, messages: list[dict], tok, *, add_generation_prompt: bool = False):
        """(tokens, trained): [BOS] + turns; trained marks assistant content, suffix and the EOS after it.

        Each piece is tokenized on its own, so the boundary between prompt and response never
        merges into one token and masking stays exact.
        """
        ids, trained = [tok.bos_id], [False]
        for m in messages:
            prefix, suffix = self.turn(m["role"])
            is_reply = m["role"] == "assistant"
            for text, weight in ((prefix, False), (m["content"], is_reply), (suffix, is_reply)):
                piece = tok.encode(text) if text else []
                ids += piece
                trained += [weight] * len(piece)
            if is_reply:
                ids.append(tok.eos_id)
                trained.append(True)
        if add_generation_prompt:
            prefix = self.turn("assistant")[0]
            ids += tok.encode(prefix) if prefix else []
            trained += [False] * (len(ids) - len(trained))
        return np.asarray(ids, np.int32), np.asarray(trained, bool)


@dataclasses.dataclass(frozen=True)
class JinjaChatTemplate:
    """A model's own chat template: the jinja `chat_template` of its tokenizer_config.json.

    Rendered as transformers renders it (a sandboxed jinja2 environment with trim_blocks and
    lstrip_blocks; messages, add_generation_prompt, bos_token, eos_token, raise_exception).
    Loss masks come from rendering growing prefixes of the conversation: an assistant turn's
    trained text is what its message adds after the generation prompt of the turns before
    it (its content and end-of-turn), so any template that renders a conversation as the
    concatenation of its turns masks exactly.
    """

    source: str
    bos_token: str = ""
    eos_token: str = ""
    name: str = "model"

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
        """The template's text for `messages`."""
        from jinja2.exceptions import TemplateError

        try:
            return _compiled(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as e:
            raise UserError(f"the model's chat template failed on a conversation ({e}); fix the record or set data.format.template") from None

    def encode(self, messages: list[dict], tok, *, add_generation_prompt: bool = False):
        """(tokens, trained) of the rendered conversation; trained marks each assistant turn's text."""
        pieces: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                prompt = self.render(messages[:i], add_generation_prompt=True)
                pieces.append((_after(prompt, done), False))
                done = prompt
            text = self.render(messages[: i + 1])
            pieces.append((_after(text, done), m["role"] == "assistant"))
            done = text
        if add_generation_prompt:
            pieces.append((_after(self.render(messages, add_generation_prompt=True), done), False))
        ids: list[int] = []
        trained: list[bool] = []
        for text, weight in pieces:
            piece = tok.encode(text) if text else []
            ids += piece
            trained += [weight] * len(piece)
        return np.asarray(ids, np.int32), np.asarray(trained, bool)


def _after(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise UserError("the model's chat template does not render a conversation as the concatenation of its turns, "
                        "so reply masks cannot be found; set data.format.template to a built-in template")
    return text[len(prefix) :]


@functools.lru_cache(maxsize=8)
def _compiled(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise UserError(f"the model's chat template is not valid jinja ({e}); fix tokenizer_config.json or set data.format.template") from None


_HEADER = ("<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>")
_CHATML = ("<|im_start|>{role}\n", "<|im_end|>\n")
TEMPLATES = {
    # Compact and tokenizer-agnostic: the default for models trained here (the demo).
    "plain": ChatTemplate("plain", ("System: ", "\n"), ("User: ", "\n"), ("Assistant: ", "\n")),
    "llama3": ChatTemplate("llama3", _HEADER, _HEADER, _HEADER),
    "chatml": ChatTemplate("chatml", _CHATML, _CHATML, _CHATML),
    "mistral": ChatTemplate("mistral", ("", "\n\n"), ("[INST] ", " [/INST]"), ("", "")),
    "alpaca": ChatTemplate("alpaca", ("", "\n\n"), ("### Instruction:\n", "\n\n"), ("### Response:\n", "")),
}
# The template each model family was released with; `template: auto` picks from here.
FAMILY_TEMPLATES = {"llama": "llama3", "qwen2": "chatml", "qwen3": "chatml", "mistral": "mistral", "gpt2": "plain"}
ROLES = ("system", "user", "assistant")


def template_for(name: str, family: str | None = None, tok=None) -> ChatTemplate | JinjaChatTemplate:
    """The chat template `name`: "model" is the tokenizer's own (tokenizer_config.json's
    chat_template), "auto" that one when the tokenizer has it, else the model family's
    built-in template (plain if unknown); other names are built-in templates."""
    own = getattr(tok, "chat_template", None)
    if name == "model" or (name == "auto" and own):
        if not own:
            raise UserError("data.format.template is 'model' but the tokenizer has no chat_template (tokenizer_config.json); "
                            f"use a built-in one: {', '.join(TEMPLATES)}")
        return JinjaChatTemplate(own, bos_token=_token_text(tok, tok.bos_id), eos_token=_token_text(tok, tok.eos_id))
    if name == "auto":
        name = FAMILY_TEMPLATES.get(family or "", "plain")
    if name not in TEMPLATES:
        raise UserError(f"unknown chat template {name!r}; use one of: auto, model, {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def _token_text(tok, i: int) -> str:
    piece = getattr(tok, "id_to_piece", None)
    return piece(i) if piece is not None else ""


def record_messages(record: Any) -> list[dict] | str:
    """Chat messages of an Alpaca or chat record, or the reason it is neither."""
    if not isinstance(record, dict):
        return f"record is {type(record).__name__}, not a JSON object"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list of {role, content}"
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return f"messages[{i}] needs role in {ROLES} and a string content"
        if not any(m["role"] == "assistant" for m in messages):
            return "no assistant turn to learn from"
        return messages
    if "instruction" in record and "output" in record:
        fields = (record["instruction"], record.get("input") or "", record["output"])
        if not all(isinstance(f, str) for f in fields):
            return "instruction, input and output must be strings"
        prompt = fields[0] + (f"\n\n{fields[1]}" if fields[1] else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": fields[2]}]
    return "expected {instruction, input, output} (Alpaca) or {messages: [...]} (chat)"


def render_chat(messages: list[dict], tok, template, *, add_generation_prompt: bool = False):
    """(tokens, trained) int32/bool arrays of a conversation; trained marks what the model learns (replies)."""
    return template.encode(messages, tok, add_generation_prompt=add_generation_prompt)


def prompt_and_reference(record: Any, tok, template: ChatTemplate) -> tuple[np.ndarray, str] | str:
    """(prompt ids ending in the assistant prefix, reference reply) for evaluation, or why not."""
    messages = record_messages(record)
    if isinstance(messages, str):
        return messages
    if messages[-1]["role"] != "assistant":
        return "the last message must be the assistant reply to compare with"
    ids, _ = render_chat(messages[:-1], tok, template, add_generation_prompt=True)
    return ids, messages[-1]["content"]


class RecordEncoder:
    """Picklable map from a source record to {"tokens", ["weights"|"label"]} or {"bad": ...}."""

    def __init__(self, fmt, tok, family: str | None = None):
        self._fmt, self._tok = fmt, tok
        own = getattr(fmt, "record_encoder", None)
        self._own = own(tok, family) if own is not None else None  # a format with its own encoder (preference)
        self._template = template_for(fmt.template, family, tok) if isinstance(fmt, C.SftFormat) else None
        if isinstance(fmt, C.ClassificationFormat) and fmt.labels:
            self._label_ids = {name: i for i, name in enumerate(fmt.labels)}
        else:
            self._label_ids = None

    def __call__(self, record: Any, where: str) -> dict:
        fmt, tok = self._fmt, self._tok
        if self._own is not None:
            return self._own(record, where)
        if isinstance(fmt, C.SftFormat):
            messages = record_messages(record)
            if isinstance(messages, str):
                return {"bad": (where, messages)}
            ids, trained = render_chat(messages, tok, self._template)
            weights = np.zeros(len(ids), np.float32)
            weights[:-1] = trained[1:]  # weight of predicting token j+1
            return {"tokens": ids, "weights": weights}
        if isinstance(fmt, C.ClassificationFormat):
            return self._classification(record, where)
        ids = record if isinstance(record, np.ndarray) else tok.encode(record)
        tokens = np.empty(len(ids) + 2, np.int32)
        tokens[0], tokens[1:-1], tokens[-1] = tok.bos_id, ids, tok.eos_id
        return {"tokens": tokens}

    def _classification(self, record: Any, where: str) -> dict:
        fmt, tok = self._fmt, self._tok
        if not isinstance(record, dict) or not isinstance(record.get(fmt.text_field), str):
            return {"bad": (where, f"needs a string field {fmt.text_field!r}")}
        label = record.get(fmt.label_field)
        if self._label_ids is not None:
            if label not in self._label_ids:
                return {"bad": (where, f"label {label!r} is not one of data.format.labels")}
            label = self._label_ids[label]
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < fmt.num_labels:
            return {"bad": (where, f"label {label!r} is not an integer in [0, {fmt.num_labels})")}
        ids = [tok.bos_id] + tok.encode(record[fmt.text_field])
        return {"tokens": np.asarray(ids, np.int32), "label": np.int32(label)}


def record_text(record: Any) -> str:
    """All string values of a structured record, one per line (text for tokenizer training)."""
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        return "\n".join(record_text(v) for v in record.values() if isinstance(v, (str, list, dict)))
    if isinstance(record, list):
        return "\n".join(record_text(v) for v in record)
    return ""

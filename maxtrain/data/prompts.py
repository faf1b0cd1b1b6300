"""The `prompts` format: a record becomes the chat-templated prompt a policy continues (RL).

A record is {prompt: str | [messages], ...} (TRL's convention) or Alpaca {instruction, input,
output}; the prompt is rendered up to and including the assistant turn's opening text, so
sampling continues exactly where an SFT model learned to answer. The element keeps the
record itself: reward functions read its other fields (an answer, test cases).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from maxtrain.data.formats import ROLES, render_chat, template_for


def prompt_messages(record: Any) -> list[dict] | str:
    """The prompt's chat messages (ending with a user turn), or why the record has none."""
    if not isinstance(record, dict):
        return f"record is {type(record).__name__}, not a JSON object"
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}] if prompt.strip() else "'prompt' is empty"
        if not isinstance(prompt, list) or not prompt:
            return "'prompt' must be a string or a non-empty list of {role, content}"
        for i, m in enumerate(prompt):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return f"prompt[{i}] needs role in {ROLES} and a string content"
        if prompt[-1]["role"] == "assistant":
            return "the prompt's last message is the assistant's; the policy writes that turn"
        return prompt
    if isinstance(record.get("instruction"), str) and isinstance(record.get("input", ""), str):
        text = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return [{"role": "user", "content": text}] if text.strip() else "'instruction' is empty"
    return "expected a 'prompt' (string or chat messages) or Alpaca 'instruction' field"


def prompt_text(record: dict) -> Any:
    """The prompt as reward functions receive it: the record's `prompt` as written, or the Alpaca instruction text."""
    if "prompt" in record:
        return record["prompt"]
    return record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")


class PromptEncoder:
    """Picklable map from a prompts record to {"tokens": prompt ids, "record": record} or {"bad": (where, why)}."""

    def __init__(self, fmt, tok, family: str | None = None):
        self._tok = tok
        self._template = template_for(fmt.template, family, tok)

    def __call__(self, record: Any, where: str) -> dict:
        messages = prompt_messages(record)
        if isinstance(messages, str):
            return {"bad": (where, messages)}
        ids, _ = render_chat(messages, self._tok, self._template, add_generation_prompt=True)
        return {"tokens": np.asarray(ids, np.int32), "record": record}

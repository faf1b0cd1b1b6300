"""The table of supported Hugging Face families: config.json `model_type` (import) or
ModelConfig.family (export) -> Family. Adding a family adds a row here.
"""

from __future__ import annotations

from maxtrain.convert.bert import BERT, ROBERTA
from maxtrain.convert.core import Family
from maxtrain.convert.gpt2 import GPT2
from maxtrain.convert.llama import LLAMA, MISTRAL, QWEN2, QWEN3
from maxtrain.errors import UserError
from maxtrain.model.config import ModelConfig

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3, GPT2, BERT, ROBERTA)}
PENDING: dict[str, str] = {}  # model_type -> why it does not convert yet (named in the error)


def family_for_hf(hf_config: dict) -> Family:
    """The family of a config.json; a UserError naming the architecture when unsupported."""
    model_type = hf_config.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    arch = ", ".join(hf_config.get("architectures") or []) or "unknown architecture"
    why = PENDING.get(model_type, "not supported")
    raise UserError(
        f"config.json model_type {model_type!r} ({arch}) is {why}; supported: {', '.join(sorted(FAMILIES))}"
    )


def family_for_model(cfg: ModelConfig) -> Family:
    """The HF family a maxtrain model exports as, chosen by model.family."""
    if cfg.family in FAMILIES:
        return FAMILIES[cfg.family]
    raise UserError(
        f"model.family {cfg.family!r} has no Hugging Face export; set model.family to one of {', '.join(sorted(FAMILIES))}"
    )

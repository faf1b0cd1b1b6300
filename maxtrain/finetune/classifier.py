"""A sequence-classification head as a finetuning method (the head itself is model/heads.py:ClassifierHead).

Its leaves (`classifier/...`) are new at `init_from` (the zero-initialised output layer
starts at uniform class probabilities); it does not make the run parameter-efficient (the
backbone trains too unless `finetune.train` says otherwise); HF causal-LM exports leave it out.
"""

from __future__ import annotations

from maxtrain.finetune.registry import Method
from maxtrain.model.config import ClassifierConfig

METHOD = Method(
    name="classifier", config=ClassifierConfig, alias="head", leaves=r"classifier/.*", efficient=False, export="drop",
    no_export="a classification head has no PEFT format; export without --peft-adapter (the head is left out)",
)

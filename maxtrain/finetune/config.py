"""The run's `finetune:` section: which parameters train, LoRA, a classification head, forgetting eval."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from maxtrain.data.config import SourceConfig
from maxtrain.finetune.adapter import AdapterConfig
from maxtrain.finetune.ia3 import IA3Config
from maxtrain.finetune.prefix import PrefixTuningConfig
from maxtrain.finetune.prompt import PromptTuningConfig
from maxtrain.model.config import ClassifierConfig, LoraConfig


class FinetuneConfig(BaseModel):
    """Trainable set and finetuning additions to the model.

    train: regexes (full match) over parameter paths such as `layers/attn/q/kernel`, or the
      aliases all, embeddings, norms, lm_head and each method's (lora, head, adapters, ia3,
      prompt, prefix). None (default): the leaves of the methods set when one of them is
      parameter-efficient (plus the head), else all (a head with its backbone; [head] alone
      is a linear probe).
    freeze: regexes removed from the trainable set (e.g. [embeddings, lm_head/kernel]).
    freeze_layers: the first k transformer layers stay frozen (their slice of each stacked
      layer parameter gets zero gradient and zero update).
    lora / classifier / adapter / ia3 / prompt_tuning / prefix_tuning: finetuning methods
      (maxtrain/finetune/registry.py) added to the model; their parameters are new (not in a
      pretrained checkpoint) and start where the model equals its base.
    forgetting: pretraining-text sources whose held-out split is scored with the causal-LM
      loss before and after finetuning (same tokenizer as the run).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    train: tuple[str, ...] | None = None
    freeze: tuple[str, ...] = ()
    freeze_layers: int = Field(0, ge=0)
    lora: LoraConfig | None = None
    classifier: ClassifierConfig | None = None
    adapter: AdapterConfig | None = None
    ia3: IA3Config | None = None
    prompt_tuning: PromptTuningConfig | None = None
    prefix_tuning: PrefixTuningConfig | None = None
    forgetting: list[SourceConfig] = Field(default_factory=list)

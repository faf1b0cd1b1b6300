"""Typed, frozen configuration of the data pipeline: sources, tokenizer, loader knobs.

The run config's `data:` section is validated as `DataConfig(**section)`. Unknown keys are
rejected (extra="forbid") so a typo never silently falls back to a default.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

Paths = Union[str, list[str]]


class _Source(BaseModel):
    """Fields shared by every source: its mixture weight (of documents or tokens: data.mixture_unit)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    weight: float = Field(1.0, gt=0)


class EmbeddedSource(_Source):
    """English text shipped with Python itself: pydoc topics and stdlib docstrings."""

    type: Literal["embedded"] = "embedded"


class TextSource(_Source):
    """Plain UTF-8 text files; `documents` says whether a file or a paragraph is a document."""

    type: Literal["text"] = "text"
    records: ClassVar[bool] = False  # reads plain text from any source (not JSON records)
    path: Paths
    documents: Literal["per_file", "blank_lines"] = "per_file"


class JsonlSource(_Source):
    """JSON Lines files, one document per non-blank line, its text in `field`."""

    type: Literal["jsonl"] = "jsonl"
    path: Paths
    field: str = "text"


class ParquetSource(_Source):
    """Parquet files, one document per row, its text in `column` (needs pyarrow)."""

    type: Literal["parquet"] = "parquet"
    path: Paths
    column: str = "text"


class ArrayRecordSource(_Source):
    """ArrayRecord files: UTF-8 text records, or token ids written by `maxtrain data prepare`."""

    type: Literal["array_record"] = "array_record"
    path: Paths


class HFSource(_Source):
    """A Hugging Face `datasets` dataset read in streaming mode (needs `datasets`)."""

    type: Literal["hf"] = "hf"
    name: str
    subset: str | None = None
    data_files: Paths | None = None
    split: str = "train"
    field: str = "text"
    shuffle_buffer: int = Field(10_000, ge=1)


SourceConfig = Annotated[
    Union[EmbeddedSource, TextSource, JsonlSource, ParquetSource, ArrayRecordSource, HFSource],
    Field(discriminator="type"),
]


class _Format(BaseModel):
    """What every data format declares: whether it reads JSON records, how it batches, and
    what it does to each tokenized document (see maxtrain/data/formats.py, lanes.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    records: ClassVar[bool] = False  # True: reads JSONL records; False: plain text from any source
    # True: train batches come from a rollout source sampling the policy (maxtrain/rl/rollouts.py),
    # not the packer, so there are no token targets to count and no held-out loss.
    rollouts: ClassVar[bool] = False

    def batching(self) -> tuple[str, bool]:
        """(how a lane fills a row: pack, whole or single; whether batches carry labels)."""
        return "pack", False

    def document_transform(self, tok, seed: int):
        """None, or (element, global document index) -> element, applied in the pipeline."""
        return None

    def batch_fields(self) -> tuple[str, ...]:
        """Extra per-token float32 fields every batch of this format carries (0 on padding)."""
        return ()

    def record_encoder(self, tok, family: str | None = None):
        """None (formats.RecordEncoder's own encoding), or a picklable (record, where) -> element."""
        return None


class TextFormat(_Format):
    """Plain documents: [BOS] + text + [EOS], every token a target (pretraining)."""

    type: Literal["text"] = "text"


class SftFormat(_Format):
    """Instruction tuning from JSONL records: Alpaca {instruction, input, output} or chat {messages}.

    template: model (the tokenizer's own jinja chat_template from its tokenizer_config.json), a
      built-in template name (plain, llama3, chatml, mistral, alpaca) or auto (the tokenizer's
      own when it has one, else model.family's; see maxtrain/data/formats.py). Loss weights are 1 on assistant replies
      (with their end-of-turn text and EOS) and 0 on everything else.
    rows: whole keeps every record inside one row (records are packed while they fit; the
      rest of a row is padding); split lets a record continue in the next row, as text does
      (its reply may then be learned without its prompt).
    too_long: a record longer than a row (rows: whole) loses prompt tokens from the left,
      after BOS, until it fits (truncate_prompt), and one whose reply alone does not fit is a
      bad record; refuse makes every too-long record a bad record. Both are counted in the log.
    """

    type: Literal["sft"] = "sft"
    records: ClassVar[bool] = True
    template: str = "auto"
    rows: Literal["whole", "split"] = "whole"
    too_long: Literal["truncate_prompt", "refuse"] = "truncate_prompt"

    def batching(self) -> tuple[str, bool]:
        return ("whole" if self.rows == "whole" else "pack"), False


class ClassificationFormat(_Format):
    """Sequence classification from JSONL {text, label}; one example per row, with `labels` [B].

    labels: label names in id order when the records hold names; None: records hold ids.
    """

    type: Literal["classification"] = "classification"
    records: ClassVar[bool] = True
    num_labels: int = Field(2, gt=1)
    labels: list[str] | None = None
    text_field: str = "text"
    label_field: str = "label"

    def batching(self) -> tuple[str, bool]:
        return "single", True


class MlmFormat(_Format):
    """Masked-LM pretraining text: [BOS/CLS] + ids + [EOS/SEP] per document, masked in the pipeline.

    mask_prob of the non-special tokens are selected (at least one per document); of those,
    mask_token_prob become the mask token, random_token_prob a random token and the rest
    stay. Targets are the original ids at the same positions, weighted 1 on selected ones
    only. The draw is a function of the seed and the document's place in the global
    sequence: a document is masked afresh every epoch (dynamic masking), and a resumed run
    masks exactly as an uninterrupted one. whole_word selects whole words (a token whose
    piece does not start a word follows the one before). rows: pack lays documents end to
    end (a long one continues in the next row); single puts one document per row, cut to it.
    """

    type: Literal["mlm"] = "mlm"
    mask_prob: float = Field(0.15, gt=0.0, lt=1.0)
    mask_token_prob: float = Field(0.8, ge=0.0, le=1.0)
    random_token_prob: float = Field(0.1, ge=0.0, le=1.0)
    whole_word: bool = False
    rows: Literal["pack", "single"] = "pack"

    @model_validator(mode="after")
    def _split(self) -> "MlmFormat":
        if self.mask_token_prob + self.random_token_prob > 1.0:
            raise ValueError("mask_token_prob + random_token_prob must be at most 1 (the rest keep their token)")
        return self

    def batching(self) -> tuple[str, bool]:
        return self.rows, False

    def document_transform(self, tok, seed: int):
        from maxtrain.data.mlm import MlmMasker  # the masking code, not a config concern

        return MlmMasker(self, tok, seed)


class PreferenceFormat(_Format):
    """Preference pairs from JSONL {prompt, chosen, rejected} (strings or chat messages) or
    {chosen: [messages], rejected: [messages]} (TRL's conventions; see maxtrain/data/preference.py).

    Each record is one element holding prompt+chosen and prompt+rejected as two segments of
    one row (never split across rows or microbatches); only the replies carry loss weight.
    Batches gain `sequence_margin` and `reference_logps` (per-sequence values on each
    sequence's last token). template: as for sft. too_long: a pair longer than a row loses
    shared-prompt tokens from the left, then both replies are cut from the right to a common
    length (truncate_prompt; counted in the log), or is a bad record (refuse).
    """

    type: Literal["preference"] = "preference"
    records: ClassVar[bool] = True
    template: str = "auto"
    too_long: Literal["truncate_prompt", "refuse"] = "truncate_prompt"

    def batching(self) -> tuple[str, bool]:
        return "whole", False

    def batch_fields(self) -> tuple[str, ...]:
        from maxtrain.data.preference import SEQUENCE_FIELDS

        return SEQUENCE_FIELDS

    def record_encoder(self, tok, family: str | None = None):
        from maxtrain.data.preference import PreferenceEncoder  # the encoding code, not a config concern

        return PreferenceEncoder(self, tok, family)


class PromptsFormat(_Format):
    """Prompts to sample from (reinforcement learning, train.objective=grpo): JSONL records with a
    `prompt` (a string, or a list of chat messages) or Alpaca {instruction, input} fields, rendered
    with the chat template up to the assistant's turn. Every other field of the record (an
    answer to check, a test case) is handed to the reward functions (see maxtrain/rl/).
    Batches are built by the rollout source, not the packer.
    """

    type: Literal["prompts"] = "prompts"
    records: ClassVar[bool] = True
    rollouts: ClassVar[bool] = True
    template: str = "auto"

    def record_encoder(self, tok, family: str | None = None):
        from maxtrain.data.prompts import PromptEncoder  # the encoding code, not a config concern

        return PromptEncoder(self, tok, family)


FormatConfig = Annotated[
    Union[TextFormat, SftFormat, ClassificationFormat, MlmFormat, PreferenceFormat, PromptsFormat],
    Field(discriminator="type"),
]


class TokenizerConfig(BaseModel):
    """Where the tokenizer comes from.

    path: a sentencepiece `.model`, or a Hugging Face `tokenizer.json` (needs `tokenizers`).
      None trains a sentencepiece model on the train split of the sources, with the model's
      vocab_size, cached by content hash under $MAXTRAIN_CACHE or ~/.cache/maxtrain.
    train_sentences: cap on the lines fed to the sentencepiece trainer (keeps training fast).
    bos_token/eos_token/pad_token: special tokens of a tokenizer.json (sentencepiece models
      carry their own ids).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str | None = None
    model_type: Literal["bpe", "unigram", "char"] = "bpe"
    train_sentences: int = Field(200_000, ge=1)
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None


class DataConfig(BaseModel):
    """The data pipeline: which documents, which tokenizer, how they are loaded.

    eval_fraction: share of documents held out (by a stable hash of their id) for split="eval".
    workers: tokenizer worker processes (0 tokenizes in the main process).
    prefetch: packed batches prepared ahead by a background thread (0 disables).
    on_bad_record: "error" stops with one line naming the record; "skip" counts and logs it.
    format: how records become documents (text, sft, classification; see maxtrain/data/formats.py).
    mixture_unit: what source weights are proportions of: documents, or tokens (each weight
      is divided by the source's mean document length, measured on a sample at start-up).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    sources: list[SourceConfig] = Field(default_factory=lambda: [EmbeddedSource()], min_length=1)
    eval_fraction: float = Field(0.02, ge=0.0, lt=1.0)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    shuffle: bool = True
    workers: int = Field(0, ge=0)
    prefetch: int = Field(2, ge=0)
    on_bad_record: Literal["error", "skip"] = "error"
    format: FormatConfig = Field(default_factory=TextFormat)
    mixture_unit: Literal["documents", "tokens"] = "documents"

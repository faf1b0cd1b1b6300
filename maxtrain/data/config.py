"""Typed, frozen configuration of the data pipeline: sources, tokenizer, loader knobs.

The run config's `data:` section is validated as `DataConfig(**section)`. Unknown keys are
rejected (extra="forbid") so a typo never silently falls back to a default.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

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


class TextFormat(BaseModel):
    """Plain documents: [BOS] + text + [EOS], every token a target (pretraining)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["text"] = "text"

    def batching(self) -> tuple[str, bool]:
        """(how a row is filled, whether batches carry labels): see maxtrain.data.lanes."""
        return "pack", False


class SftFormat(BaseModel):
    """Instruction tuning from JSONL records: Alpaca {instruction, input, output} or chat {messages}.

    template: a chat template name (plain, llama3, chatml, mistral, alpaca) or auto (the one of
      model.family; see maxtrain/data/formats.py). Loss weights are 1 on assistant replies
      (with their end-of-turn text and EOS) and 0 on everything else.
    rows: whole keeps every record inside one row (records are packed while they fit; the
      rest of a row is padding); split lets a record continue in the next row, as text does
      (its reply may then be learned without its prompt).
    too_long: a record longer than a row (rows: whole) loses prompt tokens from the left,
      after BOS, until it fits (truncate_prompt), and one whose reply alone does not fit is a
      bad record; refuse makes every too-long record a bad record. Both are counted in the log.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["sft"] = "sft"
    template: str = "auto"
    rows: Literal["whole", "split"] = "whole"
    too_long: Literal["truncate_prompt", "refuse"] = "truncate_prompt"

    def batching(self) -> tuple[str, bool]:
        """(how a row is filled, whether batches carry labels): see maxtrain.data.lanes."""
        return ("whole" if self.rows == "whole" else "pack"), False


class ClassificationFormat(BaseModel):
    """Sequence classification from JSONL {text, label}; one example per row, with `labels` [B].

    labels: label names in id order when the records hold names; None: records hold ids.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["classification"] = "classification"
    num_labels: int = Field(2, gt=1)
    labels: list[str] | None = None
    text_field: str = "text"
    label_field: str = "label"

    def batching(self) -> tuple[str, bool]:
        """(how a row is filled, whether batches carry labels): one example per row, labelled."""
        return "single", True


FormatConfig = Annotated[Union[TextFormat, SftFormat, ClassificationFormat], Field(discriminator="type")]


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

"""Streaming data on grain: sources, tokenizers, packing with segment ids, exact resumable state.

    from maxtrain.data import DataConfig, build_tokenizer, build_pipeline, local_rows, make_global_batch
    tok = build_tokenizer(cfg, vocab_size=model_vocab)
    it = build_pipeline(cfg, tok, split="train", seq_len=S, global_batch=B, seed=0,
                        rows=local_rows(sharding, B))  # this process's rows of every global batch
    batch = make_global_batch(next(it), sharding)
"""

from maxtrain.data.config import DataConfig, SourceConfig, TokenizerConfig
from maxtrain.data.pipeline import (
    DataIterator,
    build_pipeline,
    build_tokenizer,
    local_rows,
    make_global_batch,
    process_rows,
    unigram_entropy,
)
from maxtrain.data.tokenizer import Tokenizer

__all__ = [
    "DataConfig",
    "DataIterator",
    "SourceConfig",
    "Tokenizer",
    "TokenizerConfig",
    "build_pipeline",
    "build_tokenizer",
    "local_rows",
    "make_global_batch",
    "process_rows",
    "unigram_entropy",
]

"""CLI commands of the data pipeline: `maxtrain tokenizer train` and `maxtrain data prepare`.

cli.py calls register_commands(subparsers); each subcommand sets `func`, which takes the
parsed Namespace and returns an exit code. Mistakes raise UserError (one line, exit 2).
"""

from __future__ import annotations

import argparse
import json
import os


def tokenizer_train(args: argparse.Namespace) -> int:
    """Train a sentencepiece model on the files matching --input and write it to --out."""
    from maxtrain.data.config import DataConfig
    from maxtrain.data.documents import open_sources, sample_texts
    from maxtrain.data.prepare import source_for_glob
    from maxtrain.data.tokenizer import SentencePieceTokenizer, train_sentencepiece, training_sentences
    from maxtrain.errors import UserError

    if args.vocab_size < 8:
        raise UserError(f"--vocab-size must be at least 8 (got {args.vocab_size})")
    cfg = DataConfig(sources=[source_for_glob(args.input, field=args.field, documents=args.documents)],
                     eval_fraction=0.0, on_bad_record=args.on_bad_record)
    sentences = training_sentences(sample_texts(cfg, open_sources(cfg)), args.max_sentences)
    model = train_sentencepiece(sentences, vocab_size=args.vocab_size, model_type=args.model_type)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "wb") as f:
        f.write(model)
    tok = SentencePieceTokenizer(model, where=args.out)
    print(json.dumps({"out": args.out, "vocab_size": tok.vocab_size, "identity": tok.identity,
                      "pad_id": tok.pad_id, "bos_id": tok.bos_id, "eos_id": tok.eos_id}))
    return 0


def data_prepare(args: argparse.Namespace) -> int:
    """Pre-tokenize the files matching --input into ArrayRecord shards under --out."""
    from maxtrain.data.prepare import prepare_corpus, source_for_glob

    manifest = prepare_corpus(source_for_glob(args.input, field=args.field, documents=args.documents),
                              args.tokenizer, args.out, shards=args.shards, workers=args.workers,
                              on_bad_record=args.on_bad_record, progress=not args.quiet)
    print(json.dumps({"out": args.out, **manifest}))
    return 0


def _input_args(p: argparse.ArgumentParser):
    p.add_argument("--input", required=True, help="file, glob or URL; .jsonl/.parquet/.array_record by extension, else text")
    p.add_argument("--field", default="text", help="JSONL field or Parquet column holding the text")
    p.add_argument("--documents", choices=["per_file", "blank_lines"], default="per_file", help="for text: a document per file or per paragraph")
    p.add_argument("--on-bad-record", choices=["error", "skip"], default="error", help="stop on a bad record, or count and skip it")


def register_commands(subparsers) -> None:
    """Add `tokenizer train` and `data prepare` to an argparse subparsers object."""
    tok = subparsers.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tokenizer_command", required=True)
    train = tok.add_parser("train", help="train a sentencepiece model from text files")
    _input_args(train)
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--model-type", choices=["bpe", "unigram", "char"], default="bpe")
    train.add_argument("--max-sentences", type=int, default=1_000_000, help="cap on lines fed to the trainer")
    train.add_argument("--out", required=True, help="where to write the .model file")
    train.set_defaults(func=tokenizer_train)

    data = subparsers.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    prep = data.add_parser("prepare", help="pre-tokenize a corpus into ArrayRecord shards")
    _input_args(prep)
    prep.add_argument("--tokenizer", required=True, help="sentencepiece .model (or tokenizer.json)")
    prep.add_argument("--out", required=True, help="output folder (must not hold prepared data)")
    prep.add_argument("--shards", type=int, default=8)
    prep.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes (0: in this process)")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.set_defaults(func=data_prepare)

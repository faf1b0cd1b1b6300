"""`maxtrain` command line: thin dispatch to the library; user errors are one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from maxtrain.errors import EXIT_USER_ERROR, UserError


def _split_config_and_overrides(args: list[str]) -> tuple[str | None, list[str]]:
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _cmd_train(ns: argparse.Namespace) -> int:
    from maxtrain.config import load_config

    path, overrides = _split_config_and_overrides(ns.args)
    cfg = load_config(path, overrides)
    from maxtrain.trainer import train

    summary = train(cfg)
    logging.getLogger("maxtrain").info(
        "done: eval_loss %.4f -> %.4f (unigram entropy %.4f); %.0f tokens/s, MFU %.3f",
        summary.get("first_eval_loss", float("nan")), summary.get("final_eval_loss", float("nan")),
        summary["unigram_entropy"], summary.get("tokens_per_s", float("nan")), summary.get("mfu", float("nan")),
    )  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maxtrain", description="Pretrain and finetune language models on JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="train a model: maxtrain train [CONFIG.yaml] [key=value ...]",
        description="Train from a YAML config (default: configs/base.yaml values) with dotted key=value overrides.",
    )
    train.add_argument("args", nargs="*", metavar="[CONFIG.yaml] key=value", help="config file, then overrides")
    train.set_defaults(func=_cmd_train)
    from maxtrain.data.commands import register_commands

    register_commands(sub)
    return parser


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `maxtrain` console script."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _setup_logging()
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
    except UserError as e:
        print(f"maxtrain: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("maxtrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

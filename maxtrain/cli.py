"""`maxtrain` command line: thin dispatch to the library; user errors are one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from maxtrain.distributed import describe_failure, is_multi_process, leave_now
from maxtrain.errors import EXIT_USER_ERROR, UserError
from maxtrain.hostmem import reexec_with_hugepages


def _split_config_and_overrides(args: list[str]) -> tuple[str | None, list[str]]:
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _cmd_train(ns: argparse.Namespace) -> int:
    from maxtrain.config import load_config

    if ns.dry_run:
        from maxtrain.plan import run_plan

        return run_plan(ns.args, ns.devices, ns.target, ns.memory_gb)
    path, overrides = _split_config_and_overrides(ns.args)
    if ns.fresh:
        overrides = [*overrides, "checkpoint.resume=false"]
    cfg = load_config(path, overrides)
    from maxtrain.checkpoint.signals import EXIT_PREEMPTED
    from maxtrain.trainer import train

    summary = train(cfg)
    if summary.get("preempted"):
        return EXIT_PREEMPTED
    logging.getLogger("maxtrain").info("done: %s", done_line(summary))
    return 0


def done_line(summary: dict) -> str:
    """The run's summary in one line, with only what was measured (a one-step run times no steady step)."""
    parts = []
    if "final_eval_loss" in summary:
        parts.append(f"eval_loss {summary['first_eval_loss']:.4f} -> {summary['final_eval_loss']:.4f}")
    elif "final_loss" in summary:
        parts.append(f"loss {summary['final_loss']:.4f}")
    if "unigram_entropy" in summary:  # RL runs have no token targets to count
        parts.append(f"unigram entropy {summary['unigram_entropy']:.4f}")
    if "tokens_per_s" in summary:
        parts.append(f"{summary['tokens_per_s']:.0f} tokens/s, MFU {summary['mfu']:.3f}")
    else:
        parts.append("no throughput (it needs two timed steps; the first one compiles)")
    return "; ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maxtrain", description="Pretrain and finetune language models on JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="train a model: maxtrain train [CONFIG.yaml] [key=value ...]",
        description="Train from a YAML config (default: configs/base.yaml values) with dotted key=value overrides.",
    )
    train.add_argument("args", nargs="*", metavar="[CONFIG.yaml] key=value", help="config file, then overrides")
    train.add_argument("--fresh", action="store_true",
                       help="ignore run_dir's checkpoints and start over (they are moved aside, not deleted)")
    train.add_argument("--dry-run", action="store_true",
                       help="do not train: compile for the target mesh on fake devices and print the fit check")
    from maxtrain.plan import add_plan_arguments, register_commands as register_plan_commands

    add_plan_arguments(train)
    train.set_defaults(func=_cmd_train)
    register_plan_commands(sub)
    from maxtrain.data.commands import register_commands

    register_commands(sub)
    from maxtrain.checkpoint.commands import register_commands as register_checkpoint_commands

    register_checkpoint_commands(sub)
    from maxtrain.convert.commands import register_commands as register_convert_commands
    from maxtrain.generate import register_commands as register_generate_commands

    register_convert_commands(sub)
    register_generate_commands(sub)
    from maxtrain.evaluate import register_commands as register_eval_commands
    from maxtrain.tasks.synthetic import register_commands as register_task_commands

    register_eval_commands(sub)
    register_task_commands(sub)
    from maxtrain.fillmask import register_commands as register_fill_mask_commands

    register_fill_mask_commands(sub)
    from maxtrain.chat import register_commands as register_chat_commands

    register_chat_commands(sub)
    from maxtrain.plots import register_commands as register_plot_commands

    register_plot_commands(sub)
    from maxtrain.harness import register_commands as register_harness_commands

    register_harness_commands(sub)
    from maxtrain.reward_model import register_commands as register_score_commands; register_score_commands(sub)  # noqa: E702
    from maxtrain.preference_reference import register_commands as register_pref_commands; register_pref_commands(sub)  # noqa: E702
    return parser


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `maxtrain` console script (argv: given by a caller in-process, else sys.argv)."""
    if argv is None:  # the command itself, not a caller in this process: may re-execute (same PID)
        reexec_with_hugepages()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _setup_logging()
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
    except UserError as e:
        print(f"maxtrain: error: {e}", file=sys.stderr)
        return leave_now(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("maxtrain: interrupted", file=sys.stderr)
        return leave_now(130)
    except Exception as e:
        if not is_multi_process():
            raise
        # One of several processes: say which and why, then leave at once so the others stop too.
        import jax

        traceback.print_exc()
        print(f"maxtrain: error: process {jax.process_index()} of {jax.process_count()} failed: {describe_failure(e)}",
              file=sys.stderr)  # fmt: skip
        return leave_now(1)


if __name__ == "__main__":
    sys.exit(main())

"""`maxtrain harness`: lm-evaluation-harness tasks on any maxtrain model (optional extra `eval`).

    maxtrain harness --checkpoint runs/demo --tasks hellaswag,arc_easy [--num-fewshot 0] [--limit 100]
    maxtrain harness --checkpoint out/params --tasks my_task --include-path tasks/   # your own task YAML

The model is `maxtrain.harness_lm.MaxtrainLM`; tasks, prompts and metrics are lm-eval's own
(`simple_evaluate` with a `TaskManager`), so the numbers are the harness's. Prints one JSON
line {task: {metric: value}}; --out writes lm-eval's whole results dict.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from maxtrain.errors import UserError

log = logging.getLogger("maxtrain.harness")
MISSING = "maxtrain harness needs lm-evaluation-harness; pip install 'maxtrain[eval]'"


def run_harness(checkpoint: str, tasks: list[str], *, include_path: str | None = None, num_fewshot: int | None = None,
                limit: float | None = None, batch_size: int = 16, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """lm-eval's results dict for `tasks` on the model at `checkpoint` (run dir, step dir or export)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(MISSING) from None
    from maxtrain.harness_lm import MaxtrainLM

    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--include-path '{include_path}' is not a directory of task YAML files")
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s) {', '.join(unknown)}; see `lm_eval ls tasks`, or add --include-path DIR with your YAML")
    model = MaxtrainLM(checkpoint=checkpoint, batch_size=batch_size)
    return lm_eval.simple_evaluate(model=model, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                   log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                   fewshot_random_seed=seed, bootstrap_iters=0)  # fmt: skip


def metric_table(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results (its "acc,none" keys shortened to "acc"; stderr left out)."""
    table = {}
    for task, metrics in results["results"].items():
        table[task] = {k.split(",")[0]: v for k, v in metrics.items()
                       if isinstance(v, (int, float)) and "_stderr" not in k and k != "alias"}  # fmt: skip
    return table


def _cmd_harness(ns: argparse.Namespace) -> int:
    for chatty in ("lm_eval", "datasets"):  # per-request progress and task-building notes
        logging.getLogger(chatty).setLevel(logging.WARNING)
    tasks = [t for t in ns.tasks.split(",") if t]
    results = run_harness(ns.checkpoint, tasks, include_path=ns.include_path, num_fewshot=ns.num_fewshot,
                          limit=ns.limit, batch_size=ns.batch_size, seed=ns.seed)  # fmt: skip
    if ns.out:
        Path(ns.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(json.dumps(metric_table(results)))
    return 0


def register_commands(sub) -> None:
    """Add `maxtrain harness` to the CLI."""
    p = sub.add_parser("harness", help="lm-evaluation-harness tasks: maxtrain harness --checkpoint RUN --tasks a,b",
                       description="Run lm-eval tasks on a maxtrain model (needs maxtrain[eval]).")
    p.add_argument("--checkpoint", required=True, help="run dir (newest checkpoint), checkpoint step dir or export")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", help="a directory of your own task YAML files")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write lm-eval's full results JSON here")
    p.set_defaults(func=_cmd_harness)

"""Training curves from metrics.jsonl: one run's RUN_DIR/curves.png, or several runs overlaid.

    maxtrain plot RUN_DIR                       # writes RUN_DIR/curves.png
    maxtrain plot runs/a runs/b --out ab.png    # both runs on the same axes, one colour each

Four panels: loss (training loss, and every held-out set: `eval_loss`, `eval_loss/<name>`),
learning rate, gradient norm, tokens/s; RL runs add a fifth, the mean reward (total and each
reward function). matplotlib is optional (`pip install 'maxtrain[plot]'`);
`write_curves`, which the trainer calls at the end of a run, logs one line instead of failing
when it is missing.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

from maxtrain.errors import UserError

log = logging.getLogger("maxtrain.plots")
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
MISSING = "matplotlib is not installed: no curves.png (pip install 'maxtrain[plot]')"
# (panel title, metric keys drawn in it; a key ending in "/" matches every key with that prefix)
PANELS = (
    ("loss", ("loss", "eval_loss", "eval_loss/")),
    ("learning rate", ("lr",)),
    ("grad norm", ("grad_norm",)),
    ("tokens/s", ("tokens_per_s",)),
)
# RL runs (train.objective=grpo) add the mean reward, total and per reward function.
REWARD_PANEL = ("reward", ("reward", "rewards/"))


def read_series(run_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """{metric key: (steps, values)} of a run's metrics.jsonl, finite numbers only, in file order."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise UserError(f"'{run_dir}' has no {METRICS_FILE}; pass a run dir that has trained (run_dir of `maxtrain train`)")
    series: dict[str, tuple[list[int], list[float]]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n} is not valid JSON ({e.msg}); the file is damaged") from None
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int):
            continue
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                steps, values = series.setdefault(key, ([], []))
                steps.append(step)
                values.append(float(value))
    return series


def _panel_keys(series: dict, wanted: Sequence[str]) -> list[str]:
    keys = []
    for w in wanted:
        keys += sorted(k for k in series if k.startswith(w)) if w.endswith("/") else [w] * (w in series)
    return [k for k in keys if not k.endswith("_std")]  # spreads would crowd the means out


def draw_curves(runs: dict[str, str | Path]):
    """A matplotlib Figure with the four panels, every run's series drawn (label "RUN key" when several runs).

    runs: {label: run dir}. Line labels say what is drawn, e.g. "loss", "eval_loss/wiki".
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend needed
    from matplotlib.ticker import MaxNLocator

    data = {label: read_series(d) for label, d in runs.items()}
    panels = PANELS + ((REWARD_PANEL,) if any("reward" in series for series in data.values()) else ())
    rows = -(-len(panels) // 2)
    fig = Figure(figsize=(11, 3.75 * rows), layout="constrained")
    axes = fig.subplots(rows, 2).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    colours = [f"C{i % 10}" for i in range(len(data))]
    for ax, (title, wanted) in zip(axes, panels):
        for colour, (label, series) in zip(colours, data.items()):
            for i, key in enumerate(_panel_keys(series, wanted)):
                steps, values = series[key]
                name = key if len(data) == 1 else f"{label} {key}"
                if key.startswith("eval_"):  # few points: markers, dashed, one marker shape per set
                    ax.plot(steps, values, color=colour, linestyle="--", marker="os^vD<>"[i % 7], markersize=4, label=name)
                else:  # a run's own parts (each reward function) dotted beside its total
                    ax.plot(steps, values, color=colour, linewidth=1.2, label=name, linestyle=":" if "/" in key else "-")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.grid(alpha=0.3)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    if len(data) == 1:
        fig.suptitle(str(next(iter(runs.values()))))
    return fig


def run_labels(run_dirs: Sequence[str | Path]) -> dict[str, str | Path]:
    """{legend label: run dir}: the dir names, or the paths as given where names repeat."""
    names = [Path(d).name or str(d) for d in run_dirs]
    unique = len(set(names)) == len(names)
    return {(n if unique else str(d)): d for n, d in zip(names, run_dirs)}


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path) -> dict[str, list[str]]:
    """Write the runs' curves, overlaid, to `out` (PNG); returns {panel title: line labels drawn}."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("maxtrain plot needs matplotlib; pip install 'maxtrain[plot]'") from None
    fig = draw_curves(run_labels(run_dirs))
    out = Path(out)
    try:
        fig.savefig(out, dpi=110)
    except OSError as e:
        raise UserError(f"could not write '{out}': {e.strerror or e}; check the directory and permissions") from None
    return {ax.get_title(): [line.get_label() for line in ax.lines] for ax in fig.axes if ax.get_visible()}


def write_curves(run_dir: str | Path) -> Path | None:
    """Write RUN_DIR/curves.png from RUN_DIR/metrics.jsonl; returns its path, or None (one log line) when it can't.

    Never raises for a missing matplotlib or unreadable metrics: the end of a training run
    must not fail over a picture.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.info(MISSING)
        return None
    out = Path(run_dir) / CURVES_FILE
    try:
        plot_runs([run_dir], out)
    except UserError as e:
        log.warning("no %s: %s", CURVES_FILE, e)
        return None
    return out


def _cmd_plot(ns: argparse.Namespace) -> int:
    if ns.out is None and len(ns.run_dirs) > 1:
        raise UserError("several runs go into one picture: name it with --out FILE.png")
    out = ns.out or Path(ns.run_dirs[0]) / CURVES_FILE
    drawn = plot_runs(ns.run_dirs, out)
    log.info("wrote %s (%s)", out, "; ".join(f"{t}: {len(lines)} series" for t, lines in drawn.items()))
    return 0


def register_commands(sub: Any) -> None:
    """Add `maxtrain plot` to the CLI."""
    p = sub.add_parser("plot", help="training curves: maxtrain plot RUN_DIR [RUN_DIR ...] [--out FILE.png]",
                       description="Loss (and every eval set), learning rate, grad norm and tokens/s from "
                                   "metrics.jsonl; several runs are overlaid with a legend. Needs maxtrain[plot].")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="PNG to write (default for one run: RUN_DIR/curves.png)")
    p.set_defaults(func=_cmd_plot)

"""Curves from metrics.jsonl: every run's series drawn, a real PNG written, and a missing matplotlib is one line."""

import json
import logging
import math
import sys

import pytest

from maxtrain.cli import main

pytest.importorskip("matplotlib")


def _run(tmp_path, name: str, scale: float):
    """A run dir whose metrics.jsonl holds train records (steps 10..50), a default and a named eval set."""
    run = tmp_path / name
    run.mkdir()
    records = []
    for step in range(0, 51, 10):
        if step:
            records.append({"step": step, "loss": scale * 7 / step, "lr": 1e-3 * step / 50, "grad_norm": 1 + step / 100,
                            "tokens_per_s": 1000.0 + step if step > 10 else float("nan")})  # fmt: skip
        if step % 25 == 0:
            records.append({"step": step, "eval_loss": scale * (7 - step / 10), "eval_loss/wiki": scale * (8 - step / 10)})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))  # nan is written as NaN
    return run


def test_two_runs_are_overlaid_with_every_series(tmp_path):
    from maxtrain.plots import draw_curves, plot_runs, run_labels

    a, b = _run(tmp_path, "a", 1.0), _run(tmp_path, "b", 2.0)
    drawn = plot_runs([a, b], tmp_path / "ab.png")
    assert (tmp_path / "ab.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn == {
        "loss": ["a loss", "a eval_loss", "a eval_loss/wiki", "b loss", "b eval_loss", "b eval_loss/wiki"],
        "learning rate": ["a lr", "b lr"], "grad norm": ["a grad_norm", "b grad_norm"],
        "tokens/s": ["a tokens_per_s", "b tokens_per_s"],
    }  # fmt: skip
    fig = draw_curves(run_labels([a, b]))
    lines = {line.get_label(): line for ax in fig.axes for line in ax.lines}
    assert list(lines["b eval_loss/wiki"].get_xdata()) == [0, 50]
    assert list(lines["b eval_loss/wiki"].get_ydata()) == [16.0, 6.0]
    assert list(lines["a tokens_per_s"].get_xdata()) == [20, 30, 40, 50]  # the nan at step 10 is left out
    assert all(math.isfinite(y) for y in lines["a tokens_per_s"].get_ydata())


def test_write_curves_and_the_cli_default(tmp_path):
    from maxtrain.plots import write_curves

    run = _run(tmp_path, "solo", 1.0)
    assert write_curves(run) == run / "curves.png"
    assert (run / "curves.png").stat().st_size > 10_000
    (run / "curves.png").unlink()
    assert main(["plot", str(run)]) == 0 and (run / "curves.png").is_file()


def test_write_curves_without_matplotlib_logs_one_line(tmp_path, monkeypatch, caplog):
    from maxtrain.plots import write_curves

    run = _run(tmp_path, "solo", 1.0)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: import raises ImportError
    with caplog.at_level(logging.INFO, logger="maxtrain.plots"):
        assert write_curves(run) is None
    assert [r.getMessage() for r in caplog.records] == ["matplotlib is not installed: no curves.png (pip install 'maxtrain[plot]')"]
    assert not (run / "curves.png").exists()


@pytest.mark.parametrize("args, expected", [
    (["a", "b"], "several runs go into one picture: name it with --out FILE.png"),
    (["missing"], "has no metrics.jsonl"),
])  # fmt: skip
def test_plot_mistakes_are_one_line(args, expected, tmp_path, capsys):
    _run(tmp_path, "a", 1.0), _run(tmp_path, "b", 1.0)
    assert main(["plot", *(str(tmp_path / a) for a in args)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err

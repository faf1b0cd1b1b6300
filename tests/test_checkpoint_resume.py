"""End to end with real `maxtrain train` processes: SIGTERM, exact resume, damaged and unwritable checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from maxtrain.checkpoint import complete_steps, read_metadata
from maxtrain.checkpoint.signals import EXIT_PREEMPTED

ARGS = ["model=tiny-llama", "model.vocab_size=1024", "train.seq_len=32", "train.global_batch=8", "log.every=1",
        "eval.every=0", "eval.batches=1", "log.tensorboard=false", "optimizer.warmup_steps=2", "steps=8"]  # fmt: skip


def _cmd(run_dir, *extra):
    return [sys.executable, "-m", "maxtrain.cli", "train", *ARGS, f"run_dir={run_dir}", *extra]


def _run(run_dir, *extra, **kw):
    return subprocess.run(_cmd(run_dir, *extra), capture_output=True, text=True, timeout=300, **kw)


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in _records(run_dir) if "loss" in r]


def _start_and_signal(run_dir, lines, signals, *extra):
    """Start training, wait until metrics.jsonl has `lines` records, send `signals`; returns (rc, stderr)."""
    proc = subprocess.Popen(_cmd(run_dir, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= lines):
        assert proc.poll() is None and time.time() < deadline, "run ended before the signal"
        time.sleep(0.05)
    for sig in signals:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.slow
def test_sigterm_then_resume_equals_uninterrupted_run_and_damaged_checkpoint_is_skipped(tmp_path):
    whole = _run(tmp_path / "whole", "checkpoint.every=0")
    assert whole.returncode == 0, whole.stderr[-2000:]
    expected = _losses(tmp_path / "whole")
    assert [s for s, _ in expected] == list(range(1, 9))

    run = tmp_path / "run"
    rc, err = _start_and_signal(run, 3, [signal.SIGTERM], "checkpoint.every=3")
    assert rc == EXIT_PREEMPTED, err[-2000:]
    stopped = complete_steps(run / "checkpoints")[-1]
    assert 3 <= stopped < 8 and "stopped by SIGTERM" in err
    meta = read_metadata(run / "checkpoints" / str(stopped))
    assert meta["step"] == stopped and meta["tokens_seen"] == stopped * 8 * 32
    assert meta["config"]["model"]["d_model"] == 64 and meta["tokenizer"]["identity"].startswith("sp:")
    assert [s for s, _ in _losses(run)] == list(range(1, stopped + 1))  # metrics never behind the checkpoint

    resumed = _run(run, "checkpoint.every=3")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {run / 'checkpoints' / str(stopped)} at step {stopped}" in resumed.stderr
    assert _losses(run) == expected  # the whole sequence, bitwise (as written), no step twice

    # Damage the newest checkpoint (cut its files in half): the next start skips it, with a
    # warning, and re-runs from the previous good one to the same losses.
    newest, previous = complete_steps(run / "checkpoints")[-2:][::-1]
    for root, _, files in os.walk(run / "checkpoints" / str(newest) / "params"):
        for name in files:
            path = os.path.join(root, name)
            os.truncate(path, os.path.getsize(path) // 2)
    again = _run(run, "steps=8", "checkpoint.every=3")
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"checkpoint {run / 'checkpoints' / str(newest)} is damaged" in again.stderr
    assert f"at step {previous}" in again.stderr
    assert any(p.name.startswith(f"damaged-{newest}-") for p in (run / "checkpoints").iterdir())
    assert _losses(run) == expected


@pytest.mark.slow
def test_second_signal_aborts_at_once(tmp_path):
    # SIGTERM then SIGINT back to back (distinct signals, so neither is merged into the other).
    rc, err = _start_and_signal(tmp_path / "run", 2, [signal.SIGTERM, signal.SIGINT], "steps=500", "checkpoint.every=0")
    # Python runs pending handlers in signal-number order, so either may count as the second.
    assert rc in (128 + signal.SIGINT, 128 + signal.SIGTERM), err[-2000:]
    assert "aborting without waiting" in err
    assert complete_steps(tmp_path / "run" / "checkpoints") == []

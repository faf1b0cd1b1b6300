"""Real multi-process runs on localhost (CPU, gloo): 2 processes x 4 devices against 1 x 8.

- the same losses over 5 steps (synthetic global batches, each process feeding its rows);
- a checkpoint written by 2 processes resumes in 1 process, and the reverse, continuing
  exactly like an uninterrupted run;
- killing one process makes the other exit non-zero within DEATH_BOUND_S (stated below);
- `launch/local.sh 2 ...` through the real data pipeline trains the same losses as 1 x 8
  (global batches do not depend on the process count); only process 0 writes metrics; a
  checkpoint resumes its data position on 1 and on 4 processes.

Run as `python tests/test_multihost.py worker SPEC.json` this file is also the worker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STEPS = 5
SAVE_AT = 3
OVERRIDES = [
    "model=tiny-llama", "train.seq_len=32", "train.global_batch=8", "mesh.fsdp=-1", f"steps={STEPS}",
    "optimizer.lr=1e-2", "optimizer.warmup_steps=0", "checkpoint.async=false", "checkpoint.restore_data=false",
]  # fmt: skip
# Same program, same data; only the all-reduce crosses a process boundary (gloo), which
# may sum in another order: losses agree to float32 rounding.
RTOL = 1e-5
HEARTBEAT_S = 5
DEATH_BOUND_S = HEARTBEAT_S + 25  # heartbeat detection + abort; generous for a loaded 2-core CI box


def build(cfg):
    """Join the processes named by cfg.distributed (none: this one alone) and build the experiment."""
    from maxtrain.distributed import initialize
    from maxtrain.experiment import build_experiment

    initialize(cfg.distributed)
    return build_experiment(cfg)


def run_steps(exp, run_dir: Path, *, first: int, last: int, save_at: int | None = None, restore: bool = False) -> dict:
    """Train steps first..last on synthetic global batches, each process feeding only its own rows.

    restore: start from run_dir's latest checkpoint instead of exp.state (then `first` must follow it).
    """
    import jax

    sys.path.insert(0, str(REPO / "tests"))
    from synthetic import random_batch

    from maxtrain.checkpoint import TrainCheckpointer
    from maxtrain.data import local_rows, make_global_batch

    cfg = exp.cfg
    ckpt = TrainCheckpointer(Path(run_dir) / "checkpoints", cfg.checkpoint, cfg=cfg, tokenizer_identity=None)
    if restore:
        exp.state, _, step = ckpt.restore_latest(exp.state)
        assert step == first - 1, (step, first)
    losses = {}
    with jax.set_mesh(exp.mesh):
        for step in range(first, last + 1):
            # Two batches in turn: a tiny model learns them within 5 steps, so the losses move.
            full = random_batch(cfg.train.global_batch, cfg.train.seq_len, cfg.model.vocab_size, seed=step % 2, docs_per_row=2)
            # The rows this process's devices hold, in order: what its data pipeline would read.
            rows = local_rows(exp.batch_sharding, cfg.train.global_batch)
            batch = make_global_batch({k: v[rows] for k, v in full.items()}, exp.batch_sharding)
            exp.state, metrics = exp.train_step(exp.state, batch)
            losses[step] = float(jax.device_get(metrics["loss"]))
            if jax.process_index() == 0:
                print(f"step {step} loss {losses[step]:.6f}", flush=True)
            if step == save_at:
                ckpt.save(step, exp.state, {})
                ckpt.wait()
    ckpt.close()
    return losses


def _worker(spec_path: str) -> None:
    """2-process side of the test: train 1..STEPS saving at SAVE_AT, resume `resume_from` (a
    1-process checkpoint) at SAVE_AT+1 with the same compiled step, then train until killed."""
    import jax

    from maxtrain.config import load_config

    spec = json.loads(Path(spec_path).read_text())
    cfg = load_config(None, [*OVERRIDES, f"distributed.heartbeat_timeout_s={HEARTBEAT_S}"])
    exp = build(cfg)
    out = {"process_count": jax.process_count(), "device_count": jax.device_count()}
    out["losses"] = run_steps(exp, Path(spec["run_dir"]), first=1, last=STEPS, save_at=SAVE_AT)
    out["resumed"] = run_steps(exp, Path(spec["resume_from"]), first=SAVE_AT + 1, last=STEPS, restore=True)
    if jax.process_index() == 0:
        Path(spec["out"]).write_text(json.dumps(out))
    # Then keep training until the test kills process 1 (the kill test reuses these processes).
    run_steps(exp, Path(spec["run_dir"]) / "forever", first=STEPS + 1, last=10**6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(process_id: int, port: int, nproc: int = 2, devices: int = 4) -> dict:
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
        JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", MAXTRAIN_COORDINATOR=f"127.0.0.1:{port}",
        MAXTRAIN_NUM_PROCESSES=str(nproc), MAXTRAIN_PROCESS_ID=str(process_id),
    )  # fmt: skip
    return env


def _start_two(tmp_path: Path, spec: dict) -> list[subprocess.Popen]:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    port = _free_port()
    return [
        subprocess.Popen([sys.executable, __file__, "worker", str(path)], env=_env(i, port), cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]  # fmt: skip


def _close(a: dict, b: dict) -> None:
    a = {int(k): v for k, v in a.items()}
    assert sorted(a) == sorted(b)
    print("max relative loss difference", max(abs(a[s] - b[s]) / abs(b[s]) for s in a))
    for step in a:
        assert abs(a[step] - b[step]) <= RTOL * abs(b[step]), (step, a[step], b[step])


@pytest.mark.slow
def test_two_processes_match_one_resume_across_counts_and_stop_when_one_dies(tmp_path):
    import jax

    from maxtrain.config import load_config

    assert jax.device_count() == 8
    one, two = tmp_path / "one", tmp_path / "two"
    # 1 x 8 uninterrupted, saving at step 3.
    exp = build(load_config(None, [*OVERRIDES, "distributed.cluster=none"]))
    ref = run_steps(exp, one, first=1, last=STEPS, save_at=SAVE_AT)
    assert ref[STEPS] < ref[1] - 0.5  # it trains: the comparison is not of constants

    # 2 x 4: the same five losses, saving at step 3 (both processes write); then resume the
    # 1-process checkpoint in 2 processes; then train on until process 1 is killed.
    procs = _start_two(tmp_path, {"run_dir": str(two), "resume_from": str(one), "out": str(tmp_path / "out.json")})
    guard = threading.Timer(400, lambda: [p.kill() for p in procs])  # never hang the suite
    guard.start()
    try:
        log0 = []
        for line in procs[0].stdout:
            log0.append(line)
            if line.startswith(f"step {STEPS + 2} "):  # past the comparison, inside the training loop
                break
        assert (tmp_path / "out.json").exists(), "".join(log0)[-3000:] + (procs[1].stdout.read() if procs[1].poll() is not None else "")
        # Kill process 1 mid-training: process 0, blocked in a collective, must stop by itself.
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        rest = procs[0].communicate(timeout=DEATH_BOUND_S + 30)[0]
        elapsed = time.monotonic() - killed_at
    finally:
        guard.cancel()
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[0].returncode != 0
    assert elapsed <= DEATH_BOUND_S, f"process 0 took {elapsed:.1f}s to stop"
    assert "another task died" in rest, rest[-2000:]  # jax's coordination service says why
    print(f"process 0 stopped {elapsed:.1f}s after process 1 was killed (rc {procs[0].returncode})")

    out = json.loads((tmp_path / "out.json").read_text())
    assert (out["process_count"], out["device_count"]) == (2, 8)
    _close(out["losses"], ref)
    _close(out["resumed"], {s: ref[s] for s in range(SAVE_AT + 1, STEPS + 1)})
    # Written by 2 processes, resumed in 1: steps 4-5 equal the uninterrupted run's.
    resumed = run_steps(exp, two, first=SAVE_AT + 1, last=STEPS, restore=True)
    _close(resumed, {s: ref[s] for s in range(SAVE_AT + 1, STEPS + 1)})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few dozen small text documents (cheap to tokenize with a char tokenizer)."""
    import numpy as np

    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly boxing".split()
    for i in range(60):
        (d / f"{i:03d}.txt").write_text(" ".join(rng.choice(words, size=rng.integers(20, 80))) + ".")
    return d


def _train_args(corpus: Path, run_dir: Path, steps: int) -> list[str]:
    return [
        "model=tiny-llama", "model.vocab_size=320", "train.seq_len=64", "train.global_batch=8", f"steps={steps}", f"run_dir={run_dir}",
        f"data.sources=[{{type: text, path: '{corpus}/*.txt'}}]", "data.eval_fraction=0.2",
        "data.tokenizer.model_type=char", "data.prefetch=0", "eval.every=0", "eval.batches=50", "log.every=1",
        "log.tensorboard=false", "checkpoint.every=0", f"distributed.heartbeat_timeout_s={HEARTBEAT_S}",
    ]  # fmt: skip


def _launch(nproc: int, devices: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MAXTRAIN_PYTHON=sys.executable, MAXTRAIN_LOCAL_DEVICES=str(devices),
               XLA_FLAGS="--xla_backend_optimization_level=0")  # fmt: skip
    proc = subprocess.run(["bash", str(REPO / "launch/local.sh"), str(nproc), *args],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run_dir) if "loss" in r}


@pytest.mark.slow
def test_real_pipeline_same_losses_on_1x8_and_2x4_and_data_resumes_across_counts(tmp_path, corpus):
    """Through `launch/local.sh` and the real data pipeline: 2 processes x 4 devices train the
    same per-step losses as 1 x 8; a checkpoint of either resumes on 1, 2 or 4 processes and
    continues exactly like the uninterrupted run (the data position moves with it)."""
    steps, every = 6, 3
    one, two = tmp_path / "one", tmp_path / "two"
    extra = [f"checkpoint.every={every}", "checkpoint.keep=3", "optimizer.lr=1e-2", "optimizer.warmup_steps=0"]
    _launch(1, 8, [*_train_args(corpus, one, steps), *extra], tmp_path)
    proc = _launch(2, 4, [*_train_args(corpus, two, steps), *extra], tmp_path)
    assert "2 processes, 8 devices (4 local)" in proc.stderr
    ref = _losses(one)
    assert ref[steps] < ref[1] - 0.3  # it trains: the comparison is not of constants
    for step, loss in sorted(_losses(two).items()):  # the table the README quotes (pytest -s)
        print(f"step {step}: 1x8 {ref[step]:.7f}  2x4 {loss:.7f}  |rel diff| {abs(loss - ref[step]) / ref[step]:.1e}")
    _close(_losses(two), ref)
    records = _records(two)
    # Written by process 0 alone: each step exactly once (two writers would duplicate lines).
    assert [r["step"] for r in records if "loss" in r] == list(range(1, steps + 1))
    evals = [r for r in records if "eval_loss" in r]
    ref_evals = [r for r in _records(one) if "eval_loss" in r]
    assert len(evals) == 1 and evals[0]["eval_tokens"] == ref_evals[0]["eval_tokens"] > 0
    assert abs(evals[0]["eval_loss"] - ref_evals[0]["eval_loss"]) <= RTOL * ref_evals[0]["eval_loss"]
    assert (two / "checkpoints" / str(steps)).is_dir()  # the final save, written by both processes
    # Non-zero processes log warnings only: no step lines from process 1.
    assert not any(line.startswith("[1]") and f"step 1/{steps}" in line for line in proc.stderr.splitlines())

    # Resume from step 3 on another process count: steps 4-6 equal the uninterrupted run's.
    for source, nproc, devices in ((two, 1, 8), (one, 4, 2)):
        resumed = tmp_path / f"from-{source.name}-on-{nproc}"
        shutil.copytree(source, resumed)
        shutil.rmtree(resumed / "checkpoints" / str(steps))
        _launch(nproc, devices, [*_train_args(corpus, resumed, steps), *extra], tmp_path)
        got = _losses(resumed)
        assert sorted(got) == list(range(1, steps + 1))
        print(f"saved by {source.name}, resumed on {nproc} process(es):", {s: round(got[s], 7) for s in range(every + 1, steps + 1)})
        _close({s: got[s] for s in range(every + 1, steps + 1)}, {s: ref[s] for s in range(every + 1, steps + 1)})


def _pid_of_worker(port: int, process_id: int) -> int | None:
    """The pid of the maxtrain process with this coordinator port and process id (from /proc)."""
    want = {f"MAXTRAIN_COORDINATOR=127.0.0.1:{port}".encode(), f"MAXTRAIN_PROCESS_ID={process_id}".encode()}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and want <= set((entry / "environ").read_bytes().split(b"\0")):
                if b"maxtrain.cli" in (entry / "cmdline").read_bytes():
                    return int(entry.name)
        except OSError:  # the process ended, or is not ours
            continue
    return None


@pytest.mark.slow
def test_a_signal_to_one_process_stops_every_process_at_the_same_sync_step(tmp_path, corpus):
    """SIGTERM to process 1 only: both processes checkpoint the same step (a multiple of the sync period) and exit 75."""
    run_dir, every, port = tmp_path / "run", 4, _free_port()
    env = dict(os.environ, MAXTRAIN_PYTHON=sys.executable, MAXTRAIN_LOCAL_DEVICES="4", MAXTRAIN_PORT=str(port),
               XLA_FLAGS="--xla_backend_optimization_level=0")  # fmt: skip
    args = [*_train_args(corpus, run_dir, 10_000), f"checkpoint.preemption_sync_every={every}"]
    proc = subprocess.Popen(["bash", str(REPO / "launch/local.sh"), "2", *args], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline, logged = time.monotonic() + 240, 0
        while logged < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            if (run_dir / "metrics.jsonl").exists():
                logged = (run_dir / "metrics.jsonl").read_text().count('"loss"')
        worker = _pid_of_worker(port, 1)
        assert logged >= 3 and worker is not None, (logged, worker)
        os.kill(worker, signal.SIGTERM)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-4000:]  # EXIT_PREEMPTED from both processes
    saved = [int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] % every == 0 and saved[0] < 10_000, saved
    assert f"stopped by a signal to another process after step {saved[0]}" in err  # process 0's log
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == saved[0]


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(sys.argv[2])

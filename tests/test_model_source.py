"""Any run is a model: generate / export take a run dir, a step dir or an export alike, and print no warnings."""

import json
import os
import subprocess
import sys

import pytest

from maxtrain.checkpoint.source import resolve_model
from maxtrain.cli import main
from maxtrain.errors import UserError

ARGS = ["model=tiny-llama", "model.vocab_size=1024", "train.seq_len=32", "train.global_batch=8", "log.every=1",
        "eval.every=2", "eval.batches=1", "optimizer.warmup_steps=1", "steps=4", "checkpoint.every=2"]  # fmt: skip
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")  # one device, fast compile


def _warnings(stderr: str) -> list[str]:
    """Python warning lines (UserWarning, DeprecationWarning, ...) in a process's stderr."""
    return [line for line in stderr.splitlines() if "Warning" in line]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step tiny run with checkpoints at steps 2 and 4, trained by a real `maxtrain train` process."""
    run_dir = tmp_path_factory.mktemp("source") / "run"
    cmd = [sys.executable, "-m", "maxtrain.cli", "train", *ARGS, f"run_dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _warnings(proc.stderr) == [], proc.stderr[-3000:]
    (run_dir / "train.stderr").write_text(proc.stderr)
    return run_dir


def test_train_log_and_summary_have_no_nan(run):
    """Step 1 has no throughput yet (its time includes compilation): it reports none rather than nan."""
    log = (run / "train.stderr").read_text()
    assert "nan" not in log.lower().replace("nans", ""), log[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and "tokens_per_s" not in train[0]
    timed = [r for r in train if "tokens_per_s" in r]
    assert timed[-1]["step"] == 4 and all(0 < r["tokens_per_s"] and 0 < r["mfu"] <= 1 for r in timed)
    assert "nan" not in (run / "summary.json").read_text().lower()


def test_resolver_kinds_and_tokenizers(run, tmp_path):
    from maxtrain.checkpoint.commands import export_params

    latest = resolve_model(run)
    assert (latest.kind, latest.params_dir.parent.name, latest.run_dir) == ("run", "4", run)
    step = resolve_model(run / "checkpoints" / "2")
    assert (step.kind, step.run_dir, step.tokenizer_file()) == ("step", run, run / "tokenizer.model")
    export_params(str(run / "checkpoints" / "2"), str(tmp_path / "export"))
    exported = resolve_model(tmp_path / "export")
    assert (exported.kind, exported.tokenizer_file()) == ("export", tmp_path / "export" / "tokenizer.model")
    assert exported.metadata()["step"] == 2
    # an export of an export keeps the weights and the tokenizer
    export_params(str(tmp_path / "export"), str(tmp_path / "again"))
    assert resolve_model(tmp_path / "again").tokenizer().identity == latest.tokenizer().identity

    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="has no complete checkpoint yet"):
        resolve_model(tmp_path / "empty_run")


def test_a_path_that_is_no_model_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "holds no maxtrain params; pass a run dir" in err and "a checkpoint step dir" in err and "an export" in err


@pytest.mark.slow
def test_generate_from_run_step_and_export_alike_without_warnings(run, tmp_path):
    """Run dir (newest = step 4), its step dir and an export of it give the same greedy completion."""
    from maxtrain.checkpoint.commands import export_params

    export_params(str(run), str(tmp_path / "export"))
    prompt = "The list"
    base = [sys.executable, "-m", "maxtrain.cli", "generate", "--prompt", prompt, "--max-new-tokens", "6"]
    paths = [run, run / "checkpoints" / "4", tmp_path / "export"]
    procs = [subprocess.Popen(base + ["--checkpoint", str(p)] + (["--echo"] if p == run else []), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV) for p in paths]  # fmt: skip
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err[-3000:]
        assert _warnings(err) == [] and err.strip() == "", err  # no warnings, no absl/orbax chatter
    echoed, from_step, from_export = (out.rstrip("\n") for out, _ in results)
    assert from_step == from_export and from_step.strip()  # completion only, the same params
    assert echoed == prompt + from_step  # --echo: prompt, then the completion


def test_convert_to_hf_from_run_step_and_export_ships_the_tokenizer(run, tmp_path):
    """`convert to-hf` of a run dir, a step dir and an export (of `maxtrain export`) alike, tokenizer included."""
    from maxtrain.checkpoint.commands import export_params
    from maxtrain.convert import convert_to_hf

    export_params(str(run), str(tmp_path / "export"))
    for name, path in [("run", run), ("step", run / "checkpoints" / "2"), ("export", tmp_path / "export")]:
        out = tmp_path / f"hf_{name}"
        convert_to_hf(path, out)
        assert (out / "tokenizer.model").read_bytes() == (run / "tokenizer.model").read_bytes(), name
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"

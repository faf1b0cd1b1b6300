"""Named validation sets: each reported apart (metrics.jsonl, summary.json), evaluated whole and
deterministically; a missing or empty set, or a set name given twice, is a one-line error."""

import json

import numpy as np
import pytest

from maxtrain.cli import main
from maxtrain.data.tokenizer import load_tokenizer

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly boxing".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalsets")
    rng = np.random.default_rng(0)
    for i in range(30):
        (d / f"train{i:02d}.txt").write_text(" ".join(rng.choice(WORDS, size=rng.integers(20, 60))) + ".")
    short = [" ".join(rng.choice(WORDS, size=rng.integers(2, 6))) for _ in range(13)]
    (d / "short.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in short))
    (d / "long.txt").write_text("\n\n".join(" ".join(rng.choice(WORDS[::-1], size=80)) for _ in range(9)))
    (d / "empty.jsonl").write_text("\n  \n")
    return d, short


def _args(d, run_dir, *extra):
    return ["train", "model=tiny-llama", "model.vocab_size=320", "train.seq_len=32", "train.global_batch=8", "steps=8",
            f"run_dir={run_dir}", f"data.sources=[{{type: text, path: '{d}/train*.txt'}}]", "data.eval_fraction=0.2",
            "data.tokenizer.model_type=char", "eval.every=4", "optimizer.lr=1e-2", "optimizer.warmup_steps=0", "log.every=1", "log.tensorboard=false", *extra]  # fmt: skip


@pytest.mark.slow
def test_named_sets_are_reported_apart_whole_and_deterministic(corpus, tmp_path):
    d, short = corpus
    run_dir = tmp_path / "run"
    sets = f"eval.sets={{short: [{{type: jsonl, path: '{d}/short.jsonl'}}], long: {{sources: [{{type: text, path: '{d}/long.txt', documents: blank_lines}}], batches: 1}}}}"
    assert main(_args(d, run_dir, sets)) == 0
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]
    for r in evals:
        assert {"eval_loss", "eval_loss/short", "eval_accuracy/short", "eval_loss/long", "eval_tokens/long"} <= set(r)
    # Whole and deterministic: every evaluation reads the same tokens; `short` is all of its
    # documents (each [BOS] + text + [EOS] has len - 1 weighted targets); `long` one batch.
    tok = load_tokenizer(str(run_dir / "tokenizer.model"))
    assert {r["eval_tokens/short"] for r in evals} == {sum(len(tok.encode(t)) + 1 for t in short)}
    assert len({r["eval_tokens/long"] for r in evals}) == 1 and evals[0]["eval_tokens/long"] <= 8 * 32
    # Learning lowers each set's loss; the sets differ, so their losses do.
    assert evals[-1]["eval_loss/short"] < evals[0]["eval_loss/short"] - 0.5
    assert abs(evals[-1]["eval_loss/short"] - evals[-1]["eval_loss/long"]) > 1e-3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_eval_loss/short"] == pytest.approx(evals[-1]["eval_loss/short"], rel=1e-6)
    assert summary["first_eval_loss/long"] == pytest.approx(evals[0]["eval_loss/long"], rel=1e-6)
    assert summary["final_eval_loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-6)


@pytest.mark.parametrize("case", ["missing", "empty", "twice", "bad name"])
def test_bad_validation_sets_are_one_line_errors(corpus, tmp_path, capsys, case):
    d, _ = corpus
    run_dir = tmp_path / "run"
    extra, expected = {
        "missing": ([f"eval.sets={{val: [{{type: jsonl, path: '{d}/nope.jsonl'}}]}}"], "nope.jsonl"),
        "empty": ([f"eval.sets={{val: [{{type: jsonl, path: '{d}/empty.jsonl'}}]}}"], "has no"),
        "twice": ([], "appears twice"),
        "bad name": (["eval.sets={'a/b': [{type: embedded}]}"], "set name 'a/b'"),
    }[case]
    args = _args(d, run_dir, *extra)
    if case == "twice":
        cfg = tmp_path / "run.yaml"
        cfg.write_text(f"eval:\n  sets:\n    val: [{{type: jsonl, path: '{d}/short.jsonl'}}]\n"
                       f"    val: [{{type: text, path: '{d}/long.txt'}}]\n")
        args.insert(1, str(cfg))
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()

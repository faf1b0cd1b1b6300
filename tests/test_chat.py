"""`maxtrain chat`: a run finetuned on two exchanges answers each user line from stdin in turn,
with the template it was trained with; an encoder is refused with one line."""

import json
import os
import subprocess
import sys

import pytest

from maxtrain.cli import main


@pytest.mark.slow
def test_chat_answers_turn_by_turn(tmp_path):
    turn = {"ping": "pong", "ding": "dong"}
    convs = [["ping"], ["ding"], ["ping", "ding"], ["ding", "ping"], ["ping", "ping"], ["ding", "ding"]]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": [m for q in c for m in ({"role": "user", "content": q},
                                                                          {"role": "assistant", "content": turn[q]})]}) + "\n"
                            for c in convs * 8))  # fmt: skip
    run = tmp_path / "run"
    assert main(["train", "model=tiny-llama", "model.vocab_size=320", f"run_dir={run}", "steps=80", "optimizer.lr=1e-2",
                 "optimizer.warmup_steps=5", "train.seq_len=64", "train.global_batch=8", "train.objective=sft",
                 f"data.sources=[{{type: jsonl, path: '{data}'}}]", "data.eval_fraction=0", "data.tokenizer.model_type=char",
                 "data.format={type: sft, template: plain}", "eval.every=0", "log.tensorboard=false"]) == 0  # fmt: skip
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, "-m", "maxtrain.cli", "chat", "--checkpoint", str(run), "--max-new-tokens", "8"],
                          input="ping\nding\n\n", capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["pong", "dong"], proc.stdout


def test_generate_and_chat_refuse_an_encoder(tmp_path, capsys):
    run = tmp_path / "enc"
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog " * 20)
    assert main(["train", "model=tiny-bert", "model.vocab_size=320", f"run_dir={run}", "steps=1", "train.seq_len=16",
                 "train.global_batch=8", "train.objective=masked_lm", f"data.sources=[{{type: text, path: '{tmp_path}/t.txt'}}]",
                 "data.eval_fraction=0", "data.format={type: mlm}", "data.tokenizer.model_type=char", "eval.every=0",
                 "log.tensorboard=false"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run), "--prompt", "the"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "encoder" in err and "fill-mask" in err

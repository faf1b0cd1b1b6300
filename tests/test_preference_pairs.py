"""`maxtrain tasks pairs`: extra preference pairs whose prompts avoid the held-out ones, rejected replies distinct
and wrong; with --from, rejected replies are the model's own wrong samples."""

import json

from maxtrain.cli import main
from maxtrain.tasks.synthetic import TASKS


def _norm(text):
    return " ".join(text.split())


def test_slip_pairs_are_distinct_wrong_and_avoid_held_out_prompts(tmp_path, capsys):
    assert main(["tasks", "make", str(tmp_path / "data"), "--train", "40", "--eval", "40"]) == 0
    held_out = {json.loads(x)["instruction"] for x in (tmp_path / "data/eval.jsonl").read_text().splitlines()}
    capsys.readouterr()
    assert main(["tasks", "pairs", str(tmp_path / "p.jsonl"), "--n", "400", "--per-prompt", "3",
                 "--exclude", str(tmp_path / "data/eval.jsonl")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    pairs = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert summary["pairs"] == len(pairs) and summary["prompts"] == 400 and summary["excluded"] == 40
    assert 400 < len(pairs) <= 1200 and {p["task"] for p in pairs} == set(TASKS)
    assert not {p["prompt"] for p in pairs} & held_out
    seen = set()
    for p in pairs:
        assert _norm(p["chosen"]) != _norm(p["rejected"])
        assert (p["prompt"], p["rejected"]) not in seen
        seen.add((p["prompt"], p["rejected"]))
    adds = [p for p in pairs if p["task"] == "add"]
    assert all(abs(int(p["chosen"].replace(" ", "")) - int(p["rejected"].replace(" ", ""))) in (1, 10) for p in adds)


def test_sampled_pairs_keep_the_models_wrong_replies(tmp_path):
    from maxtrain.tasks.pairs import sampled_pairs
    from maxtrain.tasks.synthetic import instruction_records
    root = tmp_path
    from maxtrain.checkpoint import TrainCheckpointer
    from maxtrain.config import load_config
    from maxtrain.data.tokenizer import train_sentencepiece
    from maxtrain.experiment import build_experiment
    from tests.test_preference_reference import TEXT, TINY

    cfg = load_config(None, TINY + ["data.format={type: sft, template: plain}"])
    exp = build_experiment(cfg)
    ckpt = TrainCheckpointer(root / "run/checkpoints", cfg.checkpoint, cfg=cfg, tokenizer_identity=None)
    ckpt.save(1, exp.state, {})
    ckpt.close()
    (root / "run/tokenizer.model").write_bytes(train_sentencepiece([TEXT * 3] * 20, vocab_size=80, model_type="char"))
    records = instruction_records(8, 0)
    pairs, counts = sampled_pairs(str(root / "run"), records, samples=2, max_new_tokens=4, batch_size=8, per_prompt=2)
    assert sum(c["prompts"] for c in counts.values()) == 8
    assert pairs and len(pairs) == sum(c["pairs"] for c in counts.values()) <= 16  # a random model is mostly wrong
    for p in pairs:
        r = next(r for r in records if r["instruction"] == p["prompt"])
        assert p["chosen"] == r["output"] and _norm(p["rejected"]) != _norm(r["output"]) and p["rejected"].strip()

"""RewardModel / `maxtrain score`: the scores equal the reward objective's rewards on the same pairs (params on 8
fake devices), repeated calls reuse one compile, and bad input is one line with exit 2."""

import json

import jax
import numpy as np
import pytest

from maxtrain.cli import main
from maxtrain.data.tokenizer import train_sentencepiece

TEXT = "abcdefghijklmnopqrstuvwxyz0123456789 :+=\nUSERAsistn"
TINY = ["model=tiny-llama", "model.num_heads=4", "model.num_kv_heads=2", "model.d_model=32", "model.ffn_dim=64",
        "model.vocab_size=320", "model.max_seq_len=64", "train.global_batch=8", "train.seq_len=64",
        "optimizer.warmup_steps=1", "optimizer.lr=1e-2", "optimizer.weight_decay=0", "steps=6",
        "train.objective=reward", "finetune.classifier={num_labels: 1, pooling: last}", "data.eval_fraction=0",
        "train.attention_query_block=0", "eval.every=0", "log.tensorboard=false"]  # fmt: skip


def _pairs(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(0, 50, 2))
        off = int(rng.integers(1, 9))
        out.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + off)})
    return out


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    (root / "tok.model").write_bytes(train_sentencepiece([TEXT * 3] * 20, vocab_size=80, model_type="char"))
    (root / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _pairs(64)))
    over = TINY + [f"run_dir={root / 'run'}", f"data.tokenizer.path={root / 'tok.model'}",
                   f"data.sources=[{{type: jsonl, path: {root / 'pref.jsonl'}}}]",
                   "data.format={type: preference, template: plain}"]
    assert main(["train", *over]) == 0
    return root, over


def test_scores_equal_the_reward_objectives_rewards(reward_run):
    from maxtrain.config import load_config
    from maxtrain.data import build_tokenizer
    from maxtrain.data.formats import RecordEncoder
    from maxtrain.data.lanes import LaneBatcher
    from maxtrain.experiment import build_experiment
    from maxtrain.finetune.init import load_pretrained
    from maxtrain.objectives_preference import pairs, pair_mask, sequence_rewards
    from maxtrain.reward_model import RewardModel

    root, over = reward_run
    held_out = _pairs(24, seed=1)
    cfg = load_config(None, over)
    exp = build_experiment(cfg)
    tok = build_tokenizer(cfg.data, vocab_size=cfg.model.vocab_size)
    encode = RecordEncoder(cfg.data.format, tok)
    docs = [encode(r, f"r{i}") for i, r in enumerate(held_out)]
    batch = next(iter(LaneBatcher(docs, global_batch=8, rows=range(8), seq_len=64, pad_id=tok.pad_id, fill="whole",
                                  fields=cfg.data.format.batch_fields())))
    with jax.set_mesh(exp.mesh):
        params = load_pretrained(str(root / "run"), exp.state.params)
        r = sequence_rewards(exp.apply_fn, params, jax.device_put(batch, exp.batch_sharding))
    rc, rr = (np.asarray(x) for x in pairs(r))
    mask = np.asarray(pair_mask(batch["segment_ids"])) > 0
    objective_c, objective_r = rc[mask], rr[mask]  # pairs in packing order = record order
    n = len(objective_c)
    assert n >= 8

    rm = RewardModel.load(root / "run", batch_size=8)
    assert rm.mesh.size == 8 and len(rm.params["classifier"]["out"]["kernel"].sharding.device_set) == 8
    prompts = [p["prompt"] for p in held_out[:n]]
    ours_c = rm.score(prompts, [p["chosen"] for p in held_out[:n]])
    ours_r = rm.score(prompts, [p["rejected"] for p in held_out[:n]])
    assert ours_c.dtype == np.float32 and ours_c.shape == (n,)
    assert np.abs(ours_c - objective_c).max() <= 1e-5 and np.abs(ours_r - objective_r).max() <= 1e-5
    assert np.std(np.concatenate([ours_c, ours_r])) > 1e-3  # trained, distinct rewards: a real comparison
    rm.score(prompts[:3], ["1", "2", "3"])  # another count of rows: the same shapes, no new compile
    assert rm._score._cache_size() == 1


def test_score_command_prints_rewards_and_pairwise_accuracy(reward_run, tmp_path, capsys):
    root, _ = reward_run
    pairs = _pairs(5, seed=2)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"prompt": p["prompt"], "completion": p["chosen"]}) + "\n"
                                              for p in pairs))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    capsys.readouterr()
    assert main(["score", "--checkpoint", str(root / "run"), "--data", str(tmp_path / "c.jsonl")]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["line"] for x in lines] == [1, 2, 3, 4, 5] and all(isinstance(x["reward"], float) for x in lines)
    assert main(["score", "--checkpoint", str(root / "run"), "--data", str(tmp_path / "p.jsonl")]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["reward_chosen"] for x in out[:5]] == pytest.approx([x["reward"] for x in lines], abs=1e-6)
    expect = np.mean([x["reward_chosen"] > x["reward_rejected"] for x in out[:5]])
    assert out[5]["count"] == 5 and out[5]["accuracy"] == pytest.approx(expect)


@pytest.mark.parametrize("records, why", [
    (None, "does not exist"),
    ([{"prompt": "1+1="}], "missing field 'completion'"),
    ([{"prompt": "1+1=", "chosen": "2"}], "missing field 'rejected'"),
    ([{"prompt": "1+1=", "completion": 5}], "'completion' must be a string"),
])  # fmt: skip
def test_bad_score_input_is_one_line_exit_2(reward_run, tmp_path, capsys, records, why):
    root, _ = reward_run
    path = tmp_path / "bad.jsonl"
    if records is not None:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    capsys.readouterr()
    assert main(["score", "--checkpoint", str(root / "run"), "--data", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert why in err and len(err.splitlines()) == 1 and err.startswith("maxtrain: error:")


"""DPO's reference options beyond adapters_off: `frozen` (a frozen copy of the init_from weights inside the params:
bitwise unchanged by steps, no optimizer state, log 2 at step 0, left out by export and generate) and `precomputed`
(`maxtrain preference reference` writes the same log-probs the in-step reference computes); and the reward / DPO
config errors, each one line with exit 2 through the CLI."""

import json
import math

import jax
import numpy as np
import pytest

from maxtrain.checkpoint import TrainCheckpointer
from maxtrain.cli import main
from maxtrain.config import load_config
from maxtrain.data.tokenizer import train_sentencepiece
from maxtrain.experiment import build_experiment

TEXT = "abcdefghijklmnopqrstuvwxyz0123456789 :+=\nUSERAsistn"
TINY = ["model=tiny-llama", "model.num_heads=4", "model.num_kv_heads=2", "model.d_model=32", "model.ffn_dim=64",
        "model.vocab_size=320", "model.max_seq_len=64", "train.global_batch=8", "train.seq_len=64",
        "optimizer.warmup_steps=1", "optimizer.lr=3e-3", "optimizer.weight_decay=0", "steps=3",
        "train.attention_query_block=0", "data.format={type: preference, template: plain}"]  # fmt: skip
FROZEN = ["train.objective=dpo", "train.preference.reference=frozen"]
RECORDS = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1 + a % 3)}
           for a, b in [(1, 2), (13, 4), (7, 7), (22, 9), (5, 30), (41, 2), (3, 3), (16, 16), (8, 1), (9, 27)] * 2]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An init_from run dir (random tiny weights, a char tokenizer) and the preference file."""
    root = tmp_path_factory.mktemp("ref")
    cfg = load_config(None, TINY)
    exp = build_experiment(cfg)
    run = root / "base"
    ckpt = TrainCheckpointer(run / "checkpoints", cfg.checkpoint, cfg=cfg, tokenizer_identity=None)
    ckpt.save(1, exp.state, {})
    ckpt.close()
    (run / "tokenizer.model").write_bytes(train_sentencepiece([TEXT * 3] * 20, vocab_size=80, model_type="char"))
    (root / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return root, jax.device_get(exp.state.params)


def _batch(cfg, records):
    from maxtrain.data.formats import RecordEncoder
    from maxtrain.data.lanes import LaneBatcher
    from maxtrain.data.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.data.tokenizer.path)
    encode = RecordEncoder(cfg.data.format, tok)
    docs = [encode(r, f"r{i}") for i, r in enumerate(records)]
    return next(iter(LaneBatcher(docs, global_batch=8, rows=range(8), seq_len=64, pad_id=tok.pad_id, fill="whole",
                                 fields=cfg.data.format.batch_fields())))


def _frozen_experiment(root):
    from maxtrain.checkpoint.resume import init_state_from

    cfg = load_config(None, TINY + FROZEN + [f"init_from={root / 'base'}", f"data.tokenizer.path={root / 'base/tokenizer.model'}"])
    exp = build_experiment(cfg)
    with jax.set_mesh(exp.mesh):
        exp.state = init_state_from(exp, cfg.init_from)
    return cfg, exp


def test_frozen_reference_is_a_copy_with_no_optimizer_state_and_never_moves(base, tmp_path):
    root, base_params = base
    cfg, exp = _frozen_experiment(root)
    params = jax.device_get(exp.state.params)
    flat = lambda t: jax.tree_util.tree_leaves(t)  # noqa: E731
    assert set(params) == set(base_params) | {"reference"}
    for a, b in zip(flat(params["reference"]), flat(base_params)):
        assert np.array_equal(a, b)  # the init_from weights, bitwise
    n_policy = sum(x.size for x in flat(base_params))
    n_opt = sum(np.size(x) for x in flat(exp.state.opt_state))
    assert 2 * n_policy <= n_opt <= 2 * n_policy + 16  # Adam's mu and nu of the policy only: nothing for the reference

    batch = _batch(cfg, RECORDS)
    with jax.set_mesh(exp.mesh):
        sums = jax.device_get(exp.eval_step(exp.state.params, jax.device_put(batch, exp.batch_sharding)))
        assert float(sums["weight"]) >= 8
        assert float(sums["loss_sum"]) / float(sums["weight"]) == pytest.approx(math.log(2), abs=1e-6)
        assert float(sums["rewards/chosen"]) == 0.0 and float(sums["rewards/margins"]) == 0.0
        losses = []
        for _ in range(3):
            exp.state, m = exp.train_step(exp.state, jax.device_put(batch, exp.batch_sharding))
            losses.append(float(m["loss"]))
    after = jax.device_get(exp.state.params)
    for a, b in zip(flat(after["reference"]), flat(base_params)):
        assert np.array_equal(a, b)  # frozen: bitwise unchanged after steps
    moved = [not np.array_equal(a, b) for a, b in zip(flat({k: v for k, v in after.items() if k != "reference"}),
                                                       flat(base_params))]
    assert all(moved) and losses[-1] < losses[0]

    # The reference lives in the checkpoint (resume) but export and generate leave it out.
    run = tmp_path / "dpo"
    ckpt = TrainCheckpointer(run / "checkpoints", cfg.checkpoint, cfg=cfg, tokenizer_identity=None)
    ckpt.save(3, exp.state, {})
    ckpt.close()
    from maxtrain.checkpoint.params import saved_tree_metadata

    assert "reference" in saved_tree_metadata(run / "checkpoints/3/params", frozen=True)
    assert main(["export", str(run), str(tmp_path / "export")]) == 0
    assert "reference" not in saved_tree_metadata(tmp_path / "export/params", frozen=True)
    from maxtrain.generate import load_generator

    from maxtrain.finetune.init import load_pretrained

    with jax.set_mesh(exp.mesh):  # a frozen run's checkpoint read by a frozen run (eval, resume): its own reference
        again = jax.device_get(load_pretrained(str(run), exp.state.params))
    assert all(np.array_equal(a, b) for a, b in zip(flat(again), flat(after)))
    gen, _, _ = load_generator(str(run))
    assert "reference" not in gen.params
    for a, b in zip(flat(jax.device_get(gen.params)), flat({k: v for k, v in after.items() if k != "reference"})):
        assert np.array_equal(a, b)


def test_precomputed_reference_logps_equal_the_in_step_reference(base, tmp_path, capsys):
    from maxtrain.objectives_preference import pair_mask, pairs, sequence_logps

    root, _ = base
    out = tmp_path / "pref_ref.jsonl"
    assert main(["preference", "reference", "--model", str(root / "base"), "--data", str(root / "pref.jsonl"),
                 "--out", str(out), "--template", "plain", "--seq-len", "64", "--batch-size", "8"]) == 0
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert [{k: w[k] for k in ("prompt", "chosen", "rejected")} for w in written] == RECORDS

    cfg, exp = _frozen_experiment(root)  # the in-step reference: params["reference"] = the base weights
    batch = _batch(cfg, RECORDS)
    with jax.set_mesh(exp.mesh):
        ref, _ = sequence_logps(exp.apply_fn, exp.state.params["reference"], jax.device_put(batch, exp.batch_sharding))
    c, r = (np.asarray(x) for x in pairs(ref))
    mask = np.asarray(pair_mask(batch["segment_ids"])) > 0
    n = int(mask.sum())
    assert n >= 8
    ours = np.array([[w["ref_chosen_logps"], w["ref_rejected_logps"]] for w in written[:n]])
    assert np.abs(ours[:, 0] - c[mask]).max() <= 1e-5 and np.abs(ours[:, 1] - r[mask]).max() <= 1e-5
    assert ours.min() < -1.0  # real log-probs (a random model), not zeros

    # A precomputed run on the written file starts where the frozen one does: loss log 2, rewards 0.
    pre = load_config(None, TINY + ["train.objective=dpo", "train.preference.reference=precomputed",
                                    f"data.tokenizer.path={root / 'base/tokenizer.model'}"])
    exp2 = build_experiment(pre)
    from maxtrain.finetune.init import load_pretrained

    with jax.set_mesh(exp2.mesh):
        params = load_pretrained(str(root / "base"), exp2.state.params)
        sums = jax.device_get(exp2.eval_step(params, jax.device_put(_batch(pre, written), exp2.batch_sharding)))
    assert abs(float(sums["rewards/margins"])) / float(sums["weight"]) <= 1e-6


def _run_train(tmp_path, root, extra, capsys):
    over = TINY + [f"run_dir={tmp_path / 'run'}", f"data.tokenizer.path={root / 'base/tokenizer.model'}",
                   f"data.sources=[{{type: jsonl, path: {root / 'pref.jsonl'}}}]", *extra]
    capsys.readouterr()
    code = main(["train", *over])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("extra, why", [
    (["train.objective=dpo", "train.preference.reference=precomputed", "data.format={type: sft}"],
     "train.objective=dpo needs preference pairs; set data.format.type=preference"),
    (["train.objective=reward", "data.format={type: sft}", "finetune.classifier={num_labels: 1, pooling: last}"],
     "train.objective=reward needs preference pairs"),
    (["train.objective=reward"], "needs a scalar head on the last token"),
    (["train.objective=reward", "finetune.classifier={num_labels: 2, pooling: last}"], "needs a scalar head"),
    (["train.objective=reward", "finetune.classifier={num_labels: 1, pooling: mean}"], "needs a scalar head"),
    (["train.objective=dpo"], "reference=adapters_off needs LoRA adapters"),
    (["train.objective=dpo", "train.preference.reference=frozen"], "reference=frozen copies the weights the run "
                                                                     "starts from; set init_from"),
    (["train.objective=dpo", "train.preference.reference=copy"], "reference"),
    (["train.objective=dpo", "train.preference.beta=0", "train.preference.reference=precomputed"], "beta"),
])  # fmt: skip
def test_preference_config_errors_are_one_line_exit_2(base, tmp_path, capsys, extra, why):
    root, _ = base
    code, err = _run_train(tmp_path, root, extra, capsys)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("maxtrain: error:") and why in err


def test_score_and_reference_commands_refuse_bad_input(base, tmp_path, capsys):
    root, _ = base
    (tmp_path / "c.jsonl").write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "1+1=", "chosen": "2"}) + "\n")
    cases = [
        (["score", "--checkpoint", str(root / "base"), "--data", str(tmp_path / "c.jsonl")], "no scalar reward head"),
        (["preference", "reference", "--model", str(root / "base"), "--data", str(tmp_path / "none.jsonl"),
          "--out", str(tmp_path / "o.jsonl")], "does not exist"),
        (["preference", "reference", "--model", str(root / "base"), "--data", str(tmp_path / "bad.jsonl"),
          "--out", str(tmp_path / "o.jsonl")], "missing field 'rejected'"),
        (["preference", "reference", "--model", str(tmp_path), "--data", str(root / "pref.jsonl"),
          "--out", str(tmp_path / "o.jsonl")], "holds no maxtrain params"),
    ]  # fmt: skip
    for argv, why in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and why in err, err


def test_memory_of_the_three_references():
    """Bytes of the training state and of the compiled step's temporaries, DPO vs SFT on one shape (36 MB of weights):
    adapters_off adds nothing, frozen adds exactly one copy of the weights and no optimizer state, precomputed adds
    nothing. Printed for the README (pytest -s)."""
    from tests.test_preference_objectives import pref_batches

    shape = ["model=tiny-llama", "model.d_model=512", "model.num_heads=8", "model.num_kv_heads=8", "model.ffn_dim=2048",
             "model.vocab_size=512", "train.global_batch=8", "train.seq_len=48", "data.format.type=preference"]  # fmt: skip
    lora = ["finetune.lora={rank: 4, alpha: 8.0, targets: [q, v]}"]
    runs = {"sft (full)": ["train.objective=sft"], "dpo frozen": FROZEN + ["init_from=/unused"],
            "dpo precomputed": ["train.objective=dpo", "train.preference.reference=precomputed"],
            "sft (lora)": ["train.objective=sft", *lora], "dpo adapters_off": ["train.objective=dpo", *lora]}  # fmt: skip
    batch = pref_batches(1)[0]
    nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))  # noqa: E731
    out = {}
    for name, extra in runs.items():
        exp = build_experiment(load_config(None, shape + extra), devices=jax.devices()[:1])
        with jax.set_mesh(exp.mesh):
            compiled = exp.train_step.lower(exp.state, jax.device_put(batch, exp.batch_sharding)).compile()
        out[name] = (nbytes(exp.state.params), nbytes(exp.state.opt_state), compiled.memory_analysis().temp_size_in_bytes)
        print(f"{name}: params {out[name][0] / 1e6:.2f} MB, optimizer state {out[name][1] / 1e6:.2f} MB, "
              f"step temporaries {out[name][2] / 1e6:.2f} MB")
    weights = out["sft (full)"][0]
    assert weights > 30e6
    assert out["dpo frozen"][0] == 2 * weights and out["dpo frozen"][1] == out["sft (full)"][1]  # one copy, no state
    assert out["dpo precomputed"][:2] == out["sft (full)"][:2]
    assert out["dpo adapters_off"][:2] == out["sft (lora)"][:2]
    for dpo, sft in (("dpo frozen", "sft (full)"), ("dpo precomputed", "sft (full)"), ("dpo adapters_off", "sft (lora)")):
        assert out[dpo][2] - out[sft][2] < 0.05 * weights, (dpo, out)  # no hidden copy in the step either

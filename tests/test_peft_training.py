"""Every finetuning method trains on the one step: compiled once, only its leaves move, loss goes down; bad input is one line.

The tiny task: one fixed packed batch (two documents per row) of Zipf-distributed tokens,
from a random base (init_std 0.2, so its states can move the logits); 12 steps at lr 3e-2.
Stated margins (nats of loss removed; measured on 2 CPU cores: adapter 1.47, prompt 0.71,
prefix 0.59, ia3 0.39); the base weights stay bitwise unchanged.
"""

import inspect

import jax
import numpy as np
import pytest

from maxtrain.cli import main
from maxtrain.config import load_config
from maxtrain.experiment import build_experiment
from maxtrain.finetune.trainable import count_params, path_name, tree_bytes
from maxtrain.step import build_train_step
from tests.synthetic import random_batch

TINY = ["model=tiny-llama", "model.vocab_size=128", "model.d_model=32", "model.ffn_dim=64", "train.global_batch=4",
        "train.seq_len=32", "optimizer.warmup_steps=0", "optimizer.lr=3e-2", "optimizer.weight_decay=0", "steps=12",
        "mesh.fsdp=1", "mesh.data=1", "model.init_std=0.2"]  # fmt: skip
METHODS = {
    "adapter": ["finetune.adapter={size: 8, placement: houlsby}"],
    "ia3": ["finetune.ia3={targets: [k, v, down]}"],
    "prompt_tuning": ["finetune.prompt_tuning={num_virtual_tokens: 4, init: random}"],
    "prefix_tuning": ["finetune.prefix_tuning={num_virtual_tokens: 4, reparameterize: true}"],
}
MARGIN = {"adapter": 1.0, "ia3": 0.25, "prompt_tuning": 0.4, "prefix_tuning": 0.4}


def _zipf_batch():
    b = random_batch(4, 32, 128, seed=0, docs_per_row=2)
    p = 1.0 / np.arange(1, 129)
    stream = np.random.default_rng(0).choice(128, size=(4, 33), p=p / p.sum()).astype(np.int32)
    b["tokens"], b["targets"] = stream[:, :-1], stream[:, 1:]
    return b


def _flat(params):
    return {path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_only_its_leaves_on_the_one_step_compiled_once(name):
    exp = build_experiment(load_config(None, TINY + METHODS[name]), devices=jax.devices()[:1])
    before = _flat(exp.state.params)
    batch = jax.device_put(_zipf_batch(), exp.batch_sharding)
    losses = []
    with jax.set_mesh(exp.mesh):
        for _ in range(12):
            exp.state, metrics = exp.train_step(exp.state, batch)
            losses.append(float(metrics["loss"]))
    assert exp.train_step._cache_size() == 1
    # The same step function as every other mode (tests/test_finetune.py): only its arguments differ.
    inner = [c for c in build_train_step.__code__.co_consts if inspect.iscode(c) and c.co_name == "train_step"][0]
    assert exp.train_step.__wrapped__.__code__ is inner
    assert losses[0] - losses[-1] >= MARGIN[name], (name, losses[0], losses[-1])
    after, ts = _flat(exp.state.params), exp.trainable
    moved = [n for n in before if not np.array_equal(before[n], after[n])]
    assert moved and all(ts.is_trainable(n) for n in moved)
    assert all(name.split("_")[0] in n or "adapter" in n for n in moved), moved
    trained, total = count_params(exp.state.params, ts)
    assert trained / total < 0.2
    assert tree_bytes(exp.state.opt_state) <= 2 * 4 * trained + 64  # Adam moments for the method's leaves only


BAD = {
    "missing module": (["model=tiny-gpt2", "train.seq_len=64", "finetune.ia3={targets: [k, v, gate], feedforward: []}"],
                       ["finetune.ia3.targets names 'gate'", "remove gate"]),
    "no room": (["train.seq_len=16", "finetune.prompt_tuning={num_virtual_tokens: 16}"],
                ["finetune.prompt_tuning.num_virtual_tokens=16 leaves no room in train.seq_len=16"]),
    "conflict": (["finetune.prompt_tuning={num_virtual_tokens: 4}", "finetune.prefix_tuning={num_virtual_tokens: 4}"],
                 ["cannot be combined", "keep one of them"]),
    "lora and ia3": (["finetune.lora={rank: 2}", "finetune.ia3={}"], ["finetune.ia3 and finetune.lora cannot be combined"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_method_config_is_one_line_exit_2_nothing_written(case, tmp_path, capsys):
    overrides, expected = BAD[case]
    code = main(["train", "model=tiny-llama", f"run_dir={tmp_path}/run", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    for fragment in expected:
        assert fragment in err, err
    assert not (tmp_path / "run").exists()


class _CharTokenizer:
    def encode(self, text):
        return [ord(c) % 128 for c in text]


def test_init_from_sets_the_soft_prompt_from_text_or_vocabulary_and_generation_matches_the_forward(tmp_path):
    """init: text -> the embeddings of the text's tokens (repeated to length); vocab -> sampled rows of the loaded embedding.

    Then KV-cache generation (greedy, through Generator) equals re-running the full forward on the growing sequence.
    """
    from maxtrain.checkpoint import save_params
    from maxtrain.checkpoint.resume import init_state_from
    from maxtrain.experiment import finetuned_model_config
    from maxtrain.generate import Generator, Sampling

    base_cfg = load_config(None, TINY)
    base = build_experiment(base_cfg, devices=jax.devices()[:1])
    save_params(tmp_path / "base", base.state.params, cfg=base_cfg)
    emb = np.asarray(base.state.params["embedding"])
    for init, text in (("text", "abc"), ("vocab", None)):
        extra = f", text: {text}" if text else ""
        cfg = load_config(None, TINY + [f"finetune.prompt_tuning={{num_virtual_tokens: 4, init: {init}{extra}}}"])
        exp = build_experiment(cfg, devices=jax.devices()[:1])
        params = init_state_from(exp, str(tmp_path / "base"), _CharTokenizer()).params
        soft = np.asarray(params["prompt_tuning"]["embedding"])
        if init == "text":
            np.testing.assert_array_equal(soft, emb[[97, 98, 99, 97]])
        else:
            assert all(any(np.array_equal(row, e) for e in emb) for row in soft)
        np.testing.assert_array_equal(np.asarray(params["embedding"]), emb)  # the base itself is loaded unchanged

    prompt = [5, 9, 17, 33, 2]
    for method in ("prompt_tuning={num_virtual_tokens: 4}", "prefix_tuning={num_virtual_tokens: 4, reparameterize: true}"):
        cfg = load_config(None, TINY + ["finetune." + method])
        exp = build_experiment(cfg, devices=jax.devices()[:1])
        params = jax.tree.map(lambda x: x + 0.0, exp.state.params)
        gen = Generator(finetuned_model_config(cfg), params, mesh=exp.mesh, rules=cfg.mesh.rules)
        got = gen.generate([prompt], Sampling(max_new_tokens=6))[0]
        forward = jax.jit(exp.apply_fn)
        seq = list(prompt)
        for _ in range(6):  # causal: the logits at the last real token ignore the zeros after it
            logits = np.asarray(forward(params, np.array([seq + [0] * (11 - len(seq))], np.int32)))
            seq.append(int(logits[0, len(seq) - 1].argmax()))
        assert got == seq[len(prompt):], (method, got, seq)

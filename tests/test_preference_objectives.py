"""Reward model and DPO on the one step: per-sequence sums from packed pairs equal unpacked ones, DPO starts at
exactly log 2 with zero rewards, microbatches equal the full batch (pairs never split), one compile, the frozen
base (the LoRA run's reference) is bitwise unchanged, and both objectives learn a toy preference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxtrain.config import load_config
from maxtrain.data.lanes import LaneBatcher
from maxtrain.data.preference import SEQUENCE_FIELDS, pair_element_from_ids
from maxtrain.experiment import build_experiment, build_objective
from maxtrain.objectives import token_cross_entropy
from maxtrain.objectives_preference import pairs, sequence_logps

TINY = ["model=tiny-llama", "model.num_heads=4", "model.num_kv_heads=2", "model.d_model=32", "model.ffn_dim=64",
        "model.vocab_size=64", "train.global_batch=8", "train.seq_len=48", "optimizer.warmup_steps=1", "steps=20",
        "optimizer.lr=3e-3", "optimizer.weight_decay=0", "data.format.type=preference", "train.attention_query_block=0"]  # fmt: skip
LORA = ["finetune.lora={rank: 4, alpha: 8.0, targets: [q, k, v, o, gate, up, down]}"]
REWARD = ["train.objective=reward", "finetune.classifier={num_labels: 1, pooling: last}"]


def pair_elements(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """Toy pairs: a random prompt; chosen ends in an even token run, rejected in an odd one (learnable)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = [1] + list(rng.integers(4, vocab, rng.integers(2, 6)))
        k = int(rng.integers(2, 5))
        good = list(2 * rng.integers(2, vocab // 2, k))
        bad = list(2 * rng.integers(2, vocab // 2, k) + 1)
        out.append(pair_element_from_ids([int(t) for t in prompt], [int(t) for t in good] + [2], [int(t) for t in bad] + [2],
                                         reference_logps=(-1.0 - i % 3, -2.0)))
    return out


def pref_batches(count: int, rows: int = 8, seq_len: int = 48, vocab: int = 64, seed: int = 0):
    docs = pair_elements(rows * count * 3, vocab, seed)
    it = LaneBatcher(docs, global_batch=rows, rows=range(rows), seq_len=seq_len, pad_id=0, fill="whole", fields=SEQUENCE_FIELDS)
    return [next(it) for _ in range(count)]


def test_packed_sequence_logps_equal_each_sequence_alone():
    exp = build_experiment(load_config(None, TINY + LORA + ["train.objective=dpo"]), devices=jax.devices()[:1])
    batch = pref_batches(1)[0]
    assert (batch["segment_ids"].max(axis=1) >= 4).all()  # at least two pairs per row: a real packing test
    logps, counts = sequence_logps(exp.apply_fn, exp.state.params, batch)
    logps = np.asarray(logps)
    for row in (0,):
        for s in range(1, min(4, int(batch["segment_ids"][row].max())) + 1):  # two pairs (one compile per length)
            idx = np.flatnonzero(batch["segment_ids"][row] == s)
            toks = batch["tokens"][row, idx][None]
            logits = exp.apply_fn(exp.state.params, jnp.asarray(toks))
            nll, _, _ = token_cross_entropy(logits, jnp.asarray(batch["targets"][row, idx][None]))
            alone = -float(jnp.sum(nll[0] * batch["loss_weights"][row, idx]))
            assert logps[row, s] == pytest.approx(alone, abs=1e-5)
    c, r = pairs(counts)
    assert float(jnp.sum(c)) > 0 and float(jnp.sum(r)) > 0


def _metrics(exp, batch):
    with jax.set_mesh(exp.mesh):
        sums = exp.eval_step(exp.state.params, jax.device_put(batch, exp.batch_sharding))
    w = float(sums["weight"])
    return {k: float(v) / w for k, v in sums.items() if k != "weight"}, w


@pytest.mark.parametrize("extra", [LORA + ["train.objective=dpo"], REWARD])
def test_step_zero_is_log_two_with_zero_rewards(extra):
    exp = build_experiment(load_config(None, TINY + extra))
    m, pairs_n = _metrics(exp, pref_batches(1)[0])
    assert pairs_n >= 16
    # Each pair's loss is exactly log 2 (policy == reference bitwise with lora_b = 0; the head starts at zero);
    # the mean over pairs only carries the f32 rounding of the sum.
    assert m["loss_sum"] == pytest.approx(math.log(2), abs=1e-6)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "reward_chosen", "reward_rejected"):
        if k in m:
            assert m[k] == 0.0


def _train(overrides, batches):
    exp = build_experiment(load_config(None, TINY + overrides))
    out = []
    with jax.set_mesh(exp.mesh):
        for b in batches:
            exp.state, metrics = exp.train_step(exp.state, jax.device_put(b, exp.batch_sharding))
            out.append({k: float(v) for k, v in metrics.items()})
    return exp, out


@pytest.mark.parametrize("extra", [LORA + ["train.objective=dpo", "train.preference.loss=ipo"], REWARD])
def test_microbatches_equal_the_full_batch_and_compile_once(extra):
    batches = pref_batches(2)
    mesh = ["mesh.fsdp=4", "mesh.tensor=2"]  # each microbatch of 4 rows still spans the data-parallel devices
    full, m1 = _train(extra + mesh, batches)
    micro, m2 = _train(extra + mesh + ["train.microbatches=2"], batches)
    for a, b in zip(m1, m2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    for x, y in zip(jax.tree.leaves(full.state.params), jax.tree.leaves(micro.state.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-6)
    assert full.train_step._cache_size() == 1
    if "train.objective=reward" in extra:
        return  # the mesh check below is the step's, once is enough
    # Another mesh (2-way data x 4-way fsdp instead of 4-way fsdp x 2-way tensor): the same losses.
    _, m3 = _train(extra + ["mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1"], batches)
    for a, c in zip(m1, m3):
        assert a["loss"] == pytest.approx(c["loss"], rel=1e-5, abs=1e-6)


def test_dpo_learns_and_keeps_the_frozen_reference_bitwise():
    batches = pref_batches(10)
    exp0 = build_experiment(load_config(None, TINY + LORA + ["train.objective=dpo"]))
    flat0 = [(jax.tree_util.keystr(p), np.asarray(x)) for p, x in jax.tree_util.tree_flatten_with_path(exp0.state.params)[0]]
    exp, ms = _train(LORA + ["train.objective=dpo", "train.preference.beta=0.5", "optimizer.lr=2e-2"], batches * 2)
    flat1 = dict((jax.tree_util.keystr(p), np.asarray(x)) for p, x in jax.tree_util.tree_flatten_with_path(exp.state.params)[0])
    for name, x in flat0:
        if "lora" not in name:
            np.testing.assert_array_equal(flat1[name], x)  # the reference (the base) never moves
    assert ms[-1]["loss"] < ms[0]["loss"] - 0.1
    assert ms[-1]["rewards/accuracies"] > 0.8 and ms[-1]["rewards/margins"] > 0
    held_out, _ = _metrics(exp, pref_batches(1, seed=7)[0])
    assert held_out["rewards/accuracies"] > 0.7


def test_reward_model_learns_pairwise_accuracy():
    exp, ms = _train(REWARD + ["optimizer.lr=1e-2"], pref_batches(10) * 2)
    assert ms[-1]["loss"] < ms[0]["loss"] - 0.2
    held_out, _ = _metrics(exp, pref_batches(1, seed=7)[0])
    assert held_out["accuracy"] > 0.8


def test_precomputed_reference_reads_the_batch():
    cfg = load_config(None, TINY + ["train.objective=dpo", "train.preference.reference=precomputed"])
    exp = build_experiment(cfg, devices=jax.devices()[:1])
    batch = pref_batches(1)[0]
    logps, _ = sequence_logps(exp.apply_fn, exp.state.params, batch)
    pc, pr = pairs(logps)
    objective = build_objective(cfg, exp.apply_fn)
    _, sums = objective(exp.state.params, batch, None)
    # reference_logps are -1-(i%3) for chosen and -2 for rejected: rewards = beta * (policy - reference)
    seg = jnp.asarray(batch["segment_ids"])
    from maxtrain.objectives_preference import pair_mask, sequence_sums

    rc, rr = pairs(sequence_sums(jnp.asarray(batch["reference_logps"]), seg))
    w = pair_mask(seg)
    assert float(sums["rewards/chosen"]) == pytest.approx(float(jnp.sum(0.1 * (pc - rc) * w)), rel=1e-5)
    assert float(jnp.sum(rr * w)) == pytest.approx(-2.0 * float(jnp.sum(w)))


def test_lora_base_reference_needs_no_second_copy_of_the_weights():
    # Weights dominate this shape (36 MB of params, <1 MB of logits): a copy of the base for the
    # reference would show in the compiled step's temporaries. DPO's step needs what SFT's needs.
    shape = ["model=tiny-llama", "model.d_model=512", "model.num_heads=8", "model.num_kv_heads=8", "model.ffn_dim=2048",
             "model.vocab_size=512", "train.global_batch=8", "train.seq_len=48", "data.format.type=preference",
             "finetune.lora={rank: 4, alpha: 8.0, targets: [q, v]}"]  # fmt: skip
    batch = pref_batches(1)[0]
    temp = {}
    for objective in ("sft", "dpo"):
        exp = build_experiment(load_config(None, shape + [f"train.objective={objective}"]), devices=jax.devices()[:1])
        with jax.set_mesh(exp.mesh):
            compiled = exp.train_step.lower(exp.state, jax.device_put(batch, exp.batch_sharding)).compile()
        temp[objective] = compiled.memory_analysis().temp_size_in_bytes
        param_bytes = sum(x.nbytes for x in jax.tree.leaves(exp.state.params))
    assert param_bytes > 30e6
    assert temp["dpo"] - temp["sft"] < 0.05 * param_bytes, (temp, param_bytes)

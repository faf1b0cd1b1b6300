"""The encoder switches (BERT / RoBERTa): published sizes, padding isolation, the masked_lm objective, meshes.

Numeric parity with transformers (BertForMaskedLM, RobertaForMaskedLM, the classifiers)
is in tests/test_convert_encoder.py, which converts random tiny HF models.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxtrain.config import load_config
from maxtrain.errors import UserError
from maxtrain.experiment import build_experiment, check_objective_fits_model, finetuned_model_config
from maxtrain.model.transformer import Transformer
from maxtrain.objectives import masked_lm_objective
from tests.synthetic import random_batch

# Hugging Face model cards count the base model with its pooler, without the MLM head.
PUBLISHED = {"bert-base-uncased": 109_482_240, "bert-large-uncased": 335_141_888, "roberta-base": 124_645_632}
MLM_HEAD = {"bert-base-uncased": 768 * 768 + 3 * 768 + 30522, "bert-large-uncased": 1024 * 1024 + 3 * 1024 + 30522,
            "roberta-base": 768 * 768 + 3 * 768 + 50265}  # fmt: skip


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_encoder_presets_have_published_parameter_counts(preset):
    cfg = load_config(None, [f"model={preset}"]).model
    shapes = jax.eval_shape(lambda r: Transformer(cfg).init(r, jnp.zeros((1, 4), jnp.int32)), jax.random.PRNGKey(0))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == cfg.param_count()
    assert cfg.param_count(heads=False) == PUBLISHED[preset]
    assert cfg.param_count() == PUBLISHED[preset] + MLM_HEAD[preset]


def _init(cfg, seq=8):
    return nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(1), jnp.zeros((1, seq), jnp.int32))["params"])


def _tiny(preset="tiny-bert"):
    return load_config(None, [f"model={preset}", "model.vocab_size=64"]).model


@pytest.mark.parametrize("preset", ["tiny-bert", "tiny-roberta"])
def test_padding_and_other_documents_never_reach_real_tokens(preset):
    """Bidirectional attention still stays inside a segment: padding (0) and the next document are invisible."""
    cfg = _tiny(preset)
    params = _init(cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 64, (1, 20))
    segments = np.array([[1] * 9 + [2] * 7 + [0] * 4])
    positions = np.array([list(range(9)) + list(range(7)) + [0] * 4])
    fn = jax.jit(lambda t: Transformer(cfg).apply({"params": params}, t, positions, segments, return_hidden=True))
    base = np.asarray(fn(tokens))
    changed = tokens.copy()
    changed[0, 9:] = rng.integers(5, 64, 11)  # a different second document and padding
    np.testing.assert_array_equal(np.asarray(fn(changed))[0, :9], base[0, :9])
    alone = jax.jit(lambda t: Transformer(cfg).apply({"params": params}, t, return_hidden=True))(tokens[:, :9])
    np.testing.assert_allclose(np.asarray(alone)[0], base[0, :9], atol=1e-5)
    assert "final_norm" not in params and params["layers"]["attn_norm"]["scale"].shape == (2, 64)  # post-norm


def _mlm_batch(batch=8, seq=32, vocab=64, seed=0, mask_id=4, types=True):
    """A packed MLM batch: 15% of real positions replaced by mask_id, weighted, with their original ids as targets."""
    b = random_batch(batch, seq, vocab, seed=seed, docs_per_row=2)
    rng = np.random.default_rng(seed)
    original = np.maximum(b["tokens"], 5)
    chosen = rng.random(original.shape) < 0.15
    chosen[:, 0] = True  # at least one per row
    out = {
        "tokens": np.where(chosen, mask_id, original).astype(np.int32),
        "targets": original.astype(np.int32),
        "loss_weights": chosen.astype(np.float32),
        "segment_ids": b["segment_ids"],
        "positions": b["positions"],
    }
    if types:
        out["token_type_ids"] = (b["segment_ids"] == 2).astype(np.int32)
    return out


def test_masked_lm_objective_is_cross_entropy_on_the_weighted_positions():
    torch = pytest.importorskip("torch")
    cfg = _tiny()
    model = Transformer(cfg)
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(2), x.shape), _init(cfg))
    apply_fn = lambda p, *a, **kw: model.apply({"params": p}, *a, **kw)  # noqa: E731
    batch = _mlm_batch()
    objective = jax.jit(masked_lm_objective(apply_fn))
    loss_sum, metrics = objective(params, batch, None)

    logits = np.asarray(jax.jit(apply_fn)(params, batch["tokens"], batch["positions"], batch["segment_ids"],
                                          token_type_ids_BxS=batch["token_type_ids"]))  # fmt: skip
    picked = batch["loss_weights"] > 0
    want = torch.nn.functional.cross_entropy(
        torch.tensor(logits[picked]), torch.tensor(batch["targets"][picked], dtype=torch.long), reduction="sum"
    ).item()
    assert abs(float(loss_sum) - want) <= 1e-4 * want
    assert float(metrics["weight"]) == picked.sum()
    assert float(metrics["correct"]) == (logits[picked].argmax(-1) == batch["targets"][picked]).sum()
    # token types matter (BERT), and a batch without them reads as all zeros
    no_types = {k: v for k, v in batch.items() if k != "token_type_ids"}
    zeros = dict(no_types, token_type_ids=np.zeros_like(batch["token_type_ids"]))
    assert float(objective(params, no_types, None)[0]) == float(objective(params, zeros, None)[0])
    assert abs(float(objective(params, no_types, None)[0]) - float(loss_sum)) > 1e-3


def test_chunked_masked_lm_loss_equals_the_whole_sequence():
    cfg = _tiny("tiny-roberta")
    model = Transformer(cfg)
    params = _init(cfg)
    apply_fn = lambda p, *a, **kw: model.apply({"params": p}, *a, **kw)  # noqa: E731
    batch = _mlm_batch(types=False)
    whole = jax.jit(jax.value_and_grad(lambda p: masked_lm_objective(apply_fn)(p, batch, None)[0]))(params)
    chunked = jax.jit(jax.value_and_grad(lambda p: masked_lm_objective(apply_fn, loss_chunk=12)(p, batch, None)[0]))(params)
    np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(chunked[1]), jax.tree.leaves(whole[1])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)  # f32 sums in another order


def _with_objective(cfg, objective):
    # Set without validation, so these tests do not depend on the run config's objective list.
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"objective": objective})})


def test_objective_model_mismatches_are_user_errors():
    bert = load_config(None, ["model=tiny-bert"])
    for objective in ("causal_lm", "sft"):
        with pytest.raises(UserError, match=f"train.objective={objective} needs a causal model but model.causal=false"):
            finetuned_model_config(_with_objective(bert, objective))
    llama = load_config(None, ["model=tiny-llama"])
    with pytest.raises(UserError, match="train.objective=masked_lm needs a bidirectional encoder"):
        finetuned_model_config(_with_objective(llama, "masked_lm"))
    with pytest.raises(UserError, match="set model.mlm_head=true"):
        check_objective_fits_model("masked_lm", bert.model.model_copy(update={"mlm_head": False}))
    finetuned_model_config(_with_objective(bert, "masked_lm"))  # the fitting pair passes


TINY = ["model=tiny-bert", "model.vocab_size=64", "train.global_batch=8", "train.seq_len=32", "optimizer.warmup_steps=0",
        "steps=4", "optimizer.lr=1e-2"]  # fmt: skip


def test_encoder_meshes_give_the_same_masked_lm_losses():
    """fsdp x tensor = 1x8 and 8x1 agree to 1e-5 over 4 masked-LM steps on one memorised batch, and the loss falls."""
    batch = _mlm_batch()
    runs = {}
    for fsdp, tensor in [(1, 8), (8, 1)]:
        cfg = _with_objective(load_config(None, TINY + [f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}"]), "masked_lm")
        exp = build_experiment(cfg)
        losses = []
        with jax.set_mesh(exp.mesh):
            for _ in range(4):
                exp.state, metrics = exp.train_step(exp.state, jax.device_put(batch, exp.batch_sharding))
                losses.append(float(metrics["loss"]))
        runs[(fsdp, tensor)] = np.array(losses)
    ref = runs[(8, 1)]
    assert ref[-1] < ref[0] - 0.5, ref
    np.testing.assert_allclose(runs[(1, 8)], ref, atol=1e-5, rtol=0)

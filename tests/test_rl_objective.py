"""The GRPO / RLOO objective on a fixed rollout batch: advantages and loss equal a hand computation and TRL's
GRPOTrainer loss (a test-only extra) on a tiny random HF Llama converted with from-hf; one step on the loss
raises the log-probability of the completions with positive advantage and lowers the others."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxtrain.objectives_rl import group_advantages, grpo_objective, token_logps
from maxtrain.rl.rollouts import rollout_rows

V, G, C = 128, 4, 6
PROMPTS = [np.array([1, 5, 9, 3, 7], np.int32), np.array([1, 40, 41, 42, 43], np.int32)]  # equal lengths: no padding in TRL


def _completions(seed=0):
    """[N, C] sampled-looking completions: some end in EOS (2) early, one runs to the limit."""
    rng = np.random.default_rng(seed)
    out = rng.integers(3, V, size=(len(PROMPTS) * G, C)).astype(np.int32)
    for r, end in enumerate([2, 5, 3, None, 1, 4, None, 2]):
        if end is not None:
            out[r, end] = 2
            out[r, end + 1 :] = 0
    return out


def test_advantages_equal_the_hand_computation():
    r = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 2.0]], np.float32)
    mean, std = r.mean(1, keepdims=True), r.std(1, ddof=1, keepdims=True)
    np.testing.assert_allclose(group_advantages(r), (r - mean) / (std + 1e-4), rtol=1e-6)
    np.testing.assert_allclose(group_advantages(r, scale="none"), r - mean, rtol=1e-6)
    np.testing.assert_allclose(group_advantages(r, scale="batch"), (r - mean) / (r.std(ddof=1) + 1e-4), rtol=1e-6)
    loo = np.stack([r[:, i] - np.delete(r, i, axis=1).mean(1) for i in range(4)], axis=1)
    np.testing.assert_allclose(group_advantages(r, baseline="leave_one_out", scale="none"), loo, rtol=1e-6)
    assert np.all(group_advantages(r)[1] == 0)  # a group of equal rewards teaches nothing
    np.testing.assert_allclose(np.asarray(group_advantages(jnp.asarray(r))), group_advantages(r), rtol=1e-6)


def test_rollout_rows_weigh_exactly_the_completion_tokens():
    comp = _completions()
    batch, lengths = rollout_rows(PROMPTS, comp, group_size=G, seq_len=16, eos_id=2, pad_id=0)
    assert lengths.tolist() == [3, 6, 4, 6, 2, 5, 6, 3]  # through the first EOS, else the limit
    for r in range(8):
        p, c = len(PROMPTS[r // G]), lengths[r]
        assert batch["tokens"][r, :p].tolist() == PROMPTS[r // G].tolist()
        assert batch["tokens"][r, p : p + c].tolist() == comp[r, :c].tolist()
        weighted = np.flatnonzero(batch["loss_weights"][r])
        assert weighted.tolist() == list(range(p - 1, p + c - 1))
        assert batch["targets"][r, weighted].tolist() == comp[r, :c].tolist()
        assert batch["segment_ids"][r].sum() == p + c


def _model():
    from maxtrain.config import load_config
    from maxtrain.experiment import build_experiment

    cfg = load_config(None, ["model=tiny-llama", f"model.vocab_size={V}", "mesh.data=1", "train.global_batch=8",
                             "train.seq_len=16"])
    exp = build_experiment(cfg, devices=jax.devices()[:1])
    return exp.apply_fn, exp.state.params


def _fields(apply_fn, params, *, seed=0):
    batch, _ = rollout_rows(PROMPTS, _completions(), group_size=G, seq_len=16, eos_id=2, pad_id=0)
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(len(PROMPTS), G)).astype(np.float32)
    adv = group_advantages(rewards).reshape(-1)
    batch["advantages"] = (adv[:, None] * (batch["loss_weights"] > 0)).astype(np.float32)
    logp = np.asarray(token_logps(apply_fn, params, {k: jnp.asarray(v) for k, v in batch.items()})[0])
    # Old and reference log-probs off the current ones by up to +-0.4 nats: the clip bites on some tokens.
    batch["old_logps"] = (logp + rng.uniform(-0.4, 0.4, logp.shape)).astype(np.float32)
    batch["reference_logps"] = (logp + rng.uniform(-0.4, 0.4, logp.shape)).astype(np.float32)
    return {k: jnp.asarray(v) for k, v in batch.items()}, logp


def _row_advantages(batch):
    """Each row's advantage (the value on its first weighted token)."""
    w, a = np.asarray(batch["loss_weights"]), np.asarray(batch["advantages"])
    return a[np.arange(len(w)), np.argmax(w > 0, axis=1)]


def _hand_loss(batch, logp, *, eps, beta, aggregation):
    w = np.asarray(batch["loss_weights"])
    a, old, ref = (np.asarray(batch[k]) for k in ("advantages", "old_logps", "reference_logps"))
    ratio = np.exp(logp - old)
    per = -np.minimum(ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a) + beta * (np.exp(ref - logp) - (ref - logp) - 1)
    if aggregation == "sequence":
        return np.mean((per * w).sum(1) / w.sum(1))
    if aggregation == "token":
        return (per * w).sum() / w.sum()
    return (per * w).sum() / (w.shape[0] * C)


@pytest.mark.parametrize("aggregation", ["sequence", "token", "constant"])
def test_loss_equals_the_hand_computation(aggregation):
    apply_fn, params = _model()
    batch, logp = _fields(apply_fn, params)
    obj = grpo_objective(apply_fn, epsilon=0.2, beta=0.04, aggregation=aggregation, max_completion_len=C,
                         fresh_rollouts=False)
    loss_sum, m = obj(params, batch, None)
    expected = _hand_loss(batch, logp, eps=0.2, beta=0.04, aggregation=aggregation)
    np.testing.assert_allclose(float(loss_sum / m["weight"]), expected, rtol=1e-5, atol=1e-6)
    assert 0 < float(m["clip_ratio"] / m["weight"]) < 1  # the batch exercises the clip


def test_kl_is_zero_and_ratio_one_when_reference_and_old_equal_the_policy():
    apply_fn, params = _model()
    batch, logp = _fields(apply_fn, params)
    batch = dict(batch, reference_logps=jnp.asarray(logp), old_logps=jnp.asarray(logp))
    obj = grpo_objective(apply_fn, beta=0.1, fresh_rollouts=False)
    loss_sum, m = obj(params, batch, None)
    assert abs(float(m["kl"])) < 1e-6 and float(m["clip_ratio"]) == 0.0
    # With ratio 1 the surrogate is -A per token; the group-normalised advantages' mean over sequences.
    w = np.asarray(batch["loss_weights"])
    per_seq = -(np.asarray(batch["advantages"]) * w).sum(1) / w.sum(1)
    np.testing.assert_allclose(float(loss_sum / m["weight"]), per_seq.mean(), rtol=1e-5, atol=1e-6)


def test_one_step_raises_positive_advantage_completions():
    apply_fn, params = _model()
    batch, logp = _fields(apply_fn, params)
    obj = grpo_objective(apply_fn, fresh_rollouts=True)
    grads = jax.grad(lambda p: obj(p, batch, None)[0])(params)
    new = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
    after = np.asarray(token_logps(apply_fn, new, batch)[0])
    w = np.asarray(batch["loss_weights"])
    change = ((after - logp) * w).sum(1)
    adv = _row_advantages(batch)
    assert np.all(np.sign(change[adv != 0]) == np.sign(adv[adv != 0])), (change, adv)


@pytest.mark.parametrize("loss_type,aggregation", [("grpo", "sequence"), ("bnpo", "token"), ("dr_grpo", "constant")])
def test_loss_equals_trl_grpo_trainer(tmp_path, loss_type, aggregation):
    torch = pytest.importorskip("torch")  # the oracle is a test-only extra: the other tests run without it
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from maxtrain.convert import convert_from_hf
    from maxtrain.generate import load_generator

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    hf.save_pretrained(tmp_path / "hf")
    convert_from_hf(tmp_path / "hf", tmp_path / "mt")
    gen, _, _ = load_generator(str(tmp_path / "mt"), devices=jax.devices()[:1])
    dense = gen.model.clone(decode=False)
    apply_fn = lambda params, *a, **kw: dense.apply({"params": params}, *a, **kw)  # noqa: E731
    batch, logp = _fields(apply_fn, gen.params)
    ours = grpo_objective(apply_fn, epsilon=0.2, beta=0.04, aggregation=aggregation, max_completion_len=C,
                          fresh_rollouts=False)
    loss_sum, m = ours(gen.params, batch, None)

    from tokenizers import Tokenizer, models

    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t3")),
        bos_token="t1", eos_token="t2", pad_token="t0")
    args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), num_generations=G, per_device_train_batch_size=len(PROMPTS) * G,
                          beta=0.04, epsilon=0.2, loss_type=loss_type, max_completion_length=C, report_to=[],
                          use_cpu=True, bf16=False, temperature=1.0,
                          use_bias_correction_kl=False)  # TRL's default scales the KL by the ratio; ours is the plain k3
    ds = datasets.Dataset.from_list([{"prompt": "t5 t9"}] * 8)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()  # named by its path (TRL reads it)
    trainer = trl.GRPOTrainer(model=hf, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                              train_dataset=ds, processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1
    comp = _completions()
    _, lengths = rollout_rows(PROMPTS, comp, group_size=G, seq_len=16, eos_id=2, pad_id=0)
    mask = (np.arange(C)[None] < lengths[:, None]).astype(np.int64)
    p = len(PROMPTS[0])
    take = lambda k: np.stack([np.asarray(batch[k])[r, p - 1 : p - 1 + C] for r in range(8)])  # noqa: E731
    inputs = {
        "prompt_ids": torch.tensor(np.repeat(np.stack(PROMPTS), G, axis=0), dtype=torch.long),
        "prompt_mask": torch.ones(8, p, dtype=torch.long),
        "completion_ids": torch.tensor(comp, dtype=torch.long), "completion_mask": torch.tensor(mask),
        "advantages": torch.tensor(_row_advantages(batch)),
        "old_per_token_logps": torch.tensor(take("old_logps")), "ref_per_token_logps": torch.tensor(take("reference_logps")),
        "num_items_in_batch": torch.tensor(float(mask.sum())),
    }
    hf.train()
    theirs = float(trainer._compute_loss(hf, inputs))
    np.testing.assert_allclose(float(loss_sum / m["weight"]), theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides,message", [
    (["data.format.type=sft"], "set data.format.type=prompts"),
    (["train.objective=sft", "data.format.type=prompts"], "feeds rollouts to train.objective=grpo"),
    (["data.format.type=prompts", "train.rl.rewards=[]"], "needs at least one reward"),
    (["data.format.type=prompts", "train.global_batch=12"], "do not split into groups of train.rl.group_size=8"),
    (["data.format.type=prompts", "train.rl.max_completion_len=64"], "leaves no room for the prompt"),
    (["data.format.type=prompts", "train.rl.beta=0.1"], "set init_from"),
    (["data.format.type=prompts", "train.rl.beta=0.1", "train.rl.reference=adapters_off", "init_from=x"], "needs LoRA"),
])  # fmt: skip
def test_rl_config_mistakes_are_one_line_user_errors(overrides, message):
    from maxtrain.config import load_config
    from maxtrain.errors import UserError
    from maxtrain.experiment import build_objective

    base = ["model=tiny-llama", "train.objective=grpo", "train.global_batch=16", "train.seq_len=64",
            "train.rl.group_size=8", "train.rl.rewards=[{type: exact_match}]"]
    with pytest.raises(UserError, match=message) as e:
        build_objective(load_config(None, base + overrides), apply_fn=None)
    assert "\n" not in str(e.value)

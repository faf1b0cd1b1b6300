"""Parity with TRL (a test-only extra) on a tiny random HF Llama converted with from-hf: per-sequence log-probs and
the DPO loss (sigmoid, IPO) equal TRL's DPOTrainer within 1e-5, the reward loss equals TRL's RewardTrainer's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from maxtrain.convert import convert_from_hf  # noqa: E402
from maxtrain.data.lanes import LaneBatcher  # noqa: E402
from maxtrain.data.preference import SEQUENCE_FIELDS, pair_element_from_ids  # noqa: E402
from maxtrain.generate import load_generator  # noqa: E402
from maxtrain.model.config import ClassifierConfig  # noqa: E402
from maxtrain.objectives_preference import dpo_objective, pairs, reward_objective, sequence_logps  # noqa: E402

V = 128
LLAMA = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
# (prompt ids, chosen ids, rejected ids): prompts start with BOS, replies end in EOS, lengths differ.
PAIRS = [([1, 5, 9, 3], [7, 8, 2], [11, 2]), ([1, 40, 41], [50, 51, 52, 2], [60, 2]),
         ([1, 99, 98, 97, 96], [3, 2], [4, 5, 6, 2]), ([1, 20], [21, 22, 2], [23, 24, 25, 2])]  # fmt: skip


def _hf_model(seed):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()


def _maxtrain(hf_model, path):
    hf_model.save_pretrained(path / "hf")
    convert_from_hf(path / "hf", path / "mt")
    gen, _, _ = load_generator(str(path / "mt"), devices=jax.devices()[:1])
    dense = gen.model.clone(decode=False)
    return lambda params, *a, **kw: dense.apply({"params": params}, *a, **kw), gen.params


def _batch(ref_logps=None):
    """All pairs packed into one row (the maxtrain layout), reference log-probs on last tokens."""
    docs = [pair_element_from_ids(p, c, r, reference_logps=(0.0, 0.0) if ref_logps is None else ref_logps[i])
            for i, (p, c, r) in enumerate(PAIRS)]
    it = LaneBatcher(docs, global_batch=1, rows=[0], seq_len=64, pad_id=0, fill="whole", fields=SEQUENCE_FIELDS)
    return next(it)


@pytest.fixture(autouse=True)
def _pretokenized(monkeypatch):
    # The pairs are token ids already: TRL's collators take them as they are.
    for cls in (trl.DPOTrainer, trl.RewardTrainer):
        monkeypatch.setattr(cls, "_prepare_dataset", lambda self, dataset, *a, **kw: dataset)


def _trl_dpo(policy, ref, loss_type, beta, tmp_path):
    ds = datasets.Dataset.from_list([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in PAIRS])
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), loss_type=[loss_type], beta=beta, report_to=[],
                         per_device_train_batch_size=len(PAIRS), use_cpu=True, max_length=None,
                         bf16=False)  # fmt: skip  (TRL's default bf16 autocasts the reference: compare in f32)
    tok = _tokenizer(tmp_path)
    trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    inputs = trainer.data_collator([ds[i] for i in range(len(ds))])
    policy.train()  # TRL logs into "train" metrics
    loss = trainer.compute_loss(policy, inputs)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return float(loss), metrics


def _tokenizer(tmp_path):
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(V)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="t1", eos_token="t2", pad_token="t0")


def _hf_seq_logps(model, p, c):
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), -1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
    return float(logp[len(p) - 1 :].sum())


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("ipo", 0.5)])
def test_dpo_logps_and_loss_equal_trl(loss_type, beta, tmp_path):
    policy, ref = _hf_model(0), _hf_model(1)
    apply, params = _maxtrain(policy, tmp_path / "policy")
    ref_apply, ref_params = _maxtrain(ref, tmp_path / "ref")
    batch = _batch()
    ref_logps, _ = sequence_logps(ref_apply, ref_params, batch)
    rc, rr = pairs(ref_logps)
    logps, _ = sequence_logps(apply, params, batch)
    pc, pr = pairs(logps)
    for i, (p, c, r) in enumerate(PAIRS):  # per-sequence log-probs of the packed row vs transformers, one by one
        assert float(pc[0, i]) == pytest.approx(_hf_seq_logps(policy, p, c), abs=1e-5)
        assert float(pr[0, i]) == pytest.approx(_hf_seq_logps(policy, p, r), abs=1e-5)
        assert float(rc[0, i]) == pytest.approx(_hf_seq_logps(ref, p, c), abs=1e-5)
    batch = _batch([(float(rc[0, i]), float(rr[0, i])) for i in range(len(PAIRS))])
    loss_sum, sums = dpo_objective(apply, beta=beta, loss=loss_type, reference="precomputed")(params, batch, None)
    ours = float(loss_sum / sums["weight"])
    theirs, metrics = _trl_dpo(policy, ref, loss_type, beta, tmp_path)
    print(f"{loss_type}: maxtrain {ours:.8f} TRL {theirs:.8f} diff {abs(ours - theirs):.2e}")
    print({k: (float(sums[k]) / float(sums["weight"]), metrics.get(k)) for k in sums if "/" in k})
    assert ours == pytest.approx(theirs, abs=1e-5)
    n = float(sums["weight"])
    for name in ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert float(sums[name]) / n == pytest.approx(metrics[name], abs=1e-5), name


def test_reward_loss_equals_trl_reward_trainer(tmp_path):
    torch.manual_seed(0)
    hf = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**LLAMA, num_labels=1)).eval()
    with torch.no_grad():
        hf.score.weight.normal_(0.0, 0.5)  # a trained-looking head: rewards differ
    # maxtrain reads the same weights: the trunk through from-hf, the score as the one-label classifier
    causal = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    causal.model.load_state_dict(hf.model.state_dict())
    _maxtrain(causal, tmp_path / "rm")
    gen, _, _ = load_generator(str(tmp_path / "rm" / "mt"), devices=jax.devices()[:1])
    head = ClassifierConfig(num_labels=1, pooling="last")
    model = gen.model.clone(decode=False, cfg=gen.model.cfg.model_copy(update={"classifier": head}))
    apply = lambda params, *a, **kw: model.apply({"params": params}, *a, **kw)  # noqa: E731
    params = dict(gen.params, classifier={"out": {"kernel": jnp.asarray(hf.score.weight.detach().numpy().T),
                                                  "bias": jnp.zeros((1,), jnp.float32)}})  # fmt: skip
    loss_sum, sums = reward_objective(apply)(params, _batch(), None)
    ours = float(loss_sum / sums["weight"])
    ds = datasets.Dataset.from_list([{"chosen_ids": p + c, "rejected_ids": p + r} for p, c, r in PAIRS])
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=len(PAIRS),
                            use_cpu=True, max_length=None, bf16=False)  # fmt: skip
    trainer = trl.RewardTrainer(model=hf, args=args, train_dataset=ds, processing_class=_tokenizer(tmp_path))
    inputs = trainer.data_collator([ds[i] for i in range(len(ds))])
    hf.train()
    theirs = float(trainer.compute_loss(hf, inputs))
    print(f"reward: maxtrain {ours:.8f} TRL {theirs:.8f} diff {abs(ours - theirs):.2e}")
    assert ours == pytest.approx(theirs, abs=1e-5)
    assert 0.0 < float(sums["accuracy"]) / float(sums["weight"]) < 1.0  # a loss away from log 2: a real comparison

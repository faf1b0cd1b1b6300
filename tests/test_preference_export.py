"""A reward model leaves maxtrain as LlamaForSequenceClassification / Qwen2ForSequenceClassification (num_labels=1)
whose scores equal maxtrain's per-sequence rewards (two sequences packed in one row) within 1e-4."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from maxtrain.checkpoint import TrainCheckpointer  # noqa: E402
from maxtrain.cli import main  # noqa: E402
from maxtrain.config import load_config  # noqa: E402
from maxtrain.experiment import finetuned_model_config, make_apply_fn  # noqa: E402
from maxtrain.model.transformer import Transformer  # noqa: E402
from maxtrain.objectives_preference import sequence_rewards  # noqa: E402
from maxtrain.step import TrainState  # noqa: E402

V = 128
SEQS = [[1, 5, 9, 3, 7, 8, 2], [1, 40, 41, 50, 2]]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_reward_model_exports_as_sequence_classification(family, tmp_path):
    overrides = ["model=tiny-llama", f"model.vocab_size={V}", "finetune.classifier={num_labels: 1, pooling: last}",
                 "train.objective=reward", "data.format.type=preference", "steps=1"]  # fmt: skip
    if family == "qwen2":
        overrides += ["model.family=qwen2", "model.qkv_bias=true"]
    cfg = load_config(None, overrides)
    model = Transformer(finetuned_model_config(cfg))
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    head = params["classifier"]["out"]
    params["classifier"]["out"] = {"kernel": 0.5 * jax.random.normal(jax.random.PRNGKey(1), head["kernel"].shape),
                                   "bias": jnp.full_like(head["bias"], 0.7)}  # the reward never reads the bias
    state = TrainState(step=jnp.int32(1), params=params, opt_state={"count": jnp.int32(1)}, rng=jax.random.PRNGKey(2))
    ckpt = TrainCheckpointer(tmp_path / "run" / "checkpoints", cfg.checkpoint, cfg=cfg, tokenizer_identity=None)
    ckpt.save(1, state, {})
    ckpt.close()
    assert main(["convert", "to-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0

    # maxtrain: both sequences packed in one row
    tokens = np.zeros((1, 16), np.int32)
    seg, pos = np.zeros_like(tokens), np.zeros_like(tokens)
    col = 0
    for s, seq in enumerate(SEQS, 1):
        tokens[0, col : col + len(seq)], seg[0, col : col + len(seq)], pos[0, col : col + len(seq)] = seq, s, np.arange(len(seq))
        col += len(seq)
    apply = make_apply_fn(model, cfg.mesh.rules)
    batch = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(pos)}
    ours = np.asarray(sequence_rewards(apply, params, batch))[0, 1:3]

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == {"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification"}[family]
    assert hf.config.num_labels == 1
    hf.config.pad_token_id = 0
    padded = torch.zeros((2, max(map(len, SEQS))), dtype=torch.long)
    mask = torch.zeros_like(padded)
    for i, seq in enumerate(SEQS):
        padded[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), 1
    with torch.no_grad():
        theirs = hf(input_ids=padded, attention_mask=mask).logits[:, 0].numpy()
    print(family, ours, theirs)
    assert np.abs(ours - theirs).max() <= 1e-4
    assert abs(ours[0] - ours[1]) > 1e-3  # distinct scores: a real comparison

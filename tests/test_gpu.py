"""GPU-only checks (skipped elsewhere): cuDNN flash attention trains like the XLA attention.

Run on a GPU machine with `JAX_PLATFORMS=cuda XLA_FLAGS= pytest tests/test_gpu.py`
(conftest otherwise pins tests to 8 fake CPU devices).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxtrain.config import load_config
from maxtrain.experiment import build_experiment
from tests.synthetic import random_batch

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (cuDNN attention)")

_SHAPE = ["model=tiny-llama", "model.d_model=256", "model.head_dim=64", "model.num_heads=4", "model.num_kv_heads=2",
          "train.global_batch=8", "train.seq_len=128", "steps=30", "optimizer.lr=3e-3", "optimizer.warmup_steps=0",
          "train.compute_dtype=bfloat16", "mesh.data=1", "mesh.fsdp=-1"]  # fmt: skip


def _run(attention: str, docs_per_row: int, steps: int = 30):
    cfg = load_config(None, [*_SHAPE, f"train.attention={attention}"])
    exp = build_experiment(cfg, devices=jax.devices()[:1])
    assert exp.model.attention_kernel == attention
    state, losses = exp.state, []
    logits = exp.apply_fn(state.params, jnp.asarray(random_batch(8, 128, 256, seed=99, docs_per_row=docs_per_row)["tokens"]))
    for step in range(steps):
        batch = random_batch(8, 128, 256, seed=step % 4, docs_per_row=docs_per_row)
        state, metrics = exp.train_step(state, jax.device_put(batch, exp.batch_sharding))
        losses.append(float(metrics["loss"]))
    return np.asarray(logits, np.float32), np.asarray(losses)


@pytest.mark.parametrize("docs_per_row", [1, 3])  # whole rows: the bias-free kernel; packed rows: the masked one
def test_cudnn_attention_trains_like_xla_attention(docs_per_row):
    logits_cudnn, loss_cudnn = _run("cudnn", docs_per_row)
    logits_xla, loss_xla = _run("xla", docs_per_row)
    scale = float(np.abs(logits_xla).max())
    assert float(np.abs(logits_cudnn - logits_xla).max()) < 2e-2 * scale  # bf16 rounding, not a different function
    np.testing.assert_allclose(loss_cudnn, loss_xla, rtol=2e-2)
    assert loss_cudnn[-1] < loss_cudnn[0] - 0.5  # it learned the repeating batches

"""LoRA: B = 0 gives the base model's logits exactly; merged weights give the adapted logits; tiny 1B fraction."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maxtrain.config import load_config
from maxtrain.finetune.config import FinetuneConfig
from maxtrain.finetune.lora import adapter_params, load_adapters, merge_lora, save_adapters
from maxtrain.finetune.trainable import count_params, new_leaf, path_name, trainable_set
from maxtrain.model.config import LoraConfig, ModelConfig
from maxtrain.model.transformer import Transformer

ALL = ("q", "k", "v", "o", "gate", "up", "down")
BASE = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64, max_seq_len=32)
LORA = LoraConfig(rank=4, alpha=8.0, targets=ALL)


def _init(cfg):
    return nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])


def _logits(cfg, params, tokens):
    return np.asarray(jax.jit(Transformer(cfg).apply)({"params": params}, tokens))


def _strip(params):
    if not isinstance(params, dict):
        return params
    return {k: _strip(v) for k, v in params.items() if k not in ("lora_a", "lora_b")}


def test_lora_starts_at_the_base_model_and_merges_exactly():
    cfg = BASE.model_copy(update={"lora": LORA})
    params = _init(cfg)
    names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert sum(new_leaf(n) for n in names) == 2 * len(ALL)  # A and B per target, stacked over layers
    assert params["layers"]["attn"]["q"]["lora_a"].shape == (2, 32, 4)
    assert params["layers"]["attn"]["o"]["lora_b"].shape == (2, 4, 32)  # o maps (heads, head_dim) -> embed
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 64)
    base = _logits(BASE, _strip(params), tokens)
    np.testing.assert_array_equal(_logits(cfg, params, tokens), base)  # B = 0: bitwise the base model

    # Train-like adapters: random B. Merged into the kernels, the plain model gives the adapted logits.
    key = iter(jax.random.split(jax.random.PRNGKey(2), 64))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.05 * jax.random.normal(next(key), x.shape) if path_name(p).endswith("lora_b") else x, params
    )
    adapted = _logits(cfg, params, tokens)
    assert np.abs(adapted - base).max() > 1e-2  # the adapters matter
    merged = merge_lora(params, LORA)
    assert not any(new_leaf(path_name(p)) for p, _ in jax.tree_util.tree_flatten_with_path(merged)[0])
    np.testing.assert_allclose(_logits(BASE, merged, tokens), adapted, atol=1e-4, rtol=0)


def test_llama32_1b_lora_trains_under_one_percent():
    ft = FinetuneConfig(lora=LoraConfig(rank=8, targets=ALL))
    cfg = load_config(None, ["model=llama3.2-1b"]).model.model_copy(update={"lora": ft.lora})
    shapes = jax.eval_shape(lambda r: nn.unbox(Transformer(cfg).init(r, jnp.zeros((1, 4), jnp.int32))), jax.random.PRNGKey(0))
    trained, total = count_params(shapes["params"], trainable_set(ft, cfg.num_layers))
    # per layer: q and o 2 x (2048x8 + 8x2048), k and v 2048x8 + 8x512, gate and up 2048x8 + 8x8192, down 8192x8 + 8x2048
    per_layer = 2 * (2 * 2048 * 8) + 2 * (2048 * 8 + 8 * 512) + 2 * (2048 * 8 + 8 * 8192) + (8192 * 8 + 8 * 2048)
    assert trained == 16 * per_layer == 5_636_096
    assert trained / total < 0.01  # 5.64M of 1.24B: 0.45%


def test_adapters_save_alone_and_load_onto_a_base(tmp_path):
    run = load_config(None, ["model=tiny-llama", "finetune.lora.rank=4"])
    cfg = run.model.model_copy(update={"lora": run.finetune.lora})
    params = jax.tree.map(lambda x: x + 1.0, _init(cfg))
    save_adapters(tmp_path / "adapters", params, cfg=run)
    fresh = _init(cfg)
    restored = load_adapters(tmp_path / "adapters", fresh)
    flat = lambda t: {path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}  # noqa: E731
    got, want, base = flat(restored), flat(params), flat(fresh)
    assert set(flat(adapter_params(params))) == {n for n in want if new_leaf(n)}
    for name in got:
        np.testing.assert_array_equal(got[name], want[name] if new_leaf(name) else base[name])

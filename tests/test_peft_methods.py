"""Parameter-efficient methods beyond LoRA: bottleneck adapters, (IA)^3, prompt tuning, prefix tuning.

At initialisation adapters and (IA)^3 give the base model's logits bitwise; a prefix equals
attention over explicitly concatenated keys/values (the base model reading them from its KV
cache); a soft prompt equals the base model fed those embeddings as its first tokens. Packed
documents never see each other (each sees the shared prompt/prefix and itself only), KV-cache
decoding equals the full forward for every method, and (IA)^3 merges into the weights.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxtrain.finetune.adapter import AdapterConfig
from maxtrain.finetune.ia3 import IA3Config, merge_params
from maxtrain.finetune.init import _overlay
from maxtrain.finetune.prefix import PrefixTuningConfig
from maxtrain.finetune.prompt import PromptTuningConfig
from maxtrain.finetune.trainable import new_leaf, path_name
from maxtrain.generate import init_cache
from maxtrain.model.config import LoraConfig, ModelConfig
from maxtrain.model.transformer import Transformer

BASE = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64, max_seq_len=64)
P = 3
METHODS = {
    "lora": {"lora": LoraConfig(rank=4, targets=("q", "k", "v", "o", "gate", "up", "down"))},
    "houlsby": {"adapter": AdapterConfig(size=8, placement="houlsby", layer_norm=True)},
    "pfeiffer": {"adapter": AdapterConfig(size=8, placement="pfeiffer", activation="silu")},
    "ia3": {"ia3": IA3Config()},
    "prompt": {"prompt_tuning": PromptTuningConfig(num_virtual_tokens=P, init="random")},
    "prefix": {"prefix_tuning": PrefixTuningConfig(num_virtual_tokens=P)},
    "prefix_mlp": {"prefix_tuning": PrefixTuningConfig(num_virtual_tokens=P, reparameterize=True, hidden=16)},
}
TOKENS = np.random.default_rng(0).integers(1, 64, (2, 12)).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _init(cfg, seed=0):
    return nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"])


@functools.lru_cache(maxsize=None)
def _forward(cfg):
    return jax.jit(Transformer(cfg).apply)


def _apply(cfg, params, tokens, positions=None, segments=None):
    return np.asarray(_forward(cfg)({"params": params}, tokens, positions, segments))


BASE_PARAMS = _init(BASE)


def _method_params(name, seed=1, trained=True):
    """The method's model with the base's weights and (trained-like) random method leaves."""
    cfg = BASE.model_copy(update=METHODS[name])
    params = _overlay(_init(cfg, seed), BASE_PARAMS)
    if trained:
        keys = iter(jax.random.split(jax.random.PRNGKey(seed + 7), 64))
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: x + 0.1 * jax.random.normal(next(keys), x.shape) if new_leaf(path_name(p)) else x, params
        )
    return cfg, params


@pytest.mark.parametrize("name", ["houlsby", "pfeiffer", "ia3", "lora"])
def test_adapters_and_ia3_start_bitwise_at_the_base(name):
    cfg, params = _method_params(name, trained=False)
    assert any(new_leaf(path_name(p)) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])
    np.testing.assert_array_equal(_apply(cfg, params, TOKENS), _apply(BASE, BASE_PARAMS, TOKENS))


def test_ia3_merges_into_the_weights():
    cfg, params = _method_params("ia3")
    adapted = _apply(cfg, params, TOKENS)
    assert np.abs(adapted - _apply(BASE, BASE_PARAMS, TOKENS)).max() > 1e-3
    merged = merge_params(params, cfg.ia3)
    assert not any("ia3" in path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(merged)[0])
    np.testing.assert_allclose(_apply(BASE, merged, TOKENS), adapted, atol=1e-5)


@pytest.mark.parametrize("name", ["prefix", "prefix_mlp"])
def test_prefix_equals_attention_over_concatenated_keys_and_values(name):
    """The base model, its KV cache holding the prefix at slots 0..P-1, reading the tokens at positions P.."""
    cfg, params = _method_params(name)
    prefix_LxPx2xKxH = Transformer(cfg).apply({"params": params}, method=lambda m: m.prefix_tuning())
    b, s = TOKENS.shape
    cache = init_cache(BASE, b, P + s, jnp.float32)
    attn = cache["layers"]["attn"]
    attn["cached_k"] = attn["cached_k"].at[:, :, :, :P].set(prefix_LxPx2xKxH[:, None, :, 0].swapaxes(2, 3))  # [L, B, K, T, H]
    attn["cached_v"] = attn["cached_v"].at[:, :, :, :P].set(prefix_LxPx2xKxH[:, None, :, 1].swapaxes(2, 3))
    positions = jnp.broadcast_to(P + jnp.arange(s), (b, s))
    want, _ = Transformer(BASE, decode=True).apply({"params": BASE_PARAMS, "cache": cache}, TOKENS, positions, mutable=["cache"])
    np.testing.assert_allclose(_apply(cfg, params, TOKENS), np.asarray(want), atol=1e-5)


def test_prompt_equals_the_base_fed_the_soft_prompt_as_its_first_inputs():
    ids = np.array([5, 17, 42], np.int32)
    cfg, params = _method_params("prompt", trained=False)
    params = {**params, "prompt_tuning": {"embedding": jnp.take(params["embedding"], ids, axis=0)}}
    got = _apply(cfg, params, TOKENS)
    full = _apply(BASE, BASE_PARAMS, np.concatenate([np.broadcast_to(ids, (2, P)), TOKENS], axis=1))
    np.testing.assert_allclose(got, full[:, P:], atol=1e-5)
    assert np.abs(got - _apply(BASE, BASE_PARAMS, TOKENS)).max() > 1e-3  # the prompt does something


@pytest.mark.parametrize("name", ["prompt", "prefix", "houlsby", "ia3"])
def test_packed_documents_see_the_shared_prompt_and_themselves_only(name):
    """Two documents and padding in one row give each document's logits as if it were alone in its row."""
    cfg, params = _method_params(name)
    a, b = TOKENS[0, :5], TOKENS[1, :4]
    row = np.concatenate([a, b, np.zeros(3, np.int32)])[None]
    positions = np.concatenate([np.arange(5), np.arange(4), np.zeros(3, np.int32)])[None]
    segments = np.concatenate([np.ones(5), np.full(4, 2), np.zeros(3)]).astype(np.int32)[None]
    packed = _apply(cfg, params, row, positions, segments)[0]
    np.testing.assert_allclose(packed[:5], _apply(cfg, params, a[None])[0], atol=1e-5)
    np.testing.assert_allclose(packed[5:9], _apply(cfg, params, b[None])[0], atol=1e-5)
    assert np.isfinite(packed).all()


@pytest.mark.parametrize("name", ["lora", "houlsby", "ia3", "prompt", "prefix_mlp"])  # one per method
def test_kv_cache_decoding_equals_the_full_forward(name):
    """A prefill of 7 tokens, then one token at a time: each step's logits equal the full forward's."""
    cfg, params = _method_params(name)
    full = _apply(cfg, params, TOKENS)
    b, s = TOKENS.shape
    from maxtrain.finetune.registry import virtual_tokens

    cache = init_cache(cfg, b, virtual_tokens(cfg) + s, jnp.float32)
    step = jax.jit(lambda c, t, pos: Transformer(cfg, decode=True).apply({"params": params, "cache": c}, t, pos, mutable=["cache"]))
    logits, mutated = step(cache, TOKENS[:, :7], jnp.broadcast_to(jnp.arange(7), (b, 7)))
    np.testing.assert_allclose(np.asarray(logits), full[:, :7], atol=1e-5)
    cache = mutated["cache"]
    for i in range(7, s):
        logits, mutated = step(cache, TOKENS[:, i : i + 1], jnp.full((b, 1), i))
        cache = mutated["cache"]
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, i], atol=1e-5)

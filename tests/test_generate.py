"""Sampling filters, EOS stopping and cache-vs-full-forward agreement of maxtrain.generate."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maxtrain.config import MeshConfig
from maxtrain.generate import Generator, Sampling, filtered_logits, sample_tokens
from maxtrain.mesh import build_mesh
from maxtrain.model.config import ModelConfig
from maxtrain.model.transformer import Transformer


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda s: np.isfinite(np.asarray(filtered_logits(logits, s))) & (np.asarray(filtered_logits(logits, s)) > -1e30)  # noqa: E731
    assert kept(Sampling(temperature=1.0, top_k=2)).tolist() == [[True, True, False, False]]
    assert kept(Sampling(temperature=1.0, top_p=0.7)).tolist() == [[True, True, False, False]]  # 0.5 < 0.7 <= 0.8
    assert kept(Sampling(temperature=1.0, top_p=0.4)).tolist() == [[True, False, False, False]]
    draws = [int(sample_tokens(logits, jax.random.PRNGKey(i), Sampling(temperature=1.0, top_k=2))[0]) for i in range(200)]
    assert set(draws) == {0, 1} and 0.35 < np.mean(np.array(draws) == 1) < 0.6


def _tiny_generator(**overrides):
    cfg = ModelConfig(**dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64, max_seq_len=64), **overrides)
    model = Transformer(cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(3), jnp.zeros((1, 8), jnp.int32))["params"])
    mesh = build_mesh(MeshConfig(), jax.devices()[:1])
    return Generator(cfg, params, mesh=mesh, rules=MeshConfig().rules), model, params


def test_cached_greedy_equals_full_forward_and_stops_at_eos():
    gen, model, params = _tiny_generator(sliding_window=5)
    prompts = [[3, 9, 27, 17, 51, 1, 2], [5, 6]]
    out = gen.generate(prompts, Sampling(max_new_tokens=10))
    # Recompute each token with the cache-free forward over a fixed buffer (causal: the zeros
    # after position i do not change its logits), compiled once.
    forward = jax.jit(lambda buf: model.apply({"params": params}, buf)[0])
    for prompt, new in zip(prompts, out):
        buf = np.zeros((1, 20), np.int32)
        buf[0, : len(prompt)] = prompt
        for i in range(len(prompt), len(prompt) + 10):
            buf[0, i] = int(jnp.argmax(forward(jnp.asarray(buf))[i - 1]))
        assert new == buf[0, len(prompt) : len(prompt) + 10].tolist()
    eos = out[0][3]
    stopped = gen.generate(prompts[:1], Sampling(max_new_tokens=10), eos_ids=[eos])
    assert stopped[0] == out[0][: out[0].index(eos) + 1]


def test_sampling_is_reproducible_by_seed():
    gen, _, _ = _tiny_generator()
    s = Sampling(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    a, b = gen.generate([[1, 2, 3]], s), gen.generate([[1, 2, 3]], s)
    c = gen.generate([[1, 2, 3]], Sampling(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=8))
    assert a == b and a != c

"""Model family: real preset shapes, packed-document isolation, causality, windows, the encoder seam."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxtrain.config import load_config
from maxtrain.model.config import ModelConfig
from maxtrain.model.layers import computed_once, rope_frequencies, silu_gate
from maxtrain.model.transformer import Transformer

# Totals of the published checkpoints (sum of tensor sizes in the Hugging Face releases).
PUBLISHED = {
    "llama3.2-1b": 1_235_814_400,
    "llama3.1-8b": 8_030_261_248,
    "llama2-7b": 6_738_415_616,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen3-0.6b": 596_049_920,
    "gpt2": 124_439_808,
}


def _abstract_param_count(cfg: ModelConfig) -> int:
    model = Transformer(cfg)
    shapes = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 4), jnp.int32)), jax.random.PRNGKey(0))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_has_published_parameter_count(preset):
    cfg = load_config(None, [f"model={preset}"]).model
    assert _abstract_param_count(cfg) == PUBLISHED[preset]
    assert cfg.param_count() == PUBLISHED[preset]


def test_llama32_1b_is_1_24b():
    assert round(PUBLISHED["llama3.2-1b"] / 1e9, 2) == 1.24


def _tiny(**overrides) -> ModelConfig:
    fields = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64, max_seq_len=64)
    fields.update(overrides)
    return ModelConfig(**fields)


def _logits(cfg, params, tokens, positions=None, segment_ids=None):
    return jax.jit(Transformer(cfg).apply)({"params": params}, tokens, positions, segment_ids)


def _init(cfg, seq=16):
    init = jax.jit(Transformer(cfg).init)
    return nn.unbox(init(jax.random.PRNGKey(1), jnp.zeros((1, seq), jnp.int32))["params"])


FAMILIES = {
    "llama": {},
    "llama3-scaled-rope": dict(rope_scaling={"factor": 8.0, "original_max_position": 16}),
    "qwen2": dict(qkv_bias=True, tie_embeddings=True),
    "qwen3": dict(qk_norm=True, head_dim=16),
    "mistral": dict(sliding_window=4),
    "gpt2": dict(norm="layernorm", mlp="plain", activation="gelu_tanh", positions="learned", qkv_bias=True,
                 out_bias=True, mlp_bias=True, tie_embeddings=True, num_kv_heads=None),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_documents_do_not_see_each_other(family):
    """Logits of a document packed after another equal its logits alone (positions restart)."""
    cfg = _tiny(**FAMILIES[family])
    params = _init(cfg)
    rng = np.random.default_rng(0)
    doc_a, doc_b = rng.integers(0, 64, 10), rng.integers(0, 64, 6)
    packed = jnp.asarray(np.r_[doc_a, doc_b])[None]
    positions = jnp.asarray(np.r_[np.arange(10), np.arange(6)])[None]
    segments = jnp.asarray(np.r_[np.ones(10), 2 * np.ones(6)].astype(np.int32))[None]
    packed_logits = _logits(cfg, params, packed, positions, segments)
    alone = _logits(cfg, params, jnp.asarray(doc_b)[None])
    np.testing.assert_allclose(packed_logits[0, 10:], alone[0], atol=1e-5)
    alone_a = _logits(cfg, params, jnp.asarray(doc_a)[None])
    np.testing.assert_allclose(packed_logits[0, :10], alone_a[0], atol=1e-5)


def test_causal_decoder_ignores_future_and_encoder_does_not():
    tokens = jnp.arange(12)[None] % 64
    changed = tokens.at[0, 8].set(63)
    for causal in (True, False):
        cfg = _tiny(causal=causal)
        params = _init(cfg)
        before, after = _logits(cfg, params, tokens), _logits(cfg, params, changed)
        diff = float(jnp.max(jnp.abs(before[0, :8] - after[0, :8])))
        if causal:
            assert diff == 0.0
        else:
            assert diff > 1e-3


def test_sliding_window_limits_the_receptive_field():
    cfg = _tiny(num_layers=1, sliding_window=4)
    params = _init(cfg)
    tokens = jnp.arange(12)[None] % 64
    base = _logits(cfg, params, tokens)
    outside = _logits(cfg, params, tokens.at[0, 3].set(60))  # 11 - 3 = 8 >= window
    inside = _logits(cfg, params, tokens.at[0, 8].set(60))  # 11 - 8 = 3 < window
    assert float(jnp.max(jnp.abs(base[0, 11] - outside[0, 11]))) == 0.0
    assert float(jnp.max(jnp.abs(base[0, 11] - inside[0, 11]))) > 1e-4


def test_llama3_rope_scaling_divides_only_low_frequencies():
    from maxtrain.model.config import RopeScaling

    plain = np.asarray(rope_frequencies(64, 500000.0, None))
    scaled = np.asarray(rope_frequencies(64, 500000.0, RopeScaling(factor=32.0)))
    wavelen = 2 * np.pi / plain
    high = wavelen < 8192 / 4.0  # shorter than original_max / high_freq_factor: untouched
    low = wavelen > 8192 / 1.0  # longer than original_max / low_freq_factor: divided by factor
    np.testing.assert_allclose(scaled[high], plain[high], rtol=1e-6)
    np.testing.assert_allclose(scaled[low], plain[low] / 32.0, rtol=1e-6)
    mid = ~high & ~low
    assert mid.any() and np.all(scaled[mid] < plain[mid]) and np.all(scaled[mid] > plain[mid] / 32.0)


def test_family_switches_create_their_parameters():
    params = _init(_tiny(qk_norm=True, qkv_bias=True, head_dim=16))
    attn = params["layers"]["attn"]
    assert attn["q_norm"]["scale"].shape == (2, 16)
    assert attn["q"]["bias"].shape == (2, 4, 16)
    assert attn["k"]["kernel"].shape == (2, 32, 2, 16)
    gpt2 = _init(_tiny(**FAMILIES["gpt2"]))
    assert gpt2["position_embedding"].shape == (64, 32)
    assert "lm_head" not in gpt2 and gpt2["layers"]["attn_norm"]["bias"].shape == (2, 32)


@pytest.mark.parametrize("window", [None, 24])
def test_query_blocked_attention_equals_one_block(window):
    """Blocked causal attention reads fewer keys but gives the same outputs and gradients (GQA, packing, window)."""
    from maxtrain.model.attention import attention_mask, dot_product_attention

    rng = np.random.default_rng(0)
    b, s, n, k, h = 2, 64, 4, 2, 8
    q, kk, v = (jnp.asarray(rng.standard_normal((b, s, heads, h)), jnp.float32) for heads in (n, k, k))
    seg = jnp.asarray(np.repeat([[1] * 40 + [2] * 20 + [0] * 4], b, axis=0))  # two documents and padding
    mask = attention_mask(seg, causal=True, sliding_window=window)

    def loss(q, kk, v, block):
        out = dot_product_attention(q, kk, v, mask, causal=True, sliding_window=window, query_block=block)
        return jnp.sum(jnp.sin(out)), out

    (_, ref), g_ref = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, kk, v, 0)
    for block in (16, 24):  # 24 leaves a short last block
        (_, out), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, kk, v, block)
        np.testing.assert_allclose(out, ref, atol=1e-5)
        for a, r in zip(g, g_ref):
            np.testing.assert_allclose(a, r, atol=1e-5)


@pytest.mark.parametrize("window", [None, 24])
def test_fused_attention_equals_ours_on_whole_rows_and_packed_rows(window):
    """The jax.nn path (cuDNN's on GPU; its XLA twin here) gives our attention's outputs and gradients.

    Whole rows take the bias-free branch, packed rows (documents, padding) the masked one;
    the bias-free kernel alone would be wrong on packed rows, so both branches are exercised.
    """
    from maxtrain.model.attention import attention_mask, dot_product_attention, fused_attention

    rng = np.random.default_rng(1)
    b, s, n, k, h = 2, 48, 4, 2, 8
    q, kk, v = (jnp.asarray(rng.standard_normal((b, s, heads, h)), jnp.float32) for heads in (n, k, k))
    whole = jnp.ones((b, s), jnp.int32)
    packed = jnp.asarray([[1] * 30 + [2] * 14 + [0] * 4, [1] * 48])  # documents and padding in row 0
    for seg in (whole, packed):
        mask = attention_mask(seg, causal=True, sliding_window=window)

        def loss(q, kk, v, attend):
            out = attend(q, kk, v, mask, causal=True, sliding_window=window)
            return jnp.sum(jnp.sin(out)), out

        (_, ref), g_ref = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, kk, v, dot_product_attention)
        fused = functools.partial(fused_attention, implementation="xla")
        (_, out), g = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True), static_argnums=3)(q, kk, v, fused)
        np.testing.assert_allclose(out, ref, atol=1e-5)
        for got, want in zip(g, g_ref):
            np.testing.assert_allclose(got, want, atol=1e-5)
    window_kw = dict(local_window_size=(window - 1, 0)) if window else {}
    causal_only = jax.nn.dot_product_attention(q, kk, v, is_causal=True, implementation="xla", **window_kw)
    assert float(jnp.abs(causal_only - ref).max()) > 0.1  # packed rows need the mask branch


def test_attention_kernel_is_cudnn_only_where_it_runs():
    from maxtrain.errors import UserError
    from maxtrain.experiment import attention_kernel

    assert attention_kernel("auto", "gpu", jnp.bfloat16) == "cudnn"
    assert attention_kernel("auto", "gpu", jnp.float32) == "xla"  # cuDNN flash attention is bf16/f16 only
    assert attention_kernel("auto", "cpu", jnp.bfloat16) == "xla"
    assert attention_kernel("xla", "gpu", jnp.bfloat16) == "xla"
    with pytest.raises(UserError, match="train.attention=cudnn needs a GPU"):
        attention_kernel("cudnn", "cpu", jnp.float32)


def test_silu_gate_backward_equals_autodiff():
    """The hand-written SwiGLU backward gives autodiff's gradients of silu(gate) * up."""
    gate, up, dh = jax.random.normal(jax.random.PRNGKey(0), (3, 64, 96)) * 3.0
    reference = lambda g, u: jnp.sum(jax.nn.silu(g) * u * dh)  # noqa: E731
    fused = lambda g, u: jnp.sum(silu_gate(g, u) * dh)  # noqa: E731
    np.testing.assert_allclose(fused(gate, up), reference(gate, up), rtol=1e-6)
    for got, want in zip(jax.grad(fused, (0, 1))(gate, up), jax.grad(reference, (0, 1))(gate, up)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert float(jnp.abs(want).max()) > 1.0  # non-trivial gradients were compared


def test_computed_once_returns_its_inputs_under_jit_and_grad():
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 8), minval=-1.0, maxval=1.0)
    pinned = jax.jit(lambda a: computed_once(jnp.sin(a), jnp.cos(a), floor=-2.0))(x)
    np.testing.assert_array_equal(pinned[0], jnp.sin(x))
    np.testing.assert_array_equal(pinned[1], jnp.cos(x))
    grad = jax.grad(lambda a: computed_once(jnp.sin(a), floor=-2.0)[0].sum())(x)
    np.testing.assert_allclose(grad, jnp.cos(x), rtol=1e-6)

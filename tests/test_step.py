"""The one jitted step: sharding rules, mesh equivalence, accumulation, compile-once, FSDP memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxtrain.config import load_config
from maxtrain.experiment import build_experiment
from maxtrain.optim import build_schedule, weight_decay_mask
from tests.synthetic import random_batch

TINY = ["model=tiny-llama", "model.num_heads=8", "model.num_kv_heads=8", "model.d_model=64", "model.vocab_size=256",
        "train.global_batch=8", "train.seq_len=32", "optimizer.warmup_steps=2", "steps=10", "optimizer.lr=1e-2"]  # fmt: skip


def _run(overrides, steps=5, batches=None):
    exp = build_experiment(load_config(None, TINY + overrides))
    losses = []
    with jax.set_mesh(exp.mesh):
        for i in range(steps):
            local = batches[i] if batches else random_batch(8, 32, 256, seed=i, docs_per_row=2)
            batch = jax.device_put(local, exp.batch_sharding)
            exp.state, metrics = exp.train_step(exp.state, batch)
            losses.append(float(metrics["loss"]))
    return exp, np.array(losses)


def test_param_shardings_follow_the_rules():
    exp = build_experiment(load_config(None, TINY + ["mesh.fsdp=2", "mesh.tensor=4"]))
    spec = lambda x: tuple(x.sharding.spec)  # noqa: E731
    p = exp.state.params
    assert spec(p["layers"]["attn"]["q"]["kernel"]) == (None, "fsdp", "tensor", None)  # layers, embed, heads, head_dim
    assert spec(p["layers"]["attn"]["o"]["kernel"]) == (None, "tensor", None, "fsdp")
    assert spec(p["layers"]["mlp"]["down"]["kernel"]) == (None, "tensor", "fsdp")
    assert spec(p["embedding"]) == ("tensor", "fsdp")
    assert spec(p["layers"]["attn_norm"]["scale"]) == (None, None)
    # Adam moments live where their params live.
    mu = exp.state.opt_state[1][0].mu
    assert spec(mu["layers"]["attn"]["q"]["kernel"]) == (None, "fsdp", "tensor", None)
    # Each device holds a 1/8 slice of the q kernel.
    q = p["layers"]["attn"]["q"]["kernel"]
    assert q.addressable_shards[0].data.size * 8 == q.size


def test_meshes_give_the_same_losses():
    """fsdp x tensor = 1x8, 2x4 and 8x1 agree to 1e-5 over 5 steps (f32)."""
    same = [random_batch(8, 32, 256, seed=0, docs_per_row=2)] * 5  # memorising one batch: loss must fall
    runs = {m: _run([f"mesh.fsdp={m[0]}", f"mesh.tensor={m[1]}"], 5, same)[1] for m in [(1, 8), (2, 4), (8, 1)]}
    ref = runs[(8, 1)]
    assert ref[-1] < ref[0] - 0.5  # it trains
    for losses in runs.values():
        np.testing.assert_allclose(losses, ref, atol=1e-5, rtol=0)


def test_gradient_accumulation_equals_full_batch():
    batches = [random_batch(8, 32, 256, seed=i, docs_per_row=3) for i in range(3)]
    for b in batches:  # uneven padding across rows: accumulation must still weight tokens, not rows
        b["loss_weights"][:3, 20:] = 0.0
    full, full_losses = _run([], steps=3, batches=batches)
    acc, acc_losses = _run(["train.microbatches=4", "mesh.fsdp=2", "mesh.data=1", "mesh.tensor=4"], 3, batches)
    np.testing.assert_allclose(acc_losses, full_losses, atol=1e-5, rtol=0)
    # Adam turns ~1e-7 gradient noise on near-zero gradients into visible steps; after 3 updates
    # of lr 1e-2 the params agree to 1e-4 (the first moment's sign is all that can differ).
    for a, b in zip(jax.tree.leaves(acc.state.params), jax.tree.leaves(full.state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=0)


def test_step_compiles_once_over_many_steps():
    exp, losses = _run([], steps=12)
    assert exp.train_step._cache_size() == 1
    assert int(exp.state.step) == 12 and np.all(np.isfinite(losses))


def test_unrolled_layers_match_the_scan():
    same = [random_batch(8, 32, 256, seed=0, docs_per_row=2)] * 3
    _, scanned = _run([], 3, same)
    _, unrolled = _run(["train.unroll_layers=true"], 3, same)
    np.testing.assert_allclose(unrolled, scanned, atol=1e-5, rtol=0)


def test_fsdp_shards_params_and_optimizer_state():
    """Per-device argument bytes with fsdp=8 are ~1/8 of the replicated (data=8) figure."""
    sizes = {}
    for name, mesh in {"replicated": ["mesh.data=8", "mesh.fsdp=1"], "fsdp": ["mesh.data=1", "mesh.fsdp=8"]}.items():
        exp = build_experiment(load_config(None, TINY + ["model.vocab_size=2048", "model.ffn_dim=512"] + mesh))
        batch = jax.device_put(random_batch(8, 32, 256), exp.batch_sharding)
        mem = exp.train_step.lower(exp.state, batch).compile().memory_analysis()
        sizes[name] = mem.argument_size_in_bytes
    assert sizes["fsdp"] / sizes["replicated"] < 0.15


def test_schedules():
    cfg = load_config(None, ["optimizer.lr=1.0", "optimizer.warmup_steps=10", "optimizer.min_lr_ratio=0.1"]).optimizer
    cos = build_schedule(cfg, 110)
    assert float(cos(0)) == 0.0 and float(cos(10)) == pytest.approx(1.0)
    assert float(cos(60)) == pytest.approx(0.55, abs=1e-6) and float(cos(110)) == pytest.approx(0.1, abs=1e-6)
    wsd = build_schedule(cfg.model_copy(update={"schedule": "wsd", "wsd_decay_fraction": 0.2}), 110)
    assert float(wsd(89)) == pytest.approx(1.0) and float(wsd(110)) == pytest.approx(0.1, abs=1e-6)
    lin = build_schedule(cfg.model_copy(update={"schedule": "linear"}), 110)
    assert float(lin(60)) == pytest.approx(0.55, abs=1e-6)


def test_weight_decay_skips_norms_and_biases():
    exp = build_experiment(load_config(None, TINY + ["model=tiny-gpt2"]))
    mask = weight_decay_mask(exp.state.params)
    assert mask["layers"]["attn"]["q"]["kernel"] and mask["embedding"]
    assert not mask["layers"]["attn"]["q"]["bias"] and not mask["layers"]["attn_norm"]["scale"]


def test_z_loss_adds_its_term():
    batch = random_batch(8, 32, 256)
    _, plain = _run(["optimizer.lr=1e-9"], steps=1, batches=[batch])
    exp, with_z = _run(["optimizer.lr=1e-9", "train.z_loss=1e-2"], steps=1, batches=[batch])
    assert with_z[0] > plain[0] + 1e-3  # lse^2 of a fresh model is ~ log(V)^2 = 30.7, times 1e-2
    np.testing.assert_allclose(with_z[0] - plain[0], 1e-2 * np.log(256) ** 2, rtol=0.05)


@pytest.mark.parametrize("frozen_head", [False, True])
def test_chunked_loss_gradients_equal_autodiff_of_the_full_loss(frozen_head):
    """The gradients taken chunk by chunk in the forward pass equal autodiff's (z-loss, weights, a short chunk)."""
    from maxtrain.objectives import chunked_lm_loss, token_cross_entropy

    k = jax.random.split(jax.random.PRNGKey(0), 4)
    b, s, d, v, z = 2, 23, 16, 50, 1e-2
    head = {"w": jax.random.normal(k[0], (v, d)), "bias": jax.random.normal(k[1], (v,))}
    hidden = jax.random.normal(k[2], (b, s, d))
    targets = jax.random.randint(k[3], (b, s), 0, v)
    weights = (jnp.arange(s) % 3 > 0).astype(jnp.float32)[None].repeat(b, 0)
    logits_of = lambda p, h: h @ p["w"].T + p["bias"]  # noqa: E731

    def full(p, h):
        nll, lse, _ = token_cross_entropy(logits_of(p, h), targets)
        return jnp.sum(nll * weights) + z * jnp.sum(lse**2 * weights)

    def chunked(p, h):
        return 3.0 * chunked_lm_loss(logits_of, p, h, targets, weights, chunk=5, z_loss=z)[0]  # 3x: a cotangent != 1

    argnums = (1,) if frozen_head else (0, 1)
    want = jax.grad(lambda p, h: 3.0 * full(p, h), argnums)(head, hidden)
    got = jax.jit(jax.grad(chunked, argnums))(head, hidden)
    np.testing.assert_allclose(chunked(head, hidden), 3.0 * full(head, hidden), rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(want[-1]).max()) > 0.1


def test_chunked_loss_equals_full_loss_and_holds_fewer_logits():
    """loss_chunk gives the same losses and params (a short last chunk included) with less temp memory."""
    base = ["model=tiny-llama", "model.vocab_size=8192", "train.seq_len=96", "train.global_batch=4", "steps=10",
            "mesh.data=1", "mesh.fsdp=1", "train.compute_dtype=float32", "model.tie_embeddings=true", "train.z_loss=1e-3"]  # fmt: skip
    batch = random_batch(4, 96, 8192, seed=3, docs_per_row=2)
    runs = {}
    for chunk in (0, 20):  # 96 = 4 x 20 + 16
        exp = build_experiment(load_config(None, base + [f"train.loss_chunk={chunk}"]), devices=jax.devices()[:1])
        b = jax.device_put(batch, exp.batch_sharding)
        compiled = exp.train_step.lower(exp.state, b).compile()
        state, losses = exp.state, []
        for _ in range(3):
            state, m = compiled(state, b)
            losses.append(float(m["loss"]))
        runs[chunk] = (losses, state.params, compiled.memory_analysis().temp_size_in_bytes)
    np.testing.assert_allclose(runs[20][0], runs[0][0], rtol=1e-5)
    for a, r in zip(jax.tree.leaves(runs[20][1]), jax.tree.leaves(runs[0][1])):
        np.testing.assert_allclose(a, r, atol=2e-5)
    logits_bytes = 4 * 96 * 8192 * 4  # one f32 [B, S, V] tensor
    assert runs[0][2] - runs[20][2] > 0.75 * logits_bytes, (runs[20][2], runs[0][2], logits_bytes)  # measured: 1.36


def test_cpu_compiler_defaults_train_like_xla_defaults():
    """The measured CPU option set (matmuls off YNNPACK) is on by default, can be turned off, and trains identically."""
    from maxtrain.step import xla_options

    same = [random_batch(8, 32, 256, seed=0, docs_per_row=2)] * 5
    tuned, tuned_losses = _run([], 5, same)
    plain, plain_losses = _run(["train.xla_options={}"], 5, same)
    assert xla_options(tuned.mesh) == {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert xla_options(plain.mesh, {}) is None
    assert xla_options(plain.mesh, {"xla_cpu_enable_fast_math": False}) == {"xla_cpu_enable_fast_math": False}
    assert tuned_losses[-1] < tuned_losses[0] - 0.5
    np.testing.assert_allclose(tuned_losses, plain_losses, rtol=1e-5)

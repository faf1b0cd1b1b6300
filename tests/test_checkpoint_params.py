"""Params export/load, training-checkpoint save/restore across meshes, shape errors, init_from."""

import resource
import signal

import jax
import numpy as np
import pytest

from maxtrain.checkpoint import TrainCheckpointer, abstract_of, complete_steps, init_state_from, load_params, read_metadata, save_params
from maxtrain.config import load_config
from maxtrain.errors import UserError
from maxtrain.experiment import build_experiment

TINY = ["model=tiny-llama", "model.d_model=32", "model.ffn_dim=64", "model.num_heads=4", "model.num_kv_heads=2",
        "train.seq_len=16", "train.global_batch=8", "steps=4"]  # fmt: skip


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_trees_equal(a, b):
    flat_a, tree_a = jax.tree.flatten(_host(a))
    flat_b, tree_b = jax.tree.flatten(_host(b))
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An fsdp=8 experiment after two steps (non-trivial opt state), and its checkpoint dir."""
    from tests.synthetic import random_batch
    from maxtrain.data import make_global_batch

    cfg = load_config(None, TINY + ["mesh.fsdp=8"])
    exp = build_experiment(cfg)
    with jax.set_mesh(exp.mesh):
        for seed in range(2):
            batch = make_global_batch(random_batch(8, 16, cfg.model.vocab_size, seed=seed, docs_per_row=2), exp.batch_sharding)
            exp.state, _ = exp.train_step(exp.state, batch)
    directory = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    ckpt = TrainCheckpointer(directory, cfg.checkpoint, cfg=cfg, tokenizer_identity="sp:test")
    ckpt.save(2, exp.state, {"position": 7})
    ckpt.close()
    return cfg, exp, directory


@pytest.mark.parametrize("mesh, devices", [(["mesh.data=2", "mesh.fsdp=4"], 8), (["mesh.fsdp=4"], 4)])
def test_resharded_restore_is_identical(trained, mesh, devices):
    cfg, exp, directory = trained
    other = build_experiment(load_config(None, TINY + mesh), devices=jax.devices()[:devices])
    ckpt = TrainCheckpointer(directory, cfg.checkpoint, cfg=cfg, tokenizer_identity="sp:test")
    state, data_state, step = ckpt.restore_latest(other.state)
    ckpt.close()
    assert step == 2 and int(state.step) == 2 and data_state == [{"position": 7}]
    _assert_trees_equal(state, exp.state)
    # The arrays land in the new mesh's shardings, not the saved ones.
    leaf = state.params["layers"]["mlp"]["up"]["kernel"]
    assert leaf.sharding == other.state_shardings.params["layers"]["mlp"]["up"]["kernel"]
    assert len(leaf.sharding.device_set) == devices


def test_export_then_load_on_another_mesh_and_metadata(trained, tmp_path):
    cfg, exp, directory = trained
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"not a real model, only copied")
    save_params(tmp_path / "export", exp.state.params, cfg=cfg, tokenizer_path=str(tok), extra={"step": 2})
    meta = read_metadata(tmp_path / "export")
    assert meta["format"] == "maxtrain-params" and meta["step"] == 2
    assert meta["model"]["d_model"] == 32 and meta["tokenizer"]["file"] == "tokenizer.model"
    assert (tmp_path / "export" / "tokenizer.model").read_bytes() == tok.read_bytes()
    assert not (tmp_path / "export" / "opt_state").exists()
    other = build_experiment(load_config(None, TINY + ["mesh.fsdp=2", "mesh.tensor=2"]), devices=jax.devices()[:4])
    params = load_params(tmp_path / "export", abstract_of(other.state.params))
    _assert_trees_equal(params, exp.state.params)
    # A training checkpoint's step dir and its run dir work too.
    _assert_trees_equal(load_params(directory / "2", abstract_of(other.state.params)), exp.state.params)
    _assert_trees_equal(load_params(directory.parent, abstract_of(other.state.params)), exp.state.params)
    assert read_metadata(directory.parent)["format"] == "maxtrain-checkpoint"
    assert read_metadata(directory / "2")["tokens_seen"] == 2 * 8 * 16
    with pytest.raises(UserError, match="already holds exported params"):
        save_params(tmp_path / "export", exp.state.params, cfg=cfg)


def test_shape_mismatch_names_the_parameters(trained):
    _, _, directory = trained
    wider = build_experiment(load_config(None, TINY + ["model.d_model=48", "mesh.fsdp=8"]))
    with pytest.raises(UserError) as err:
        load_params(directory.parent, abstract_of(wider.state.params))
    msg = str(err.value)
    assert "embedding checkpoint [256, 32] vs model [256, 48]" in msg
    assert "layers/attn/q/kernel" in msg and "final_norm/scale" in msg and "\n" not in msg
    ckpt = TrainCheckpointer(directory, wider.cfg.checkpoint, cfg=wider.cfg, tokenizer_identity=None)
    with pytest.raises(UserError, match="mismatching parameters"):
        ckpt.restore_latest(wider.state)  # resume never falls back to random weights
    ckpt.close()


def test_init_from_gives_params_and_a_fresh_optimizer(trained):
    cfg, exp, directory = trained
    new = build_experiment(load_config(None, TINY + ["mesh.fsdp=8", f"init_from={directory.parent}"]))
    fresh_opt = _host(new.state.opt_state)
    state = init_state_from(new, new.cfg.init_from)
    _assert_trees_equal(state.params, exp.state.params)
    _assert_trees_equal(state.opt_state, fresh_opt)  # Adam moments at zero, count 0
    assert int(state.step) == 0


def test_missing_and_incomplete_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_metadata(tmp_path / "nope")
    (tmp_path / "half" / "params").mkdir(parents=True)  # params written, maxtrain.json never was
    with pytest.raises(UserError, match="holds no maxtrain params"):
        load_params(tmp_path / "half", {})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "params").mkdir()
    (tmp_path / "bad" / "maxtrain.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable"):
        read_metadata(tmp_path / "bad")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax worker loop teardown
def test_failed_write_is_one_clear_error_and_keeps_the_previous_checkpoint(trained, tmp_path):
    cfg, exp, _ = trained
    ckpt = TrainCheckpointer(tmp_path / "checkpoints", cfg.checkpoint, cfg=cfg, tokenizer_identity=None)
    ckpt.save(1, exp.state, {})
    ckpt.wait()
    # A real OS write error, like a full disk: files may not grow past 16 kB in this process.
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, old_limit[1]))
    try:
        with pytest.raises(UserError) as err:
            ckpt.save(2, exp.state, {})
            ckpt.wait()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    msg = str(err.value)
    assert msg.startswith(f"could not write the checkpoint at step 2 to '{tmp_path / 'checkpoints'}': File too large")
    assert "the checkpoint at step 1 is intact" in msg and "\n" not in msg
    ckpt.manager.close()
    assert complete_steps(tmp_path / "checkpoints") == [1]
    restored = TrainCheckpointer(tmp_path / "checkpoints", cfg.checkpoint, cfg=cfg, tokenizer_identity=None)
    state, _, step = restored.restore_latest(exp.state)
    restored.close()
    assert step == 1
    _assert_trees_equal(state.params, exp.state.params)

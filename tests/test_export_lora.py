"""LoRA runs leave maxtrain as merged weights (HF or maxtrain layout) or as base + PEFT adapter, with equal logits.

One tiny Llama LoRA run (adapters on every projection, random B != 0, saved by the
training checkpointer) is the source; every export is checked against the
run's own LoRA forward on the same tokens: max |logit difference| <= 1e-4 (f32).
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from maxtrain.checkpoint import TrainCheckpointer, load_params, read_metadata  # noqa: E402
from maxtrain.checkpoint.params import model_config_of  # noqa: E402
from maxtrain.cli import main  # noqa: E402
from maxtrain.config import load_config  # noqa: E402
from maxtrain.convert.core import abstract_param_shapes, unflatten  # noqa: E402
from maxtrain.finetune.lora import split_lora  # noqa: E402
from maxtrain.finetune.trainable import path_name  # noqa: E402
from maxtrain.generate import load_generator  # noqa: E402

V = 128
TOKENS = np.random.default_rng(0).integers(0, V, (2, 24))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A saved LoRA run: its dir, params, LoRA and base logits on TOKENS, and the jitted base forward.

    The adapters get random B (trained-like; B = 0 would hide a missing merge) and the state is
    written by the training checkpointer, as a run's would be.
    """
    import flax.linen as nn
    import jax.numpy as jnp

    from maxtrain.experiment import finetuned_model_config, make_apply_fn
    from maxtrain.model.transformer import Transformer
    from maxtrain.step import TrainState

    cfg = load_config(None, [
        "model=tiny-llama", f"model.vocab_size={V}", "finetune.lora.rank=4", "finetune.lora.alpha=8",
        "finetune.lora.targets=[q,k,v,o,gate,up,down]", "steps=3",
    ])  # fmt: skip
    model = Transformer(finetuned_model_config(cfg))
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 64))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.05 * jax.random.normal(next(keys), x.shape) if path_name(p).endswith("lora_b") else x, params
    )
    run = tmp_path_factory.mktemp("lora") / "run"
    state = TrainState(step=jnp.int32(3), params=params, opt_state={"count": jnp.int32(3)}, rng=jax.random.PRNGKey(2))
    ckpt = TrainCheckpointer(run / "checkpoints", cfg.checkpoint, cfg=cfg, tokenizer_identity=None)
    ckpt.save(3, state, {})
    ckpt.close()
    adapted = np.asarray(jax.jit(make_apply_fn(model, cfg.mesh.rules))(params, TOKENS))
    base_fn = jax.jit(make_apply_fn(Transformer(cfg.model), cfg.mesh.rules))
    base = np.asarray(base_fn(split_lora(params)[0], TOKENS))
    assert np.abs(adapted - base).max() > 1e-2  # merging (or not) is visible in the logits
    return {"run": run, "params": params, "adapted": adapted, "base": base, "base_fn": base_fn}


def _hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def _assert_same_params(got, want):
    flat = lambda t: {path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}  # noqa: E731
    got, want = flat(got), flat(want)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_lora_run_converts_to_hf_with_merged_weights(lora_run, tmp_path):
    run = lora_run["run"]
    assert read_metadata(run)["model"]["lora"]["rank"] == 4  # the checkpoint records the model it holds
    assert main(["convert", "to-hf", str(run), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert np.abs(_hf_logits(hf) - lora_run["adapted"]).max() <= 1e-4

    generator, _, _ = load_generator(str(run), devices=jax.devices()[:1])  # generate rebuilds the LoRA model
    assert generator.cfg.lora is not None
    _assert_same_params(generator.params, lora_run["params"])


def test_export_keeps_adapters_or_merges_them(lora_run, tmp_path):
    run = lora_run["run"]
    assert main(["export", str(run), str(tmp_path / "adapters")]) == 0
    generator, _, _ = load_generator(str(tmp_path / "adapters"), devices=jax.devices()[:1])
    assert generator.cfg.lora is not None
    _assert_same_params(generator.params, lora_run["params"])

    assert main(["export", str(run), str(tmp_path / "merged"), "--merge-lora"]) == 0
    meta = read_metadata(tmp_path / "merged")
    assert meta["model"]["lora"] is None and meta["merged_lora"]["rank"] == 4
    # A merged export is a plain base model: load_params with the base model's shapes reads it.
    shapes = abstract_param_shapes(model_config_of(meta))
    assert not any("lora" in name for name in shapes)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = unflatten({n: jax.ShapeDtypeStruct(s, np.float32, sharding=sharding) for n, s in shapes.items()})
    merged = load_params(tmp_path / "merged", abstract)
    assert np.abs(np.asarray(lora_run["base_fn"](merged, TOKENS)) - lora_run["adapted"]).max() <= 1e-4


def test_peft_adapter_on_the_base_export_equals_the_lora_model(lora_run, tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.numpy import load_file

    run, adapted, base = lora_run["run"], lora_run["adapted"], lora_run["base"]
    argv = ["convert", "to-hf", str(run), str(tmp_path / "base"), "--peft-adapter", str(tmp_path / "adapter")]
    assert main(argv) == 0
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert weights["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"].shape == (4, 64)
    assert weights["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (64, 4)
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    assert np.abs(_hf_logits(hf_base) - base).max() <= 1e-4  # the base weights, unmerged
    model = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    assert np.abs(_hf_logits(model) - adapted).max() <= 1e-4


def test_older_checkpoint_metadata_gets_lora_from_the_run_config():
    meta = {"model": {"vocab_size": 8, "d_model": 8, "num_layers": 1, "num_heads": 2, "ffn_dim": 8},
            "config": {"finetune": {"lora": {"rank": 2, "alpha": 4.0, "targets": ["q"]}, "classifier": None}}}  # fmt: skip
    cfg = model_config_of(meta)
    assert cfg.lora.rank == 2 and cfg.lora.scale == 2.0 and cfg.classifier is None

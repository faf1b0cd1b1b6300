"""LoRA runs leave maxtrain as merged weights (HF or maxtrain layout) or as base + PEFT adapter, with equal logits.

One tiny Llama LoRA run (adapters on every projection, a few real train steps so B != 0,
saved by the training checkpointer) is the source; every export is checked against the
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
from maxtrain.convert.core import abstract_param_shapes  # noqa: E402
from maxtrain.finetune.lora import split_lora  # noqa: E402
from maxtrain.generate import load_generator  # noqa: E402

V = 128
TOKENS = np.random.default_rng(0).integers(0, V, (2, 24))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """(run dir, the LoRA model's logits on TOKENS, the base model's logits) after 3 LoRA steps."""
    from maxtrain.experiment import build_experiment
    from tests.synthetic import random_batch

    cfg = load_config(None, [
        "model=tiny-llama", f"model.vocab_size={V}", "finetune.lora.rank=4", "finetune.lora.alpha=8",
        "finetune.lora.targets=[q,k,v,o,gate,up,down]", "train.global_batch=8", "train.seq_len=32", "steps=3",
        "optimizer.lr=3e-2", "optimizer.warmup_steps=0",
    ])  # fmt: skip
    exp = build_experiment(cfg, devices=jax.devices()[:1])  # one device: faster compiles
    state = exp.state
    for step in range(3):
        state, _ = exp.train_step(state, jax.device_put(random_batch(8, 32, V, seed=step, docs_per_row=1), exp.batch_sharding))
    assert float(np.abs(np.asarray(state.params["layers"]["attn"]["q"]["lora_b"])).max()) > 1e-2  # the adapters trained
    run = tmp_path_factory.mktemp("lora") / "run"
    ckpt = TrainCheckpointer(run / "checkpoints", cfg.checkpoint, cfg=cfg, tokenizer_identity=None)
    ckpt.save(3, state, {})
    ckpt.close()
    adapted = np.asarray(exp.apply_fn(state.params, TOKENS))
    base_params, _ = split_lora(state.params)
    from maxtrain.experiment import make_apply_fn
    from maxtrain.model.transformer import Transformer

    base = np.asarray(make_apply_fn(Transformer(cfg.model), cfg.mesh.rules)(base_params, TOKENS))
    assert np.abs(adapted - base).max() > 1e-2  # merging (or not) is visible in the logits
    return run, adapted, base


def _hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def test_lora_run_converts_to_hf_with_merged_weights(lora_run, tmp_path):
    run, adapted, _ = lora_run
    meta = read_metadata(run)
    assert meta["model"]["lora"]["rank"] == 4  # the checkpoint records the model it holds
    assert main(["convert", "to-hf", str(run), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert np.abs(_hf_logits(hf) - adapted).max() <= 1e-4

    generator, _, _ = load_generator(str(run), devices=jax.devices()[:1])  # generate rebuilds the LoRA model
    dense = generator.model.clone(decode=False)
    assert np.abs(np.asarray(dense.apply({"params": generator.params}, TOKENS)) - adapted).max() <= 1e-5


def test_export_keeps_adapters_or_merges_them(lora_run, tmp_path):
    run, adapted, _ = lora_run
    assert main(["export", str(run), str(tmp_path / "adapters")]) == 0
    generator, _, _ = load_generator(str(tmp_path / "adapters"), devices=jax.devices()[:1])
    assert generator.cfg.lora is not None
    dense = generator.model.clone(decode=False)
    assert np.abs(np.asarray(dense.apply({"params": generator.params}, TOKENS)) - adapted).max() <= 1e-5

    assert main(["export", str(run), str(tmp_path / "merged"), "--merge-lora"]) == 0
    meta = read_metadata(tmp_path / "merged")
    assert meta["model"]["lora"] is None and meta["merged_lora"]["rank"] == 4
    cfg = model_config_of(meta)
    shapes = abstract_param_shapes(cfg)
    assert not any("lora" in name for name in shapes)
    generator, _, _ = load_generator(str(tmp_path / "merged"), devices=jax.devices()[:1])
    dense = generator.model.clone(decode=False)
    assert np.abs(np.asarray(dense.apply({"params": generator.params}, TOKENS)) - adapted).max() <= 1e-4
    # a merged export is a plain base model: load_params with the base model's shapes reads it
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    from maxtrain.convert.core import unflatten

    abstract = unflatten({n: jax.ShapeDtypeStruct(s, np.float32, sharding=sharding) for n, s in shapes.items()})
    assert jax.tree.structure(load_params(tmp_path / "merged", abstract)) == jax.tree.structure(abstract)


def test_peft_adapter_on_the_base_export_equals_the_lora_model(lora_run, tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.numpy import load_file

    run, adapted, base = lora_run
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

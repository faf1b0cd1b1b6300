"""Prompt tuning, prefix tuning and (IA)^3 runs export as base weights + a PEFT adapter that real `peft` loads.

Each run (tiny GQA Llama, trained-like random method leaves, saved by the training
checkpointer) goes through `maxtrain convert to-hf RUN OUT --peft-adapter DIR`;
`peft.PeftModel.from_pretrained(base, DIR)` must give maxtrain's logits within 1e-4. (IA)^3
also exports merged; bottleneck adapters have no PEFT format and are refused in one line.
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from maxtrain.checkpoint import TrainCheckpointer  # noqa: E402
from maxtrain.cli import main  # noqa: E402
from maxtrain.config import load_config  # noqa: E402
from maxtrain.finetune.trainable import new_leaf, path_name  # noqa: E402

V = 128
TOKENS = np.random.default_rng(0).integers(0, V, (2, 20))
P = 4
RUNS = {
    "ia3": ["finetune.ia3={targets: [k, v, down]}"],
    "prompt": [f"finetune.prompt_tuning={{num_virtual_tokens: {P}, init: random}}"],
    "prefix": [f"finetune.prefix_tuning={{num_virtual_tokens: {P}, reparameterize: true, hidden: 16}}"],
    "adapter": ["finetune.adapter={size: 8, placement: houlsby}"],
}


def _run(name, tmp_path):
    """A saved run of method `name` with trained-like leaves; returns (run dir, maxtrain logits on TOKENS)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from maxtrain.experiment import finetuned_model_config, make_apply_fn
    from maxtrain.model.transformer import Transformer
    from maxtrain.step import TrainState

    cfg = load_config(None, ["model=tiny-llama", f"model.vocab_size={V}", "model.num_kv_heads=2", "steps=3", *RUNS[name]])
    model = Transformer(finetuned_model_config(cfg))
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 64))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.2 * jax.random.normal(next(keys), x.shape) if new_leaf(path_name(p)) else x, params
    )
    run = tmp_path / "run"
    state = TrainState(step=jnp.int32(3), params=params, opt_state={"count": jnp.int32(3)}, rng=jax.random.PRNGKey(2))
    ckpt = TrainCheckpointer(run / "checkpoints", cfg.checkpoint, cfg=cfg, tokenizer_identity=None)
    ckpt.save(3, state, {})
    ckpt.close()
    return run, np.asarray(jax.jit(make_apply_fn(model, cfg.mesh.rules))(params, TOKENS))


def _hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(TOKENS)).logits.numpy()


@pytest.mark.parametrize("name", ["ia3", "prompt", "prefix"])
def test_peft_adapter_equals_the_maxtrain_model(name, tmp_path):
    run, ours = _run(name, tmp_path)
    argv = ["convert", "to-hf", str(run), str(tmp_path / "base"), "--peft-adapter", str(tmp_path / "adapter")]
    assert main(argv) == 0
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    base = _hf_logits(hf_base)
    model = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    theirs = _hf_logits(model)[:, -TOKENS.shape[1]:]  # prompt tuning returns the soft prompt's positions too
    assert np.abs(theirs - base).max() > 1e-2  # the adapter is visible in the logits
    assert np.abs(theirs - ours).max() <= 1e-4, np.abs(theirs - ours).max()


def test_ia3_exports_merged_and_adapters_are_refused_in_one_line(tmp_path, capsys):
    run, ours = _run("ia3", tmp_path)
    assert main(["convert", "to-hf", str(run), str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert np.abs(_hf_logits(merged) - ours).max() <= 1e-4

    # maxtrain's own merged export: a base model (ia3: null) with the adapted logits; a generator rebuilds it.
    from maxtrain.checkpoint import read_metadata
    from maxtrain.generate import load_generator

    assert main(["export", str(run), str(tmp_path / "merged_mt"), "--merge"]) == 0
    assert read_metadata(tmp_path / "merged_mt")["model"]["ia3"] is None
    generator, _, _ = load_generator(str(tmp_path / "merged_mt"), devices=jax.devices()[:1])
    assert generator.cfg.ia3 is None
    from maxtrain.model.transformer import Transformer

    logits = np.asarray(Transformer(generator.cfg).apply({"params": generator.params}, TOKENS))
    assert np.abs(logits - ours).max() <= 1e-4

    run, _ = _run("adapter", tmp_path / "a")
    for extra in ([], ["--peft-adapter", str(tmp_path / "adapter")]):
        capsys.readouterr()
        assert main(["convert", "to-hf", str(run), str(tmp_path / "hf"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "finetune.adapter" in err and "maxtrain export" in err, err
        assert not (tmp_path / "hf").exists() and not (tmp_path / "adapter").exists()
    assert main(["export", str(run), str(tmp_path / "m"), "--merge"]) == 2  # adapters do not merge
    assert "finetune.adapter cannot be merged" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()

"""HF <-> maxtrain conversion against transformers (CPU, f32) on random tiny models built here.

Per family: logits within 1e-4 of transformers (we reach ~3e-7), HF -> maxtrain -> HF
reproduces every tensor bit for bit, and batched greedy KV-cache generation equals
transformers' greedy `generate` token for token.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from maxtrain.cli import main  # noqa: E402
from maxtrain.convert import convert_from_hf, convert_to_hf  # noqa: E402
from maxtrain.convert.safetensors_io import SafetensorsReader  # noqa: E402
from maxtrain.generate import Sampling, load_generator  # noqa: E402

V = 128
LLAMA_LIKE = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
FAMILIES = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        LLAMA_LIKE, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(LLAMA_LIKE, sliding_window=6)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(LLAMA_LIKE)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(LLAMA_LIKE, head_dim=32)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                  bos_token_id=1, eos_token_id=2)),
}  # fmt: skip


def make_hf_model(family: str, path, dtype=None):
    """A random tiny HF model of `family`, saved with save_pretrained (no downloads)."""
    cfg_name, model_name, fields = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, cfg_name)(**fields)).eval()
    with torch.no_grad():  # random norms and biases too, so every tensor's mapping is exercised
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name or "ln" in name else 0.1 * torch.randn_like(p))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    return model


def safetensors_tensors(path):
    reader = SafetensorsReader(path)
    return {n: reader.read(n) for n in reader.tensors}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_logits_roundtrip_and_greedy_generate(family, tmp_path, monkeypatch):
    hf_model = make_hf_model(family, tmp_path / "hf")
    if family in ("llama3", "gpt2"):  # big-model path: every leaf over 1 KiB written slice by slice, in row chunks
        monkeypatch.setattr("maxtrain.convert.importer.DIRECT_WRITE_BYTES", 1024)
        monkeypatch.setattr("maxtrain.convert.orbax_io.ROW_CHUNK_BYTES", 4096)
    convert_from_hf(tmp_path / "hf", tmp_path / "mt")
    # One family runs with params sharded over the 8 test devices; the rest on one (faster compiles).
    devices = jax.devices() if family == "llama3" else jax.devices()[:1]
    generator, _, _ = load_generator(str(tmp_path / "mt"), devices=devices)

    tokens = np.random.default_rng(0).integers(0, V, (2, 40))
    with torch.no_grad():
        reference = hf_model(torch.tensor(tokens)).logits.numpy()
    dense = generator.model.clone(decode=False)
    ours = np.asarray(jax.jit(lambda p, t: dense.apply({"params": p}, t))(generator.params, jnp.asarray(tokens)))
    assert np.abs(ours - reference).max() <= 1e-4

    prompts = [[5, 9, 3, 7, 1, 8, 60], [11, 2], [99] * 12]  # different lengths in one batch
    ours_greedy = generator.generate(prompts, Sampling(max_new_tokens=8))
    for prompt, got in zip(prompts, ours_greedy):
        with torch.no_grad():
            want = hf_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert got == want[0, len(prompt):].tolist()

    convert_to_hf(tmp_path / "mt", tmp_path / "back")
    before, after = safetensors_tensors(tmp_path / "hf"), safetensors_tensors(tmp_path / "back")
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype and np.array_equal(before[name], after[name]), name


def test_bf16_sharded_export_roundtrips_and_loads_in_transformers(tmp_path):
    make_hf_model("qwen3", tmp_path / "hf", dtype=torch.bfloat16)
    convert_from_hf(tmp_path / "hf", tmp_path / "mt")
    files = convert_to_hf(tmp_path / "mt", tmp_path / "back", max_shard_bytes=40_000)  # keeps bf16, several shards
    assert "model.safetensors.index.json" in files and len(files) > 3
    before, after = safetensors_tensors(tmp_path / "hf"), safetensors_tensors(tmp_path / "back")
    assert sorted(before) == sorted(after)
    assert all(after[n].dtype == before[n].dtype and np.array_equal(before[n], after[n]) for n in before)
    # Compare with the original dir loaded the same way (an in-memory .to(bf16) model also casts
    # its rotary buffer, so it is not the reference).
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        assert reloaded.dtype == torch.bfloat16 and torch.equal(reloaded(tokens).logits, original(tokens).logits)
    # the re-exported shards convert again (sharded import through the index)
    convert_from_hf(tmp_path / "back", tmp_path / "mt2")


def test_model_trained_in_maxtrain_exports_with_the_same_greedy_tokens(tmp_path):
    from maxtrain.checkpoint.params import save_params
    from maxtrain.config import load_config
    from maxtrain.experiment import build_experiment
    from tests.synthetic import random_batch

    cfg = load_config(None, ["model=tiny-llama", "train.global_batch=8", "train.seq_len=32", "steps=12",
                             "optimizer.lr=3e-3", "optimizer.warmup_steps=0", "model.vocab_size=128"])  # fmt: skip
    exp = build_experiment(cfg, devices=jax.devices()[:1])  # one device: faster compiles
    state = exp.state
    for step in range(12):
        batch = random_batch(8, 32, 128, seed=step % 2, docs_per_row=1)
        state, _ = exp.train_step(state, jax.device_put(batch, exp.batch_sharding))
    save_params(tmp_path / "mt", state.params, cfg=cfg)
    convert_to_hf(tmp_path / "mt", tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    generator, _, _ = load_generator(str(tmp_path / "mt"), devices=jax.devices()[:1])
    prompts = [[7, 3, 9, 1], [20, 21, 22, 23, 24, 25, 26, 27, 28]]
    ours = generator.generate(prompts, Sampling(max_new_tokens=12))
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            want = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert got == want[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "hf"
    make_hf_model("qwen2", path)
    return path


def _cli_error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    return capsys.readouterr().err.strip()


def test_unsupported_architecture_is_exit_2(llama_dir, tmp_path, capsys):
    bad = tmp_path / "hf"
    shutil.copytree(llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="mamba", architectures=["MambaForCausalLM"])))
    err = _cli_error(capsys, "convert", "from-hf", str(bad), str(tmp_path / "out"))
    assert "model_type 'mamba' (MambaForCausalLM) is not supported" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_shard_is_exit_2(llama_dir, tmp_path, capsys):
    convert_from_hf(llama_dir, tmp_path / "mt")
    convert_to_hf(tmp_path / "mt", tmp_path / "sharded", max_shard_bytes=30_000)
    shard = sorted((tmp_path / "sharded").glob("model-00002-*.safetensors"))[0]
    shard.unlink()
    err = _cli_error(capsys, "convert", "from-hf", str(tmp_path / "sharded"), str(tmp_path / "out"))
    assert f"shard '{shard.name}'" in err and "is missing" in err


def test_shape_disagreeing_with_config_is_exit_2(llama_dir, tmp_path, capsys):
    bad = tmp_path / "hf"
    shutil.copytree(llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=96)))
    err = _cli_error(capsys, "convert", "from-hf", str(bad), str(tmp_path / "out"))
    assert "tensor model.layers.0.mlp.gate_proj.weight has shape [128, 64] but config.json implies [96, 64]" in err


def test_unexpected_dtype_is_exit_2(tmp_path, capsys):
    from safetensors.numpy import save_file

    make_hf_model("qwen2", tmp_path / "hf")
    tensors = safetensors_tensors(tmp_path / "hf")
    tensors["model.layers.1.self_attn.q_proj.weight"] = tensors["model.layers.1.self_attn.q_proj.weight"].astype(np.int8)
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    err = _cli_error(capsys, "convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "out"))
    assert "tensor model.layers.1.self_attn.q_proj.weight has dtype I8" in err

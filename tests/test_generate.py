"""Sampling filters, EOS stopping and cache-vs-full-forward agreement of maxtrain.generate; the CLI against transformers."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxtrain.config import MeshConfig
from maxtrain.finetune.prefix import PrefixTuningConfig
from maxtrain.finetune.prompt import PromptTuningConfig
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


@pytest.mark.parametrize("overrides", [
    {},  # grouped-query attention (4 heads, 2 kv heads), no window
    {"sliding_window": 4},
    {"prompt_tuning": PromptTuningConfig(num_virtual_tokens=3, init="random"), "sliding_window": 6},
    {"prefix_tuning": PrefixTuningConfig(num_virtual_tokens=3), "sliding_window": 4},  # the prefix outlives the window
], ids=["gqa", "window", "soft_prompt", "prefix"])
def test_a_batch_of_mixed_prompt_lengths_decodes_every_row_as_the_full_forward(overrides):
    """Rows of 1, 5, 16 and 17 tokens share one batch (and cache); each row's greedy tokens equal the cache-free forward's."""
    gen, model, params = _tiny_generator(**overrides)
    prompts = [[7], [3, 9, 27, 17, 51], list(range(1, 17)), list(range(20, 37))]
    new = 8
    out = gen.generate(prompts, Sampling(max_new_tokens=new))
    forward = jax.jit(lambda buf: model.apply({"params": params}, buf))
    buf = np.zeros((len(prompts), 17 + new), np.int32)  # causal: the zeros after a row's end do not change its logits
    for row, p in enumerate(prompts):
        buf[row, : len(p)] = p
    for i in range(new):
        logits = np.asarray(forward(jnp.asarray(buf)))
        for row, p in enumerate(prompts):
            buf[row, len(p) + i] = int(logits[row, len(p) + i - 1].argmax())
    assert out == [buf[row, len(p) : len(p) + new].tolist() for row, p in enumerate(prompts)]


def test_sampling_is_reproducible_by_seed():
    gen, _, _ = _tiny_generator()
    s = Sampling(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    a, b = gen.generate([[1, 2, 3]], s), gen.generate([[1, 2, 3]], s)
    c = gen.generate([[1, 2, 3]], Sampling(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=8))
    assert a == b and a != c


def _word_tokenizer(vocab: int):
    """A word-level tokenizer.json: <pad> <s> </s> <unk> and words w4..w{vocab-1} (no training, no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>"])
    return tok


@pytest.mark.slow
def test_generate_cli_on_a_converted_hf_model_equals_transformers(tmp_path):
    """`maxtrain generate` (--prompt and --prompts, real subprocesses) gives transformers' greedy tokens."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from maxtrain.convert import convert_from_hf

    vocab, new_tokens = 64, 6
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    hf_model = transformers.LlamaForCausalLM(config).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    tok = _word_tokenizer(vocab)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                         unk_token="<unk>").save_pretrained(tmp_path / "hf")  # fmt: skip
    convert_from_hf(tmp_path / "hf", tmp_path / "mt")

    prompts = ["w5 w9 w17 w33", "w40", "w7 w7 w7 w7 w7 w7 w11"]  # different lengths in one batch
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    base = [sys.executable, "-m", "maxtrain.cli", "generate", "--checkpoint", str(tmp_path / "mt"), "--max-new-tokens", str(new_tokens)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")  # one device
    procs = [subprocess.Popen(base + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for args in (["--prompt", prompts[0]], ["--prompts", str(tmp_path / "prompts.jsonl")])]  # fmt: skip
    (single, err1), (batch, err2) = (p.communicate(timeout=300) for p in procs)
    assert procs[0].returncode == 0 and procs[1].returncode == 0, (err1 + err2)[-3000:]

    expected = []
    for prompt in prompts:
        ids = [1] + tok.encode(prompt, add_special_tokens=False).ids  # Llama prompts start with BOS
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=2, pad_token_id=0)
        new = out[0, len(ids):].tolist()
        before, after = tok.decode(ids[1:]), tok.decode(ids[1:] + [t for t in new if t != 2])
        expected.append((new, after[len(before):]))  # the text after the prompt, with its leading space
    assert single.rstrip("\n") == expected[0][1]  # the completion alone (--echo adds the prompt)
    records = [json.loads(line) for line in batch.strip().splitlines()]
    assert [r["prompt"] for r in records] == prompts
    assert [(r["new_tokens"], r["completion"]) for r in records] == [(len(n), text) for n, text in expected]

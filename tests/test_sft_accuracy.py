"""SFT learns a task: greedy exact match on held-out prompts rises from zero within a small step budget.

The real path end to end, in process: JSONL records -> the sft data format and packer ->
the shared train step -> `maxtrain.evaluate.exact_match` with the KV-cache Generator.
The task is reversing three letters from a seven-letter alphabet (343 prompts): a tiny
random-init model has to read the prompt, since no reply can be memorised for a prompt it
never saw.
"""

import itertools
import json
import random

import jax
import pytest

from maxtrain.config import load_config
from maxtrain.data import build_pipeline
from maxtrain.data.formats import RecordEncoder, template_for
from maxtrain.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from maxtrain.evaluate import exact_match
from maxtrain.experiment import build_experiment, finetuned_model_config
from maxtrain.generate import Generator

LETTERS = "abcdefg"
MODEL = ["model=tiny-llama", "model.d_model=64", "model.ffn_dim=128", "model.num_layers=2", "model.num_heads=4",
         "model.num_kv_heads=4", "model.max_seq_len=64", "optimizer.weight_decay=0", "data.eval_fraction=0",
         "data.prefetch=0", "data.format.type=sft", "data.format.template=plain", "train.objective=sft",
         "train.global_batch=16", "train.unroll_layers=true"]  # fmt: skip


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """(tokenizer, train JSONL path, held-out records, packed row length): 250 train prompts, 40 held out."""
    prompts = [" ".join(p) for p in itertools.product(LETTERS, repeat=3)]
    random.Random(0).shuffle(prompts)
    recs = [{"instruction": p, "output": " ".join(reversed(p.split()))} for p in prompts]
    train, held_out = recs[:250], recs[250:290]
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in held_out}
    tok = SentencePieceTokenizer(train_sentencepiece([LETTERS + " User: Assistant:\n"] * 30, vocab_size=40, model_type="char"))
    path = tmp_path_factory.mktemp("sft") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in train))
    # Every record has the same length, so rows of exactly two records never split one
    # across rows (a split reply would be trained without its prompt).
    doc_len = len(RecordEncoder(load_config(None, MODEL).data.format, tok)(train[0], "")["tokens"])
    return tok, path, held_out, 2 * doc_len


def _accuracy(exp, cfg, tok, records):
    gen = Generator(finetuned_model_config(cfg), exp.state.params, mesh=exp.mesh, rules=cfg.mesh.rules)
    return exact_match(gen, tok, records, template_for("plain"), max_new_tokens=8, batch_size=40)


# LoRA is not here: on a random base it trains only with lm_head + norms unfrozen (the frozen
# head caps the logits near +-1) and then reaches the task in 150-250 steps depending on the
# seed, which is too close to the CI budget to assert reliably; tests/test_lora.py covers
# its mechanics (first logits, merge).
def test_full_sft_held_out_exact_match_rises_from_zero_to_80_percent_in_150_steps(task):
    tok, path, held_out, seq_len = task
    steps = 150
    # lr 1e-2 stalls on the "any three of the letters" plateau (loss 0.83); 3e-3 passes it by step ~100.
    cfg = load_config(None, MODEL + ["optimizer.lr=3e-3", f"steps={steps}", f"train.seq_len={seq_len}", "optimizer.warmup_steps=10",
                                             f"model.vocab_size={tok.vocab_size}", f"data.sources=[{{type: jsonl, path: {path}}}]"])  # fmt: skip
    exp = build_experiment(cfg, devices=jax.devices()[:1])
    with jax.set_mesh(exp.mesh):
        before = _accuracy(exp, cfg, tok, held_out)
        with build_pipeline(cfg.data, tok, split="train", seq_len=seq_len, global_batch=16, seed=0) as it:
            for _ in range(steps):
                exp.state, metrics = exp.train_step(exp.state, jax.device_put(next(it), exp.batch_sharding))
        after = _accuracy(exp, cfg, tok, held_out)
    print("exact match", before["accuracy"], "->", after["accuracy"], "loss", float(metrics["loss"]), after["examples"][:2])
    assert before["count"] == after["count"] == 40
    assert before["accuracy"] <= 0.05  # a random model does not reverse strings
    assert after["accuracy"] >= 0.8  # measured 1.0 (loss 0.03)

"""Log-likelihood scoring against transformers on a converted random tiny Llama; MC accuracy and perplexity by hand."""

import json
import math

import numpy as np
import pytest

from maxtrain.cli import main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

V, BOS, EOS = 64, 1, 2


def _word_tokenizer():
    """A word-level tokenizer.json: <pad> <s> </s> <unk> and words w4..w63 (no training, no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, V)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>"])
    return tok


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(HF model, maxtrain export dir) of one random tiny Llama with a word-level tokenizer."""
    from maxtrain.convert import convert_from_hf

    path = tmp_path_factory.mktemp("scoring")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0)  # fmt: skip
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(path / "hf")
    transformers.PreTrainedTokenizerFast(tokenizer_object=_word_tokenizer(), bos_token="<s>", eos_token="</s>",
                                         pad_token="<pad>", unk_token="<unk>").save_pretrained(path / "hf")  # fmt: skip
    convert_from_hf(path / "hf", path / "mt")
    return hf, path / "mt"


def _hf_loglikelihood(hf, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(ids).logits[0].double(), dim=-1)
    n = len(context)
    return float(sum(logprobs[n - 1 + i, t] for i, t in enumerate(continuation)))


def _words(text: str) -> list[int]:
    return [int(w[1:]) for w in text.split()]


def test_loglikelihoods_equal_transformers(model):
    import jax

    from maxtrain.generate import load_generator
    from maxtrain.scoring import Scorer

    hf, mt = model
    generator, _, _ = load_generator(str(mt), devices=jax.devices()[:2])  # params sharded over 2 devices
    scorer = Scorer.from_generator(generator, batch_size=4)
    rng = np.random.default_rng(0)
    requests = [([BOS, *rng.integers(4, V, n_ctx).tolist()], rng.integers(4, V, n_cont).tolist())
                for n_ctx, n_cont in [(1, 1), (5, 3), (20, 7), (40, 2), (3, 30), (11, 11)]]  # fmt: skip
    ours = scorer.loglikelihoods(requests)
    for (ctx, cont), (ll, greedy) in zip(requests, ours):
        assert ll == pytest.approx(_hf_loglikelihood(hf, ctx, cont), abs=1e-4)
    # A continuation is greedy exactly when each of its tokens is the argmax: take HF's own argmax path.
    ctx = [BOS, 5, 9]
    with torch.no_grad():
        path = hf.generate(torch.tensor([ctx]), max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 3:].tolist()
    assert scorer.loglikelihoods([(ctx, path)])[0][1] is True
    assert scorer.loglikelihoods([(ctx, path[:-1] + [path[-1] % 50 + 5])])[0][1] is False
    # A document scored in windows shorter than itself: each window conditioned on the one token before it.
    doc = rng.integers(4, V, 50).tolist()
    windowed = Scorer.from_generator(generator, batch_size=4, max_len=16)
    tokens = [BOS, *doc]
    by_hand = sum(_hf_loglikelihood(hf, tokens[max(0, j - 17) : i], tokens[i:j])
                  for i in range(1, 51, 16) for j in [min(i + 16, 51)])  # fmt: skip
    assert windowed.rolling_loglikelihoods([doc], BOS)[0] == pytest.approx(by_hand, abs=1e-4)


def test_multiple_choice_cli_equals_a_hand_computation(model, tmp_path, capsys):
    hf, mt = model
    records = [
        {"context": "w5 w9 w17", "choices": ["w33", "w40 w41 w42", "w7"], "label": 1},
        {"context": "w8", "choices": ["w8 w8", "w12"], "label": 0},
        {"context": "w20 w21 w22 w23", "choices": ["w30", "w31", "w32", "w33 w34"], "label": 3},
        {"context": "w60 w61", "choices": ["w10 w11", "w12"], "label": 1},
    ]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["eval", "--checkpoint", str(mt), "--data", str(tmp_path / "mc.jsonl"), "--out", str(tmp_path / "r.json")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    written = json.loads((tmp_path / "r.json").read_text())
    hits = hits_norm = 0
    for r, ours in zip(records, written["loglikelihoods"]):
        ll = [_hf_loglikelihood(hf, [BOS, *_words(r["context"])], _words(c)) for c in r["choices"]]
        np.testing.assert_allclose(ours, ll, atol=1e-4)
        hits += int(np.argmax(ll)) == r["label"]
        hits_norm += int(np.argmax([x / len(c.encode()) for x, c in zip(ll, r["choices"])])) == r["label"]
    assert (printed["acc"], printed["acc_norm"], printed["count"]) == (hits / 4, hits_norm / 4, 4)
    assert hits != hits_norm  # the two metrics disagree here, so each is checked on its own


def test_perplexity_cli_equals_a_hand_computation(model, tmp_path, capsys):
    hf, mt = model
    text = "w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w4 w5 w6"
    (tmp_path / "held.txt").write_text(text)
    assert main(["eval", "--checkpoint", str(mt), "--data", str(tmp_path / "held.txt")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    total = _hf_loglikelihood(hf, [BOS], _words(text))
    assert result["tokens"] == 13 and result["bytes"] == len(text)
    assert result["loss"] == pytest.approx(-total / 13, abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(-total / 13), rel=1e-4)
    assert result["bits_per_byte"] == pytest.approx(-total / len(text) / math.log(2), abs=1e-5)


@pytest.mark.parametrize("record, expected", [
    ({"context": "w5", "choices": ["w6", "w7"], "label": 2}, "mc.jsonl:1: label 2 is not an index into its 2 choices (0..1)"),
    ({"context": "w5", "choices": ["w6"], "label": 0}, '"choices" must be a list of at least two non-empty strings'),
])  # fmt: skip
def test_bad_multiple_choice_record_is_one_line(model, record, expected, tmp_path, capsys):
    (tmp_path / "mc.jsonl").write_text(json.dumps(record) + "\n")
    assert main(["eval", "--checkpoint", str(model[1]), "--data", str(tmp_path / "mc.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err

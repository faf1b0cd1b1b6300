"""`maxtrain fill-mask` on a converted BertForMaskedLM (random tiny model + WordPiece tokenizer.json
built here): the top-1 fill and its probability equal transformers' on the same ids."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tokenizers = pytest.importorskip("tokenizers")

from maxtrain.cli import main  # noqa: E402
from tests.test_convert_encoder import V, make_hf_model  # noqa: E402

WORDS = ["the", "a", "function", "returns", "list", "of", "keys", "value", "dict", "calls", "runs", "fast"]


def _hf_dir(tmp_path):
    hf_dir = tmp_path / "hf"
    model = make_hf_model("bert-mlm", hf_dir)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    vocab += [f"w{i}" for i in range(V - len(vocab))]
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    tok.decoder = tokenizers.decoders.WordPiece()
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({
        "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "mask_token": "[MASK]", "unk_token": "[UNK]"}))
    return hf_dir, model, tok


def test_fill_mask_top1_equals_transformers(tmp_path, capsys):
    hf_dir, hf_model, tok = _hf_dir(tmp_path)
    out = tmp_path / "mt"
    assert main(["convert", "from-hf", str(hf_dir), str(out)]) == 0
    capsys.readouterr()
    text = "the [MASK] returns a list of [MASK]"
    assert main(["fill-mask", "--checkpoint", str(out), "--text", text, "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == text and len(lines) == 3
    ids = [2] + tok.encode(text, add_special_tokens=False).ids + [3]
    with torch.no_grad():
        probs = torch.softmax(hf_model(input_ids=torch.tensor([ids])).logits[0], -1).numpy()
    for line, pos in zip(lines[1:], np.flatnonzero(np.array(ids) == 4)):
        best = int(probs[pos].argmax())
        first = line.split(":", 1)[1].split("  ")[0].strip()  # "'tok' 0.123"
        word, p = first.rsplit(" ", 1)
        assert word.strip("'") == tok.id_to_token(best)
        assert abs(float(p) - probs[pos, best]) < 1e-3


def test_fill_mask_needs_a_mask_and_a_masked_lm(tmp_path, capsys):
    hf_dir, _, _ = _hf_dir(tmp_path)
    out = tmp_path / "mt"
    assert main(["convert", "from-hf", str(hf_dir), str(out)]) == 0
    capsys.readouterr()
    assert main(["fill-mask", "--checkpoint", str(out), "--text", "no mask here"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no mask in" in err

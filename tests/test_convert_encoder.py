"""BERT / RoBERTa <-> maxtrain against transformers (CPU, f32) on random tiny models built here.

Per architecture (BertForMaskedLM, RobertaForMaskedLM, BertForSequenceClassification,
RobertaForSequenceClassification): logits within 1e-4 of transformers on padded batches with
token types (we reach ~1e-6), the fill-mask argmax equals transformers', HF -> maxtrain -> HF
reproduces every tensor bit for bit, and transformers loads the export with the same logits.
"""

import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from maxtrain.cli import main  # noqa: E402
from maxtrain.convert import convert_from_hf, convert_to_hf  # noqa: E402
from maxtrain.convert.safetensors_io import SafetensorsReader  # noqa: E402
from maxtrain.model.transformer import Transformer  # noqa: E402

V, S = 96, 24
SHAPE = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=40)  # fmt: skip
MODELS = {  # name: (config class, model class, auto class, extra config fields)
    "bert-mlm": ("BertConfig", "BertForMaskedLM", "AutoModelForMaskedLM", {}),
    "roberta-mlm": ("RobertaConfig", "RobertaForMaskedLM", "AutoModelForMaskedLM", dict(type_vocab_size=1)),
    "bert-cls": ("BertConfig", "BertForSequenceClassification", "AutoModelForSequenceClassification", dict(num_labels=3)),
    "roberta-cls": ("RobertaConfig", "RobertaForSequenceClassification", "AutoModelForSequenceClassification",
                    dict(num_labels=3, hidden_act="gelu_new")),
}  # fmt: skip
MASK_ID = 4


def make_hf_model(name: str, path):
    """A random tiny HF encoder, norms and biases random too, saved with save_pretrained (no downloads)."""
    cfg_name, model_name, _, fields = MODELS[name]
    torch.manual_seed(0)
    config = getattr(transformers, cfg_name)(**SHAPE, **fields)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if "LayerNorm" in pname or "layer_norm" in pname else 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def load_ours(path):
    """(model, params) of a maxtrain params dir, on one device."""
    from maxtrain.checkpoint.params import load_params, model_config_of, read_metadata

    cfg = model_config_of(read_metadata(path))
    model = Transformer(cfg)
    shapes = jax.eval_shape(lambda r: nn.unbox(model.init(r, jnp.zeros((1, 2), jnp.int32))["params"]), jax.random.PRNGKey(0))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), shapes)
    return model, load_params(path, abstract)


def encoder_inputs(name: str):
    """A padded batch (row 1 ends in padding) without RoBERTa's pad id 1 among real tokens; masks at 3 and 7."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, V, (2, S))
    tokens[:, 0] = 0 if name.startswith("roberta") else 2  # <s> / [CLS]
    tokens[:, [3, 7]] = MASK_ID
    real = np.ones((2, S), np.int32)
    real[1, 15:] = 0
    tokens[1, 15:] = 1 if name.startswith("roberta") else 0  # the pad id
    types = (np.arange(S)[None] >= 10).astype(np.int64).repeat(2, 0) if name.startswith("bert") else np.zeros((2, S), np.int64)
    return tokens, real, types


def ours_and_theirs(name, hf_model, mt_dir):
    tokens, real, types = encoder_inputs(name)
    model, params = load_ours(mt_dir)
    positions = np.broadcast_to(np.arange(S), (2, S))
    classify = name.endswith("cls")
    fn = jax.jit(lambda p, t, tt: model.apply({"params": p}, t, positions, real, token_type_ids_BxS=tt, classify=classify))
    ours = np.asarray(fn(params, jnp.asarray(tokens), jnp.asarray(types)))
    with torch.no_grad():
        theirs = hf_model(torch.tensor(tokens), attention_mask=torch.tensor(real), token_type_ids=torch.tensor(types)).logits.numpy()
    return ours, theirs, real


def safetensors_tensors(path):
    reader = SafetensorsReader(path)
    return {n: reader.read(n) for n in reader.tensors}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_encoder_logits_fill_mask_roundtrip_and_reload(name, tmp_path):
    hf_model = make_hf_model(name, tmp_path / "hf")
    convert_from_hf(tmp_path / "hf", tmp_path / "mt")
    ours, theirs, real = ours_and_theirs(name, hf_model, tmp_path / "mt")
    if name.endswith("mlm"):
        diff = np.abs(ours - theirs)[real.astype(bool)].max()  # padding positions are nobody's output
        assert diff <= 1e-4, diff
        # fill-mask: the top token at each [MASK] is transformers' top token
        assert np.array_equal(ours[:, [3, 7]].argmax(-1), theirs[:, [3, 7]].argmax(-1))
    else:
        assert ours.shape == (2, 3) and np.abs(ours - theirs).max() <= 1e-4

    convert_to_hf(tmp_path / "mt", tmp_path / "back")
    before, after = safetensors_tensors(tmp_path / "hf"), safetensors_tensors(tmp_path / "back")
    assert sorted(before) == sorted(after)
    for tensor in before:
        assert before[tensor].dtype == after[tensor].dtype and np.array_equal(before[tensor], after[tensor]), tensor
    auto = getattr(transformers, MODELS[name][2])
    reloaded = auto.from_pretrained(tmp_path / "back").eval()
    assert type(reloaded).__name__ == MODELS[name][1]
    tokens, real, types = encoder_inputs(name)
    args = dict(attention_mask=torch.tensor(real), token_type_ids=torch.tensor(types))
    with torch.no_grad():
        assert torch.equal(reloaded(torch.tensor(tokens), **args).logits, hf_model(torch.tensor(tokens), **args).logits)


@pytest.mark.parametrize("preset", ["tiny-bert", "tiny-roberta"])
def test_finetuned_encoder_exports_as_sequence_classification(preset, tmp_path):
    """A classifier trained here (cls pooling through the pooler) loads as ...ForSequenceClassification with our logits."""
    from maxtrain.checkpoint.params import save_params
    from maxtrain.config import load_config
    from maxtrain.experiment import build_experiment

    cfg = load_config(None, [f"model={preset}", "train.objective=classification", "finetune.classifier.num_labels=3",
                             "finetune.classifier.pooling=cls", "train.seq_len=16", "model.vocab_size=96"])  # fmt: skip
    exp = build_experiment(cfg, devices=jax.devices()[:1])
    rng = np.random.default_rng(1)  # the head starts at zero: give it values that make the logits differ
    params = jax.tree.map(np.asarray, exp.state.params)
    params["classifier"]["out"]["kernel"] = rng.standard_normal(params["classifier"]["out"]["kernel"].shape).astype(np.float32)
    save_params(tmp_path / "mt", params, cfg=cfg)
    convert_to_hf(tmp_path / "mt", tmp_path / "hf")
    hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(hf_model).__name__ == ("Roberta" if "roberta" in preset else "Bert") + "ForSequenceClassification"
    tokens = rng.integers(5, 96, (2, 16))
    real = np.ones((2, 16), np.int32)
    real[0, 12:] = 0
    ours = exp.apply_fn(params, jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(16), (2, 16)), jnp.asarray(real), classify=True)
    with torch.no_grad():
        theirs = hf_model(torch.tensor(tokens), attention_mask=torch.tensor(real)).logits.numpy()
    assert np.abs(np.asarray(ours) - theirs).max() <= 1e-4


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("enc") / "hf"
    make_hf_model("bert-mlm", path)
    return path


def _cli_error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    return capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(position_embedding_type="relative_key"), "position_embedding_type='relative_key' is not supported"),
        (dict(is_decoder=True), "is_decoder=true is not supported"),
        (dict(architectures=["BertForTokenClassification"]), "architectures='BertForTokenClassification' is not supported"),
    ],
)
def test_unsupported_bert_options_are_exit_2(bert_dir, tmp_path, capsys, change, message):
    bad = tmp_path / "hf"
    shutil.copytree(bert_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, **change)))
    err = _cli_error(capsys, "convert", "from-hf", str(bad), str(tmp_path / "out"))
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_original_bert_checkpoint_names_convert(bert_dir, tmp_path):
    """Google's release names LayerNorm gamma / beta and carries the next-sentence head and tied decoder: same params."""
    from safetensors.numpy import save_file

    legacy = tmp_path / "legacy"
    shutil.copytree(bert_dir, legacy)
    tensors = {n.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): t
               for n, t in safetensors_tensors(bert_dir).items()}  # fmt: skip
    tensors["cls.seq_relationship.weight"] = np.zeros((2, SHAPE["hidden_size"]), np.float32)
    tensors["cls.seq_relationship.bias"] = np.zeros((2,), np.float32)
    tensors["cls.predictions.decoder.weight"] = tensors["bert.embeddings.word_embeddings.weight"]
    save_file(tensors, str(legacy / "model.safetensors"), metadata={"format": "pt"})
    convert_from_hf(bert_dir, tmp_path / "a")
    convert_from_hf(legacy, tmp_path / "b")
    _, a = load_ours(tmp_path / "a")
    _, b = load_ours(tmp_path / "b")
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

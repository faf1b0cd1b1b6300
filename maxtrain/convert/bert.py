"""BERT and RoBERTa: one encoder layout (post-norm, biases everywhere, token types), two dialects.

Tensors are nn.Linear [out, in] like Llama's, under "bert." / "roberta.". The heads
follow the architecture: ...ForMaskedLM adds the MLM head (cls.predictions / lm_head, its
decoder tied to the word embedding), ...ForSequenceClassification a classifier on the
first token. Both classification heads are dense + tanh on the first token then a linear
layer: BERT's dense is its pooler (bert.pooler), RoBERTa's lives in the head
(classifier.dense), and either maps to our pooler (or, without one, the head's own dense).
RoBERTa offsets positions by pad_token_id + 1 (position_offset), so its table has
max_position_embeddings = max_seq_len + 2 rows.
"""

from __future__ import annotations

import re

from maxtrain.convert.core import Family, Rule, linear, require, same
from maxtrain.errors import UserError
from maxtrain.model.config import ModelConfig

_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu"}
_ACT_NAME = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
_CLASS = {"bert": "Bert", "roberta": "Roberta"}
_REFUSED = (  # (config.json key, refused value, why)
    ("is_decoder", True, "maxtrain converts bidirectional encoders only"),
    ("add_cross_attention", True, "maxtrain converts bidirectional encoders only"),
    ("tie_word_embeddings", False, "maxtrain's MLM head decodes with the word embedding (tied)"),
)
# Architectures whose tensors this layout covers (heads beyond these: token classification, QA, ... are refused).
_HEADS = ("Model", "ForMaskedLM", "ForPreTraining", "ForSequenceClassification")


def _classifies(hf: dict) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or [])


def model_config(kind: str):
    """config.json of a BERT / RoBERTa model -> ModelConfig fields (the heads' presence comes from from_tensors)."""

    def convert(hf: dict) -> dict:
        for key, bad, why in _REFUSED:
            if hf.get(key) is bad:
                raise UserError(f"config.json {key}={str(bad).lower()} is not supported for {kind}; {why}")
        pos_type = hf.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise UserError(f"config.json position_embedding_type={pos_type!r} is not supported; only 'absolute' positions convert")
        for arch in hf.get("architectures") or []:
            if not any(arch == _CLASS[kind] + head for head in _HEADS):
                supported = ", ".join(_CLASS[kind] + h for h in _HEADS)
                raise UserError(f"config.json architectures={arch!r} is not supported; {kind} converts as {supported}")
        act = hf.get("hidden_act", "gelu")
        if act not in _ACT:
            raise UserError(f"config.json hidden_act={act!r} is not supported; supported: {', '.join(sorted(_ACT))}")
        pad = hf.get("pad_token_id")
        offset = (1 if pad is None else int(pad)) + 1 if kind == "roberta" else 0
        fields = dict(
            family=kind,
            vocab_size=require(hf, "vocab_size"),
            d_model=require(hf, "hidden_size"),
            num_layers=require(hf, "num_hidden_layers"),
            num_heads=require(hf, "num_attention_heads"),
            ffn_dim=require(hf, "intermediate_size"),
            max_seq_len=require(hf, "max_position_embeddings") - offset,
            position_offset=offset,
            norm="layernorm",
            norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            norm_position="post",
            mlp="plain",
            activation=_ACT[act],
            positions="learned",
            type_vocab_size=int(hf.get("type_vocab_size", 2)),
            embed_norm=True,
            qkv_bias=True,
            out_bias=True,
            mlp_bias=True,
            tie_embeddings=True,
            causal=False,
        )
        if _classifies(hf):
            labels = len(hf["id2label"]) if hf.get("id2label") else int(hf.get("num_labels", 2))
            if labels < 2:
                raise UserError(f"config.json has num_labels={labels} (a regression head); maxtrain classifies into 2 or more labels")
            fields["classifier"] = {"num_labels": labels, "pooling": "cls"}
        return fields

    return convert


def _names(kind: str) -> dict[str, str]:
    if kind == "bert":
        return {"mlm": "cls.predictions.", "mlm_norm": "transform.LayerNorm", "mlm_dense": "transform.dense",
                "pooler": "bert.pooler.dense"}  # fmt: skip
    return {"mlm": "lm_head.", "mlm_norm": "layer_norm", "mlm_dense": "dense", "pooler": "roberta.pooler.dense"}


def from_tensors(kind: str):
    """Whether the checkpoint holds a pooler and an MLM head (config.json does not say; BertModel has neither head)."""
    n = _names(kind)

    def fields(hf: dict, shapes: dict) -> dict:
        mlm_head = f"{n['mlm']}{n['mlm_dense']}.weight" in shapes
        if kind == "roberta" and mlm_head and hf.get("hidden_act", "gelu") != "gelu":
            raise UserError(
                f"config.json hidden_act={hf.get('hidden_act')!r}: RoBERTa's LM head always uses gelu, "
                "so this model's MLM head cannot convert"
            )
        # RoBERTa's classification head has its own dense layer; a pooler beside it is unused (transformers drops it too).
        pooler = f"{n['pooler']}.weight" in shapes and not (kind == "roberta" and _classifies(hf))
        return {"pooler": pooler, "mlm_head": mlm_head}

    return fields


def hf_config(kind: str):
    """ModelConfig -> config.json of the architecture its heads make (..ForSequenceClassification / ..ForMaskedLM / ..Model)."""

    def convert(cfg: ModelConfig) -> dict:
        head = "ForSequenceClassification" if cfg.classifier else "ForMaskedLM" if cfg.mlm_head else "Model"
        out = {
            "architectures": [_CLASS[kind] + head],
            "model_type": kind,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "intermediate_size": cfg.ffn_dim,
            "hidden_act": _ACT_NAME[cfg.activation],
            "max_position_embeddings": cfg.max_seq_len + cfg.position_offset,
            "type_vocab_size": cfg.type_vocab_size,
            "layer_norm_eps": cfg.norm_eps,
            "position_embedding_type": "absolute",
            "is_decoder": False,
            "tie_word_embeddings": True,
            # BERT's published dropout, for training on in transformers (maxtrain's stack has none).
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
        }
        if kind == "roberta":  # RoBERTa derives positions from pad_token_id: the offset must survive any tokenizer
            out["pad_token_id"] = cfg.position_offset - 1
        if cfg.classifier:
            out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.classifier.num_labels)}
            out["label2id"] = {f"LABEL_{i}": i for i in range(cfg.classifier.num_labels)}
        return out

    return convert


def rules(kind: str):
    """Tensor rules of the BERT / RoBERTa layout for a config (its heads switched by the config)."""
    n = _names(kind)

    def make(cfg: ModelConfig) -> list[Rule]:
        e, p = f"{kind}.embeddings.", f"{kind}.encoder.layer.{{i}}."
        out = [
            same(e + "word_embeddings.weight", "embedding"),
            same(e + "position_embeddings.weight", "position_embedding"),
            same(e + "LayerNorm.weight", "embed_norm/scale"),
            same(e + "LayerNorm.bias", "embed_norm/bias"),
            linear(p + "attention.output.dense.weight", "layers/attn/o/kernel", 2),
            same(p + "attention.output.dense.bias", "layers/attn/o/bias"),
            same(p + "attention.output.LayerNorm.weight", "layers/attn_norm/scale"),
            same(p + "attention.output.LayerNorm.bias", "layers/attn_norm/bias"),
            linear(p + "intermediate.dense.weight", "layers/mlp/up/kernel", 1),
            same(p + "intermediate.dense.bias", "layers/mlp/up/bias"),
            linear(p + "output.dense.weight", "layers/mlp/down/kernel", 1),
            same(p + "output.dense.bias", "layers/mlp/down/bias"),
            same(p + "output.LayerNorm.weight", "layers/mlp_norm/scale"),
            same(p + "output.LayerNorm.bias", "layers/mlp_norm/bias"),
        ]
        for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
            out.append(linear(p + f"attention.self.{theirs}.weight", f"layers/attn/{ours}/kernel", 1))
            out.append(same(p + f"attention.self.{theirs}.bias", f"layers/attn/{ours}/bias", flat=True))
        if cfg.type_vocab_size:
            out.append(same(e + "token_type_embeddings.weight", "token_type_embedding"))
        if cfg.mlm_head:
            m = n["mlm"]
            out += [
                linear(m + n["mlm_dense"] + ".weight", "mlm_head/dense/kernel", 1),
                same(m + n["mlm_dense"] + ".bias", "mlm_head/dense/bias"),
                same(m + n["mlm_norm"] + ".weight", "mlm_head/norm/scale"),
                same(m + n["mlm_norm"] + ".bias", "mlm_head/norm/bias"),
                same(m + "bias", "mlm_head/bias"),
            ]
        # The dense + tanh on the first token: ours is the pooler, or the classifier's own dense.
        dense = "pooler/dense" if cfg.pooler else "classifier/dense" if cfg.classifier else None
        if dense:
            theirs = "classifier.dense" if kind == "roberta" and cfg.classifier else n["pooler"]
            out += [linear(theirs + ".weight", dense + "/kernel", 1), same(theirs + ".bias", dense + "/bias")]
        if cfg.classifier:
            out_name = "classifier.out_proj" if kind == "roberta" else "classifier"
            out += [linear(out_name + ".weight", "classifier/out/kernel", 1), same(out_name + ".bias", "classifier/out/bias")]
        return out

    return make


def exportable(kind: str):
    """Reasons a ModelConfig cannot be written in this dialect (empty when it can)."""

    def check(cfg: ModelConfig) -> list[str]:
        problems = []
        if (cfg.norm, cfg.mlp, cfg.positions, cfg.norm_position) != ("layernorm", "plain", "learned", "post"):
            problems.append("needs norm=layernorm, mlp=plain, positions=learned, norm_position=post")
        if not (cfg.qkv_bias and cfg.out_bias and cfg.mlp_bias and cfg.embed_norm and cfg.tie_embeddings):
            problems.append("needs qkv_bias, out_bias, mlp_bias, embed_norm and tie_embeddings")
        if cfg.kv_heads != cfg.num_heads or cfg.dim_per_head * cfg.num_heads != cfg.d_model:
            problems.append("needs num_kv_heads == num_heads and head_dim == d_model / num_heads")
        if cfg.causal or cfg.qk_norm or cfg.sliding_window is not None:
            problems.append("needs causal=false and has no qk_norm or sliding window")
        if kind == "bert" and (cfg.position_offset or not cfg.type_vocab_size):
            problems.append("bert needs position_offset=0 and type_vocab_size >= 1")
        if kind == "roberta" and not cfg.position_offset:
            problems.append("roberta needs position_offset >= 1 (pad_token_id + 1)")
        if cfg.classifier is not None and cfg.classifier.pooling != "cls":
            head = f"{_CLASS[kind]}ForSequenceClassification"
            problems.append(f"its classifier pools '{cfg.classifier.pooling}'; {head} needs finetune.classifier.pooling=cls")
        return problems

    return check


def export_model(cfg: ModelConfig) -> ModelConfig:
    """A finetuned classifier exports as ...ForSequenceClassification, which has no MLM head; LoRA is merged."""
    from maxtrain.finetune import registry

    methods = {k: v for k, v in registry.base_updates().items() if k != "classifier"}  # merged (or refused)
    if cfg.classifier is not None:
        return cfg.model_copy(update={**methods, "mlm_head": False})
    return cfg.model_copy(update=methods)


def _legacy_name(name: str) -> str:
    """Original Google BERT checkpoints name LayerNorm parameters gamma / beta."""
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))


def _family(kind: str) -> Family:
    if kind == "bert":
        heads = r"cls\.predictions\.decoder\.(weight|bias)|cls\.seq_relationship\..*"
    else:
        heads = r"lm_head\.decoder\.(weight|bias)"
    return Family(
        name=kind,
        model_types=(kind,),
        architecture=_CLASS[kind] + "ForMaskedLM",
        to_model_config=model_config(kind),
        to_hf_config=hf_config(kind),
        rules=rules(kind),
        check_exportable=exportable(kind),
        # Tied decoders, BERT's next-sentence head, position-id buffers; RoBERTa's unused pooler beside its classifier.
        ignored=(heads, rf"{kind}\.embeddings\.(position_ids|token_type_ids)", rf"{kind}\.pooler\.dense\.(weight|bias)"),
        prefix=f"{kind}.",
        rename=_legacy_name,
        from_tensors=from_tensors(kind),
        export_model=export_model,
    )


BERT = _family("bert")
ROBERTA = _family("roberta")

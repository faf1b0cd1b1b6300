"""Llama 2/3/3.x, Mistral, Qwen2/2.5 and Qwen3: one tensor layout, four config dialects.

HF stores nn.Linear weights as [out, in]; our kernels are [in dims..., out dims...] with
heads split out (q: [D, N, H], o: [N, H, D]). RoPE needs no permutation: our RoPE uses the
same rotate-half pairing as transformers.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from maxtrain.convert.core import Family, Rule, first_present, linear, require, same
from maxtrain.errors import UserError
from maxtrain.model.config import ModelConfig

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "relu": "relu"}
ACTIVATION_NAMES = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def activation(hf: dict, key: str) -> str:
    """Our activation name for the config's `key`; a UserError for ones we do not implement."""
    name = hf.get(key, "silu")
    if name not in ACTIVATIONS:
        raise UserError(f"config.json {key}={name!r} is not supported; supported: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


def rope_fields(hf: dict) -> dict:
    """rope_theta and rope_scaling from either transformers 4 (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    theta = first_present(params, "rope_theta", default=first_present(hf, "rope_theta", default=10000.0))
    fields: dict = {"rope_theta": float(theta), "rope_scaling": None}
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise UserError(f"config.json rope scaling type {kind!r} is not supported (only 'llama3'); convert a model without it")
        fields["rope_scaling"] = {
            "factor": float(scaling["factor"]),
            "low_freq_factor": float(scaling.get("low_freq_factor", 1.0)),
            "high_freq_factor": float(scaling.get("high_freq_factor", 4.0)),
            "original_max_position": int(scaling.get("original_max_position_embeddings", 8192)),
        }
    return fields


def _window(hf: dict, model_type: str) -> int | None:
    if model_type == "mistral":
        return hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        layer_types = hf.get("layer_types") or []
        if any(t != "sliding_attention" for t in layer_types) or hf.get("max_window_layers", 0) > 0 and not layer_types:
            raise UserError(
                "config.json uses sliding windows on some layers only (use_sliding_window with max_window_layers); "
                "maxtrain applies one window to every layer, so this model cannot convert"
            )
        return hf.get("sliding_window")
    return None


def model_config(model_type: str):
    """config.json -> ModelConfig fields for one dialect."""

    def convert(hf: dict) -> dict:
        d, n = require(hf, "hidden_size"), require(hf, "num_attention_heads")
        head_dim = hf.get("head_dim")
        bias = bool(hf.get("attention_bias", False))
        return dict(
            family=model_type,
            vocab_size=require(hf, "vocab_size"),
            d_model=d,
            num_layers=require(hf, "num_hidden_layers"),
            num_heads=n,
            num_kv_heads=hf.get("num_key_value_heads") or n,
            head_dim=head_dim if head_dim and head_dim * n != d else None,
            ffn_dim=require(hf, "intermediate_size"),
            max_seq_len=hf.get("max_position_embeddings", 2048),
            norm="rmsnorm",
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            mlp="gated",
            activation=activation(hf, "hidden_act"),
            positions="rope",
            # Qwen2 always has q/k/v biases (and never an o bias); Llama-style attention_bias covers all four.
            qkv_bias=True if model_type == "qwen2" else bias,
            out_bias=False if model_type == "qwen2" else bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=_window(hf, model_type),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            **rope_fields(hf),
        )

    return convert


def hf_config(model_type: str, architecture: str):
    """ModelConfig -> config.json fields (written for both transformers 4 and 5 readers)."""

    def convert(cfg: ModelConfig) -> dict:
        rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        rope_scaling = None
        if cfg.rope_scaling is not None:
            s = cfg.rope_scaling
            rope_scaling = {
                "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_position,
            }  # fmt: skip
            rope_parameters.update(rope_scaling)
        out = {
            "architectures": [architecture],
            "model_type": model_type,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.ffn_dim,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.dim_per_head,
            "hidden_act": ACTIVATION_NAMES[cfg.activation],
            "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta,
            "rope_scaling": rope_scaling,
            "rope_parameters": rope_parameters,
            "tie_word_embeddings": cfg.tie_embeddings,
        }
        if scalar_head(cfg):  # a reward model: one score on the last real token
            out.update(architectures=[architecture.replace("ForCausalLM", "ForSequenceClassification")], num_labels=1,
                       id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        if model_type in ("llama", "qwen3"):
            out["attention_bias"] = cfg.qkv_bias
        if model_type == "llama":
            out["mlp_bias"] = cfg.mlp_bias
        if model_type == "mistral":
            out["sliding_window"] = cfg.sliding_window
        if model_type in ("qwen2", "qwen3"):
            out.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                       max_window_layers=0 if cfg.sliding_window else cfg.num_layers)  # fmt: skip
        return out

    return convert


def rules(cfg: ModelConfig) -> list[Rule]:
    """Tensor rules of the Llama layout (Qwen adds biases / qk-norm, switched by the config)."""
    p = "model.layers.{i}."
    out = [
        same("model.embed_tokens.weight", "embedding"),
        same("model.norm.weight", "final_norm/scale"),
        same(p + "input_layernorm.weight", "layers/attn_norm/scale"),
        same(p + "post_attention_layernorm.weight", "layers/mlp_norm/scale"),
        linear(p + "self_attn.q_proj.weight", "layers/attn/q/kernel", 1),
        linear(p + "self_attn.k_proj.weight", "layers/attn/k/kernel", 1),
        linear(p + "self_attn.v_proj.weight", "layers/attn/v/kernel", 1),
        linear(p + "self_attn.o_proj.weight", "layers/attn/o/kernel", 2),
        linear(p + "mlp.gate_proj.weight", "layers/mlp/gate/kernel", 1),
        linear(p + "mlp.up_proj.weight", "layers/mlp/up/kernel", 1),
        linear(p + "mlp.down_proj.weight", "layers/mlp/down/kernel", 1),
    ]
    if scalar_head(cfg):  # ...ForSequenceClassification: the score replaces the LM head
        out.append(_score_rule())
    elif not cfg.tie_embeddings:
        out.append(linear("lm_head.weight", "lm_head/kernel", 1))
    if cfg.qkv_bias:
        out += [same(p + f"self_attn.{x}_proj.bias", f"layers/attn/{x}/bias", flat=True) for x in "qkv"]
    if cfg.out_bias:
        out.append(same(p + "self_attn.o_proj.bias", "layers/attn/o/bias"))
    if cfg.mlp_bias:
        out += [same(p + f"mlp.{x}_proj.bias", f"layers/mlp/{x}/bias") for x in ("gate", "up", "down")]
    if cfg.qk_norm:
        out += [same(p + f"self_attn.{x}_norm.weight", f"layers/attn/{x}_norm/scale") for x in "qk"]
    return out


def _score_rule() -> Rule:
    """HF's bias-free score [1, D] <-> our one-label head (kernel [D, 1], bias [1]).

    The reward objective never reads the bias (objectives_preference.sequence_rewards), so
    the export leaves it out and an import sets it to zero.
    """
    score = linear("score.weight", "classifier/out/kernel", 1)
    return Rule(score.hf, ("classifier/out/kernel", "classifier/out/bias"), score.hf_shape,
                lambda a, s: (a.T.reshape(s[0]), np.zeros(s[1], a.dtype)), lambda xs: score.to_hf(xs[:1]))


def exportable(model_type: str):
    """Reasons a ModelConfig cannot be written in this dialect (empty when it can)."""

    def check(cfg: ModelConfig) -> list[str]:
        problems = []
        if cfg.norm != "rmsnorm" or cfg.mlp != "gated" or cfg.positions != "rope":
            problems.append("needs norm=rmsnorm, mlp=gated, positions=rope")
        if not cfg.causal:
            problems.append("needs causal=true (encoders export with the BERT family)")
        if cfg.qk_norm != (model_type == "qwen3"):
            problems.append(f"qk_norm={cfg.qk_norm} does not match {model_type}")
        if model_type == "qwen2" and (not cfg.qkv_bias or cfg.out_bias):
            problems.append("qwen2 needs qkv_bias=true and out_bias=false")
        if model_type in ("llama", "qwen3") and cfg.qkv_bias != cfg.out_bias:
            problems.append(f"{model_type} attention_bias covers q, k, v and o together (qkv_bias must equal out_bias)")
        if model_type == "mistral" and (cfg.qkv_bias or cfg.out_bias):
            problems.append("mistral has no attention biases")
        if model_type != "llama" and cfg.mlp_bias:
            problems.append(f"{model_type} has no MLP biases")
        if model_type == "llama" and cfg.sliding_window is not None:
            problems.append("llama has no sliding window (use family: mistral)")
        return problems

    return check


def scalar_head(cfg: ModelConfig) -> bool:
    """Whether the model is a reward model: a one-label head on the last token (heads.ClassifierHead).

    It exports as ...ForSequenceClassification(num_labels=1), whose bias-free `score` reads
    the last non-padding token; the reward objective never uses the head's bias, so the
    scores are equal.
    """
    head = cfg.classifier
    return head is not None and head.num_labels == 1 and head.pooling == "last"


def _keep_scalar_head(plain: Family):
    def export_model(cfg: ModelConfig) -> ModelConfig:
        out = plain.exported_config(cfg)
        if not scalar_head(cfg):
            return out
        # No LM head in ...ForSequenceClassification: the export's model ties (an input embedding only).
        return out.model_copy(update={"classifier": cfg.classifier, "tie_embeddings": True})

    return export_model


def _family(model_type: str, architecture: str, add_bos: bool) -> Family:
    plain = _plain_family(model_type, architecture, add_bos)
    return dataclasses.replace(plain, export_model=_keep_scalar_head(plain))


def _plain_family(model_type: str, architecture: str, add_bos: bool) -> Family:
    return Family(
        name=model_type,
        model_types=(model_type,),
        architecture=architecture,
        to_model_config=model_config(model_type),
        to_hf_config=hf_config(model_type, architecture),
        rules=rules,
        check_exportable=exportable(model_type),
        ignored=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"lm_head\.weight"),
        add_bos=add_bos,
    )


LLAMA = _family("llama", "LlamaForCausalLM", add_bos=True)
MISTRAL = _family("mistral", "MistralForCausalLM", add_bos=True)
QWEN2 = _family("qwen2", "Qwen2ForCausalLM", add_bos=False)
QWEN3 = _family("qwen3", "Qwen3ForCausalLM", add_bos=False)

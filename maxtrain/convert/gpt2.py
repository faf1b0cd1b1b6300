"""GPT-2: Conv1D weights stored [in, out] (no transpose), q|k|v fused in c_attn, learned positions.

Checkpoints saved by transformers prefix names with "transformer."; the original OpenAI
release does not, so the prefix is added when missing.
"""

from __future__ import annotations

from maxtrain.convert.core import Family, Rule, conv1d, fused_columns, linear, require, same
from maxtrain.errors import UserError
from maxtrain.model.config import ModelConfig

_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu", "silu": "silu"}
_ACT_NAME = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}


def model_config(hf: dict) -> dict:
    """config.json of a GPT2LMHeadModel -> ModelConfig fields."""
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights", True) is False:
        raise UserError("config.json changes GPT-2's attention scaling (scale_attn_*); maxtrain implements only 1/sqrt(head_dim)")
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACT:
        raise UserError(f"config.json activation_function={act!r} is not supported; supported: {', '.join(sorted(_ACT))}")
    d = require(hf, "n_embd")
    return dict(
        family="gpt2",
        vocab_size=require(hf, "vocab_size"),
        d_model=d,
        num_layers=require(hf, "n_layer"),
        num_heads=require(hf, "n_head"),
        ffn_dim=hf.get("n_inner") or 4 * d,
        max_seq_len=require(hf, "n_positions"),
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        mlp="plain",
        activation=_ACT[act],
        positions="learned",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def hf_config(cfg: ModelConfig) -> dict:
    """ModelConfig -> config.json of a GPT2LMHeadModel."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.d_model,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads,
        "n_inner": cfg.ffn_dim,
        "n_positions": cfg.max_seq_len,
        "n_ctx": cfg.max_seq_len,
        "layer_norm_epsilon": cfg.norm_eps,
        "activation_function": _ACT_NAME[cfg.activation],
        "tie_word_embeddings": cfg.tie_embeddings,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }


def rules(cfg: ModelConfig) -> list[Rule]:
    """Tensor rules of GPT2LMHeadModel."""
    p = "transformer.h.{i}."
    out = [
        same("transformer.wte.weight", "embedding"),
        same("transformer.wpe.weight", "position_embedding"),
        same("transformer.ln_f.weight", "final_norm/scale"),
        same("transformer.ln_f.bias", "final_norm/bias"),
        same(p + "ln_1.weight", "layers/attn_norm/scale"),
        same(p + "ln_1.bias", "layers/attn_norm/bias"),
        same(p + "ln_2.weight", "layers/mlp_norm/scale"),
        same(p + "ln_2.bias", "layers/mlp_norm/bias"),
        fused_columns(p + "attn.c_attn.weight", ("layers/attn/q/kernel", "layers/attn/k/kernel", "layers/attn/v/kernel"), 1),
        fused_columns(p + "attn.c_attn.bias", ("layers/attn/q/bias", "layers/attn/k/bias", "layers/attn/v/bias"), 0),
        conv1d(p + "attn.c_proj.weight", "layers/attn/o/kernel", 2),
        same(p + "attn.c_proj.bias", "layers/attn/o/bias"),
        conv1d(p + "mlp.c_fc.weight", "layers/mlp/up/kernel", 1),
        same(p + "mlp.c_fc.bias", "layers/mlp/up/bias"),
        conv1d(p + "mlp.c_proj.weight", "layers/mlp/down/kernel", 1),
        same(p + "mlp.c_proj.bias", "layers/mlp/down/bias"),
    ]
    if not cfg.tie_embeddings:
        out.append(linear("lm_head.weight", "lm_head/kernel", 1))
    return out


def exportable(cfg: ModelConfig) -> list[str]:
    """Reasons a ModelConfig is not a GPT-2 (empty when it is)."""
    problems = []
    if (cfg.norm, cfg.mlp, cfg.positions) != ("layernorm", "plain", "learned"):
        problems.append("needs norm=layernorm, mlp=plain, positions=learned")
    if not (cfg.qkv_bias and cfg.out_bias and cfg.mlp_bias):
        problems.append("needs qkv_bias, out_bias and mlp_bias")
    if cfg.kv_heads != cfg.num_heads or cfg.dim_per_head * cfg.num_heads != cfg.d_model:
        problems.append("needs num_kv_heads == num_heads and head_dim == d_model / num_heads")
    if cfg.qk_norm or cfg.sliding_window is not None or not cfg.causal:
        problems.append("has no qk_norm, sliding window or bidirectional attention")
    return problems


GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    architecture="GPT2LMHeadModel",
    to_model_config=model_config,
    to_hf_config=hf_config,
    rules=rules,
    check_exportable=exportable,
    ignored=(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)", r"lm_head\.weight"),
    prefix="transformer.",
)

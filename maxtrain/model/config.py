"""Model shape and architecture switches: one stack covers Llama, Mistral, Qwen, GPT-2, BERT and RoBERTa.

Families differ only by these fields; presets with the published shapes live in
`configs/models/*.yaml`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from maxtrain.finetune.adapter import AdapterConfig
from maxtrain.finetune.ia3 import IA3Config
from maxtrain.finetune.prefix import PrefixTuningConfig
from maxtrain.finetune.prompt import PromptTuningConfig


class RopeScaling(BaseModel):
    """Llama-3 style frequency scaling of RoPE (the `rope_scaling` block of HF configs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["llama3"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


class LoraConfig(BaseModel):
    """Low-rank adapters on chosen projections: y = x W + (alpha / rank) * dropout(x) A B.

    targets name the projections (attention q, k, v, o; MLP gate, up, down). B starts at
    zero, so an adapted model starts exactly at its base model.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: tuple[Literal["q", "k", "v", "o", "gate", "up", "down"], ...] = ("q", "v")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class ClassifierConfig(BaseModel):
    """A sequence-classification head on the final hidden state, pooled per row.

    pooling: last (the last real token: causal models), mean (over real tokens), or cls (the
    first token through dense + tanh: the model's pretrained pooler when it has one, as in
    BERT, else a new dense layer in the head, as in RoBERTa's classification head).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_labels: int = Field(2, ge=1)  # 1: a scalar score (a reward model)
    pooling: Literal["last", "mean", "cls"] = "last"


class ModelConfig(BaseModel):
    """Architecture of a transformer stack (decoder by default; `causal: false` is the encoder seam)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: str = "llama"  # informational: llama, mistral, qwen2, qwen3, gpt2
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None  # None: same as num_heads (multi-head attention)
    head_dim: int | None = None  # None: d_model // num_heads
    ffn_dim: int
    max_seq_len: int = 2048

    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: Literal["gated", "plain"] = "gated"  # gated = SwiGLU/GeGLU; plain = GPT-2 MLP
    activation: Literal["silu", "gelu", "gelu_tanh", "relu"] = "silu"
    positions: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False  # Qwen2/2.5, GPT-2
    out_bias: bool = False  # GPT-2 attention output projection
    mlp_bias: bool = False  # GPT-2
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim of q and k before RoPE
    sliding_window: int | None = None  # Mistral: attend to at most this many previous tokens
    tie_embeddings: bool = False
    causal: bool = True  # False: bidirectional encoder (masked LM)
    # Encoder switches (BERT, RoBERTa). post: x = norm(x + f(x)) in every block and no final
    # norm; pre: x + f(norm(x)) and a final norm.
    norm_position: Literal["pre", "post"] = "pre"
    type_vocab_size: int = Field(0, ge=0)  # token-type (segment A/B) embeddings; 0: none
    embed_norm: bool = False  # a norm on the summed embeddings (BERT's embeddings.LayerNorm)
    # Learned positions read row position + offset of a table of max_seq_len + offset rows
    # (RoBERTa: pad_token_id + 1 = 2, rows 0-1 unused), so max_seq_len stays the longest sequence.
    position_offset: int = Field(0, ge=0)
    pooler: bool = False  # dense + tanh on the first token (BERT/RoBERTa pooler; the cls classifier uses it)
    mlm_head: bool = False  # masked-LM head: dense, activation, norm, tied decoder + vocab bias
    init_std: float = 0.02
    # Finetuning methods (maxtrain/finetune/registry.py), set by the experiment from the run's
    # `finetune:` section (the base architecture in presets leaves them None; checkpoints
    # record them, so the saved tree rebuilds).
    lora: LoraConfig | None = None
    classifier: ClassifierConfig | None = None
    adapter: AdapterConfig | None = None
    ia3: IA3Config | None = None
    prompt_tuning: PromptTuningConfig | None = None
    prefix_tuning: PrefixTuningConfig | None = None

    @model_validator(mode="after")
    def _check_heads(self) -> "ModelConfig":
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; set head_dim explicitly"
            )
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.kv_heads}")
        if self.positions == "rope" and self.dim_per_head % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.dim_per_head}")
        if self.position_offset and self.positions != "learned":
            raise ValueError("position_offset applies to learned positions only; set positions: learned or position_offset: 0")
        if self.mlm_head and not self.tie_embeddings:
            raise ValueError("the MLM head decodes with the word embedding; set tie_embeddings: true")
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def param_count(self, *, heads: bool = True) -> int:
        """Analytic parameter count (matches the real models' published totals).

        heads: include the MLM head. Encoder model cards publish the count without it
        (BertModel with its pooler: bert-base-uncased 109,482,240), so heads=False is that number.
        A finetuning classifier is never counted (it is not part of the base model).
        """
        d, h, n, k = self.d_model, self.dim_per_head, self.num_heads, self.kv_heads
        attn = d * n * h + 2 * d * k * h + n * h * d
        if self.qkv_bias:
            attn += n * h + 2 * k * h
        if self.out_bias:
            attn += d
        if self.qk_norm:
            attn += 2 * h
        mlp = (3 if self.mlp == "gated" else 2) * d * self.ffn_dim
        if self.mlp_bias:
            mlp += self.ffn_dim + d
        norm = d * (2 if self.norm == "layernorm" else 1)
        layer = attn + mlp + 2 * norm
        total = self.num_layers * layer + self.vocab_size * d
        if self.norm_position == "pre":
            total += norm  # the final norm
        if not self.tie_embeddings:
            total += self.vocab_size * d
        if self.positions == "learned":
            total += (self.max_seq_len + self.position_offset) * d
        total += self.type_vocab_size * d + (norm if self.embed_norm else 0)
        if self.pooler:
            total += d * d + d
        if self.mlm_head and heads:
            total += d * d + d + norm + self.vocab_size  # transform dense, its norm, the output bias
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul params + attention (causal halved).

        Matmul params exclude the embedding lookup (a gather) and learned positions but
        include the output projection to the vocabulary (and the MLM head's dense transform,
        applied at every position; the pooler sees one token per row and is left out). Attention scores and the weighted
        sum cost 2 x 2 x S x N x H per token forward per layer; x3 for forward+backward;
        causal masking halves it (the PaLM appendix B convention).
        """
        d, h, n, k = self.d_model, self.dim_per_head, self.num_heads, self.kv_heads
        per_layer = d * n * h + 2 * d * k * h + n * h * d + (3 if self.mlp == "gated" else 2) * d * self.ffn_dim
        matmul_params = self.num_layers * per_layer + self.vocab_size * d
        if self.mlm_head:
            matmul_params += d * d
        window = min(seq_len, self.sliding_window or seq_len)
        attn = 12 * self.num_layers * n * h * window
        if self.causal:
            attn /= 2
        return 6.0 * matmul_params + attn

"""Model shape and architecture switches: one decoder stack covers Llama, Mistral, Qwen, GPT-2.

Families differ only by these fields; presets with the published shapes live in
`configs/models/*.yaml`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
    """A sequence-classification head on the final hidden state, pooled per row."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_labels: int = Field(2, gt=1)
    pooling: Literal["last", "mean"] = "last"


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
    init_std: float = 0.02
    # Finetuning additions, set by the experiment from the run's `finetune:` section (the
    # base architecture in presets and checkpoints leaves them None).
    lora: LoraConfig | None = None
    classifier: ClassifierConfig | None = None

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
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def param_count(self) -> int:
        """Analytic parameter count (matches the real models' published totals)."""
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
        total = self.num_layers * layer + norm + self.vocab_size * d
        if not self.tie_embeddings:
            total += self.vocab_size * d
        if self.positions == "learned":
            total += self.max_seq_len * d
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul params + attention (causal halved).

        Matmul params exclude the embedding lookup (a gather) and learned positions but
        include the output projection to the vocabulary. Attention scores and the weighted
        sum cost 2 x 2 x S x N x H per token forward per layer; x3 for forward+backward;
        causal masking halves it (the PaLM appendix B convention).
        """
        d, h, n, k = self.d_model, self.dim_per_head, self.num_heads, self.kv_heads
        per_layer = d * n * h + 2 * d * k * h + n * h * d + (3 if self.mlp == "gated" else 2) * d * self.ffn_dim
        matmul_params = self.num_layers * per_layer + self.vocab_size * d
        window = min(seq_len, self.sliding_window or seq_len)
        attn = 12 * self.num_layers * n * h * window
        if self.causal:
            attn /= 2
        return 6.0 * matmul_params + attn

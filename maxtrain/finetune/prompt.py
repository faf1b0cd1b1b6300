"""Prompt tuning (Lester et al. 2021): learned soft-prompt embeddings in front of every document.

Hook point: the input embeddings. The model prepends the P soft tokens to each row at
positions 0..P-1 with the shared segment id -1, which every real (non-padding) token of
every packed document may attend to (attention.attention_mask) and which attend only to
themselves: a causal prompt in front of a document depends on nothing after it, so one copy
per row is each packed document's own prompt, and no document sees another's tokens.
Documents move to positions P + their position, as in PEFT and in generation (the prompt
fills KV-cache slots 0..P-1). Initialisation (at `init_from`, from the loaded embedding):
the embeddings of a text's tokens, sampled vocabulary embeddings, or random.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from maxtrain.finetune.registry import Method


class PromptTuningConfig(BaseModel):
    """num_virtual_tokens: soft tokens per document; init: text (the embeddings of `text`'s tokens,
    repeated to length), vocab (embeddings of tokens sampled from the vocabulary) or random."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_virtual_tokens: int = Field(8, gt=0)
    init: Literal["text", "vocab", "random"] = "vocab"
    text: str | None = None
    init_std: float = Field(0.02, ge=0)  # random init

    @model_validator(mode="after")
    def _text(self) -> "PromptTuningConfig":
        if self.init == "text" and not self.text:
            raise ValueError("prompt_tuning.init=text needs prompt_tuning.text (the words the soft prompt starts from)")
        return self


def input_module(cfg: PromptTuningConfig, model_cfg, dtype, param_dtype):
    """The flax module (`prompt_tuning/embedding` [P, D]) that prepends the soft prompt."""
    import flax.linen as nn
    import jax.numpy as jnp

    class SoftPrompt(nn.Module):
        def setup(self):
            init = nn.initializers.normal(cfg.init_std)
            self.embedding = self.param(
                "embedding", nn.with_logical_partitioning(init, (None, "embed")), (cfg.num_virtual_tokens, model_cfg.d_model), param_dtype
            )

        def __call__(self, x_BxSxD, positions_BxS, segment_ids_BxS):
            b, p = x_BxSxD.shape[0], cfg.num_virtual_tokens
            soft_BxPxD = jnp.broadcast_to(self.embedding.astype(x_BxSxD.dtype)[None], (b, p, x_BxSxD.shape[2]))
            x_BxSxD = jnp.concatenate([soft_BxPxD, x_BxSxD], axis=1)
            pos_BxP = jnp.broadcast_to(jnp.arange(p, dtype=positions_BxS.dtype), (b, p))
            positions_BxS = jnp.concatenate([pos_BxP, positions_BxS + p], axis=1)
            segment_ids_BxS = jnp.concatenate([jnp.full((b, p), -1, segment_ids_BxS.dtype), segment_ids_BxS], axis=1)
            return x_BxSxD, positions_BxS, segment_ids_BxS

    return SoftPrompt(name="prompt_tuning")


def init_from(params, cfg: PromptTuningConfig, tokenize=None, seed: int = 0):
    """params with the soft prompt set from the (loaded) word embedding: text tokens or sampled rows."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    if cfg.init == "random":
        return params
    emb = params["embedding"]
    vocab = emb.shape[0]
    if cfg.init == "text":
        if tokenize is None:
            return params
        ids = list(tokenize(cfg.text)) or [0]
        ids = (ids * cfg.num_virtual_tokens)[: cfg.num_virtual_tokens]
    else:
        ids = np.random.default_rng(seed).integers(0, vocab, cfg.num_virtual_tokens).tolist()
    old = params["prompt_tuning"]["embedding"]
    new = jnp.take(emb, jnp.asarray(ids), axis=0).astype(old.dtype)
    new = jax.device_put(new, old.sharding) if hasattr(old, "sharding") else new
    return {**params, "prompt_tuning": {**params["prompt_tuning"], "embedding": new}}


def check(cfg: PromptTuningConfig, model_cfg, run) -> str | None:
    return room_check("prompt_tuning", cfg.num_virtual_tokens, model_cfg, run)


def room_check(key: str, p: int, model_cfg, run) -> str | None:
    """The error line when P virtual tokens leave no room in the run's sequences or the model's positions."""
    seq_len = getattr(getattr(run, "train", None), "seq_len", None)
    if seq_len is not None and p >= seq_len:
        return (f"finetune.{key}.num_virtual_tokens={p} leaves no room in train.seq_len={seq_len}; "
                f"use fewer virtual tokens or a longer seq_len")
    if model_cfg.positions == "learned" and seq_len is not None and p + seq_len > model_cfg.max_seq_len:
        return (f"finetune.{key}.num_virtual_tokens={p} + train.seq_len={seq_len} exceeds model.max_seq_len="
                f"{model_cfg.max_seq_len} (learned positions); lower one of them")
    return None


def write_peft(flat, cfg: PromptTuningConfig, base_cfg, out_dir, *, base_model: str, dtype) -> None:
    from maxtrain.convert.peft import write_peft_prompt

    write_peft_prompt(flat, cfg, base_cfg, out_dir, base_model=base_model, dtype=dtype)


METHOD = Method(
    name="prompt_tuning", config=PromptTuningConfig, alias="prompt", leaves=r"prompt_tuning/.*", export="refuse",
    peft=write_peft,
    no_export="a soft prompt cannot be merged into weights; export it with --peft-adapter DIR (PEFT prompt tuning)",
    check=check, conflicts=("prefix_tuning",), inputs=input_module,
    virtual_tokens=lambda cfg: cfg.num_virtual_tokens, init_from=init_from,
)

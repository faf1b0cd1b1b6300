"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): h + up(act(down(norm?(h)))).

Hook point: a block's sublayer output, before the residual add. Houlsby places one after
attention and one after the MLP; Pfeiffer after the MLP only. The up-projection starts at
zero, so the adapted model's logits equal the base's bitwise at step 0. There is no PEFT
format (PEFT has no bottleneck adapters) and no merge (the adapter is non-linear): they
export in maxtrain's own format (`maxtrain export`, `save_adapters`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from maxtrain.finetune.registry import Method


class AdapterConfig(BaseModel):
    """size: bottleneck width; placement: houlsby (after attention and MLP) or pfeiffer (after the MLP);
    activation between the projections; layer_norm: a LayerNorm on the adapter's input."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(16, gt=0)
    placement: Literal["houlsby", "pfeiffer"] = "pfeiffer"
    activation: Literal["relu", "silu", "gelu", "gelu_tanh"] = "relu"
    layer_norm: bool = False
    init_std: float = Field(0.01, ge=0)  # the down-projection; the up-projection is zero

    @property
    def where(self) -> tuple[str, ...]:
        return ("attn", "mlp") if self.placement == "houlsby" else ("mlp",)


def sublayer(module, cfg: AdapterConfig, where: str, h):
    """h + adapter(h) at the sublayers the placement names (params `adapter_<where>/{down,up,norm}`)."""
    if where not in cfg.where:
        return h
    import flax.linen as nn

    from maxtrain.model.layers import ACTIVATIONS, Linear, Norm

    d = h.shape[-1]
    kw = dict(dtype=module.dtype, param_dtype=module.param_dtype)

    class Bottleneck(nn.Module):
        @nn.compact
        def __call__(self, x):
            if cfg.layer_norm:
                x = Norm("layernorm", 1e-5, "norm", name="norm", **kw)(x)
            z = Linear((d,), (cfg.size,), ("embed",), (None,), True, cfg.init_std, name="down", **kw)(x)
            z = ACTIVATIONS[cfg.activation](z)
            return Linear((cfg.size,), (d,), (None,), ("embed",), True, 0.0, name="up", **kw)(z)

    return h + Bottleneck(name=f"adapter_{where}")(h).astype(h.dtype)


METHOD = Method(
    name="adapter", config=AdapterConfig, alias="adapters", leaves=r"layers/adapter_(attn|mlp)/.*", export="refuse",
    no_export=("bottleneck adapters have no Hugging Face or PEFT format; keep them in maxtrain's format "
               "(maxtrain export RUN OUT) or train lora / ia3 for an HF export"),
    sublayer=sublayer,
)

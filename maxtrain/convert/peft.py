"""LoRA adapters as a PEFT adapter dir: `adapter_config.json` + `adapter_model.safetensors`.

PEFT (Hugging Face's LoRA library) stores per layer and per adapted nn.Linear
`base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r] and
computes y = x W^T + (lora_alpha / r) x A^T B^T: the same scale as ours (alpha / rank), so
the factors only change layout. Ours are stacked over layers: A [L, *in, r], B [L, r, *out].
Only the Llama layout (llama, mistral, qwen2, qwen3) maps one projection to one nn.Linear;
GPT-2 fuses q|k|v into one Conv1D, so its adapters export merged only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from maxtrain.convert.safetensors_io import PlannedTensor, write_file
from maxtrain.errors import UserError
from maxtrain.model.config import LoraConfig, ModelConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Our LoRA target -> (param path of the adapted kernel, HF module under model.layers.{i}).
LLAMA_MODULES = {
    "q": ("layers/attn/q", "self_attn.q_proj"),
    "k": ("layers/attn/k", "self_attn.k_proj"),
    "v": ("layers/attn/v", "self_attn.v_proj"),
    "o": ("layers/attn/o", "self_attn.o_proj"),
    "gate": ("layers/mlp/gate", "mlp.gate_proj"),
    "up": ("layers/mlp/up", "mlp.up_proj"),
    "down": ("layers/mlp/down", "mlp.down_proj"),
}
PEFT_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def _factors_hf(a_L: Any, b_L: Any, i: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Layer i's (lora_A [r, in], lora_B [out, r]) from our A [L, *in, r] and B [L, r, *out]."""
    a, b = np.asarray(a_L[i]), np.asarray(b_L[i])
    rank = a.shape[-1]
    return a.reshape(math.prod(a.shape[:-1]), rank).T.astype(dtype), b.reshape(rank, -1).T.astype(dtype)


def write_peft_adapter(adapters: dict, lora: LoraConfig, cfg: ModelConfig, out_dir, *, base_model: str, dtype=np.float32) -> list[str]:
    """Write `adapters` ({kernel path: {"lora_a", "lora_b"}}, as from split_lora) as a PEFT LoRA dir.

    cfg: the base model (its family picks the module names); base_model: recorded as
    base_model_name_or_path (the dir holding the exported base weights).
    """
    if cfg.family not in PEFT_FAMILIES:
        raise UserError(
            f"PEFT adapters are written for {', '.join(PEFT_FAMILIES)} only (model.family {cfg.family!r} fuses its "
            "projections); export merged weights instead (drop --peft-adapter)"
        )
    out = Path(out_dir)
    if (out / ADAPTER_CONFIG).exists():
        raise UserError(f"'{out}' already holds a PEFT adapter; choose a new directory or delete it first")
    tensors = []
    for target in lora.targets:
        path, module = LLAMA_MODULES[target]
        a_L, b_L = adapters[path]["lora_a"], adapters[path]["lora_b"]
        fan_in, fan_out = math.prod(a_L.shape[1:-1]), math.prod(b_L.shape[2:])
        for i in range(cfg.num_layers):
            prefix = f"base_model.model.model.layers.{i}.{module}"
            tensors.append(PlannedTensor(f"{prefix}.lora_A.weight", (lora.rank, fan_in), np.dtype(dtype),
                                         lambda a_L=a_L, b_L=b_L, i=i: _factors_hf(a_L, b_L, i, dtype)[0]))
            tensors.append(PlannedTensor(f"{prefix}.lora_B.weight", (fan_out, lora.rank), np.dtype(dtype),
                                         lambda a_L=a_L, b_L=b_L, i=i: _factors_hf(a_L, b_L, i, dtype)[1]))
    out.mkdir(parents=True, exist_ok=True)
    write_file(out / ADAPTER_WEIGHTS, tensors)  # one file: PEFT does not read sharded adapters
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(LLAMA_MODULES[t][1].split(".")[-1] for t in lora.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,  # scale alpha / r, as ours
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return [ADAPTER_CONFIG, ADAPTER_WEIGHTS]


"""Finetuning methods as PEFT adapter dirs: `adapter_config.json` + `adapter_model.safetensors`.

LoRA, (IA)^3, prompt tuning and prefix tuning (the registry rows with a `peft` writer call
these).

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



def _check_family(cfg: ModelConfig, what: str) -> None:
    if cfg.family not in PEFT_FAMILIES:
        raise UserError(
            f"PEFT {what} adapters are written for {', '.join(PEFT_FAMILIES)} only (model.family {cfg.family!r}); "
            "drop --peft-adapter"
        )


def _write(out_dir, tensors: list, config: dict) -> list[str]:
    out = Path(out_dir)
    if (out / ADAPTER_CONFIG).exists():
        raise UserError(f"'{out}' already holds a PEFT adapter; choose a new directory or delete it first")
    out.mkdir(parents=True, exist_ok=True)
    write_file(out / ADAPTER_WEIGHTS, tensors)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return [ADAPTER_CONFIG, ADAPTER_WEIGHTS]


def write_peft_ia3(flat: dict, ia3, cfg: ModelConfig, out_dir, *, base_model: str, dtype=np.float32) -> list[str]:
    """(IA)^3 vectors as a PEFT IA3 dir: `<module>.ia3_l` [out, 1], or [1, in] for feed-forward modules.

    PEFT scales a feed-forward module's input and any other module's output by the flattened
    vector, as ours; the HF output of k_proj is (kv_heads, head_dim) flattened, our layout.
    """
    _check_family(cfg, "IA3")
    tensors = []
    for target in ia3.targets:
        path, module = LLAMA_MODULES[target]
        l_L = flat[path + "/ia3_l"]
        n = math.prod(l_L.shape[1:])
        shape = (1, n) if target in ia3.feedforward else (n, 1)
        for i in range(cfg.num_layers):
            tensors.append(PlannedTensor(f"base_model.model.model.layers.{i}.{module}.ia3_l", shape, np.dtype(dtype),
                                         lambda l_L=l_L, i=i, shape=shape: np.asarray(l_L[i]).reshape(shape).astype(dtype)))
    modules = lambda ts: sorted(LLAMA_MODULES[t][1].split(".")[-1] for t in ts)  # noqa: E731
    config = {
        "peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "target_modules": modules(ia3.targets), "feedforward_modules": modules(ia3.feedforward),
        "fan_in_fan_out": False, "init_ia3_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    return _write(out_dir, tensors, config)


def _prompt_learning_config(kind: str, p: int, cfg: ModelConfig, base_model: str, token_dim: int, heads: int) -> dict:
    return {
        "peft_type": kind, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "inference_mode": True,
        "num_virtual_tokens": p, "token_dim": token_dim, "num_transformer_submodules": 1,
        "num_attention_heads": heads, "num_layers": cfg.num_layers,
    }


def write_peft_prompt(flat: dict, prompt, cfg: ModelConfig, out_dir, *, base_model: str, dtype=np.float32) -> list[str]:
    """A soft prompt as a PEFT prompt-tuning dir: `prompt_embeddings` [P, d_model] (PEFT prepends it to the inputs)."""
    _check_family(cfg, "prompt tuning")
    table = flat["prompt_tuning/embedding"]
    tensors = [PlannedTensor("prompt_embeddings", tuple(table.shape), np.dtype(dtype), lambda: np.asarray(table).astype(dtype))]
    config = _prompt_learning_config("PROMPT_TUNING", prompt.num_virtual_tokens, cfg, base_model, cfg.d_model, cfg.num_heads)
    config.update({"prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None})
    return _write(out_dir, tensors, config)


def write_peft_prefix(flat: dict, prefix, cfg: ModelConfig, out_dir, *, base_model: str, dtype=np.float32) -> list[str]:
    """Prefix keys/values as a PEFT prefix-tuning dir: `prompt_embeddings` [P, L * 2 * K * H], stored flat.

    PEFT views it as [P, L * 2, K, H] (layer-major, keys then values, kv heads for GQA): our
    table's layout. A reparameterised prefix is written through its MLP (prefix_projection
    false), which is also what PEFT saves for inference.
    """
    from maxtrain.finetune.prefix import flat_table

    _check_family(cfg, "prefix tuning")
    leaves = {path.split("/", 1)[1]: leaf for path, leaf in flat.items() if path.startswith("prefix_tuning/")}
    k, h = cfg.kv_heads, cfg.dim_per_head
    shape = (prefix.num_virtual_tokens, cfg.num_layers * 2 * k * h)
    tensors = [PlannedTensor("prompt_embeddings", shape, np.dtype(dtype), lambda: flat_table(leaves, prefix).astype(dtype))]
    config = _prompt_learning_config("PREFIX_TUNING", prefix.num_virtual_tokens, cfg, base_model, k * h, k)
    config.update({"encoder_hidden_size": k * h, "prefix_projection": False})
    return _write(out_dir, tensors, config)

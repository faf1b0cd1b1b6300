"""`maxtrain convert to-hf`: maxtrain params -> a dir `transformers.AutoModelForCausalLM.from_pretrained` loads.

`export_to_hf(params, model_cfg, out_dir)` is the hook for any params tree already in the
base layout (e.g. LoRA factors merged into the weights by the finetuning code). Tensors
are produced one at a time while the safetensors shards are written.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from maxtrain.convert.core import flatten, plan_export
from maxtrain.convert.families import family_for_model
from maxtrain.convert.importer import HF_SIDE_DIR, HF_SIDE_FILES
from maxtrain.convert.safetensors_io import FLOAT_DTYPES, write_safetensors
from maxtrain.errors import UserError
from maxtrain.model.config import ModelConfig

log = logging.getLogger("maxtrain.convert")
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' own default shard size
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": FLOAT_DTYPES["BF16"], "float16": np.dtype(np.float16)}


def _tokenizer_files(out: Path, meta_dir: Path | None, meta: dict) -> dict:
    """Write the tokenizer files; returns the special-token fields for config.json."""
    tok = meta.get("hf_tokenizer") or {}
    side = meta_dir / HF_SIDE_DIR if meta_dir else None
    if side is not None and side.is_dir():  # converted from HF: the original files, unchanged
        for name in HF_SIDE_FILES:
            if (side / name).is_file():
                shutil.copyfile(side / name, out / name)
    elif meta_dir is not None and (meta_dir / "tokenizer.json").is_file():
        shutil.copyfile(meta_dir / "tokenizer.json", out / "tokenizer.json")
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **{k: tok.get(k) for k in ("bos_token", "eos_token", "pad_token")}}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    elif meta_dir is not None and (meta_dir / "tokenizer.model").is_file():
        # A sentencepiece model trained by maxtrain: pad=0, unk=1, bos=2, eos=3 (maxtrain.data.tokenizer).
        shutil.copyfile(meta_dir / "tokenizer.model", out / "tokenizer.model")
        config = {
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        }  # fmt: skip
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        tok = {"bos_token_id": 2, "eos_token_id": [3], "pad_token_id": 0}
    eos = tok.get("eos_token_id") or []
    return {
        "bos_token_id": tok.get("bos_token_id"),
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": tok.get("pad_token_id"),
    }


def export_to_hf(
    params: Any,
    model_cfg: ModelConfig,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    meta: dict | None = None,
    meta_dir: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[str]:
    """Write config.json, safetensors (sharded above max_shard_bytes) and tokenizer files; returns file names.

    params: the base param tree (stacked layers; jax or numpy arrays; LoRA already merged).
    meta / meta_dir: the maxtrain.json and its directory, for tokenizer files and special tokens.
    """
    if dtype not in _DTYPES:
        raise UserError(f"export dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    family = family_for_model(model_cfg)
    out = Path(out_dir)
    if (out / "config.json").exists():
        raise UserError(f"'{out}' already holds a Hugging Face model; choose a new directory or delete it first")
    planned = plan_export(flatten(params), family, model_cfg, _DTYPES[dtype])
    out.mkdir(parents=True, exist_ok=True)
    files = write_safetensors(out, planned, max_shard_bytes)
    specials = _tokenizer_files(out, Path(meta_dir) if meta_dir else None, meta or {})
    config = family.to_hf_config(model_cfg)
    config.update({k: v for k, v in specials.items() if v is not None})
    config.update(torch_dtype=dtype, dtype=dtype, use_cache=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if not (out / "generation_config.json").exists():
        gen = {k: v for k, v in specials.items() if v is not None}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    log.info("wrote %s (%s, %d tensors in %d files)", out, family.architecture, len(planned), len(files))
    return files + ["config.json"]


def _merge_lora_hook(params: Any, cfg: ModelConfig) -> tuple[Any, ModelConfig]:
    """Fold LoRA factors into the base weights via the finetuning package, or explain why not."""
    try:
        from maxtrain.finetune.lora import merge_lora  # provided by the finetuning code
    except ImportError:
        raise UserError(
            "this checkpoint has LoRA adapters and this maxtrain cannot merge them yet; "
            "merge them and call maxtrain.convert.export_to_hf(merged_params, base_model_cfg, out_dir)"
        ) from None
    return merge_lora(params, cfg), cfg.model_copy(update={"lora": None})


def convert_to_hf(checkpoint: str | Path, out_dir: str | Path, *, dtype: str | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Export a maxtrain params dir / checkpoint / run dir as a Hugging Face model dir.

    dtype: None keeps the dtype the model was converted from (float32 for models trained here).
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from maxtrain.checkpoint.params import load_params, read_metadata, resolve_params_dir
    from maxtrain.model.transformer import Transformer

    meta = read_metadata(checkpoint)
    fields = {k: v for k, v in meta["model"].items() if k != "classifier"}
    model_cfg = ModelConfig(**fields)
    if dtype is None:
        dtype = (meta.get("source") or {}).get("dtype", "float32")
    model = Transformer(model_cfg)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.eval_shape(lambda r: nn.unbox(model.init(r, jnp.zeros((1, 2), jnp.int32))["params"]), jax.random.PRNGKey(0))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)
    params = load_params(checkpoint, abstract)
    if model_cfg.lora is not None:
        params, model_cfg = _merge_lora_hook(params, model_cfg)
    _, meta_dir = resolve_params_dir(checkpoint)
    tok_dir = meta_dir if (meta_dir / "maxtrain.json").is_file() else None
    return export_to_hf(params, model_cfg, out_dir, dtype=dtype, meta=meta, meta_dir=tok_dir, max_shard_bytes=max_shard_bytes)

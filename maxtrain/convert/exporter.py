"""`maxtrain convert to-hf`: maxtrain params -> a dir `transformers` loads (AutoModelForCausalLM, or for
encoders AutoModelForMaskedLM / AutoModelForSequenceClassification).

`export_to_hf(params, model_cfg, out_dir)` is the hook for any params tree already in the
base layout (e.g. LoRA factors merged into the weights by the finetuning code). Tensors
are produced one at a time while the safetensors shards are written; `convert_to_hf` feeds
it stored leaves read a layer slice at a time (LoRA merged per slice), never the whole tree.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from maxtrain.convert.core import abstract_param_shapes, flatten, plan_export, unflatten
from maxtrain.convert.families import family_for_model
from maxtrain.convert.importer import HF_SIDE_DIR, HF_SIDE_FILES
from maxtrain.convert.safetensors_io import FLOAT_DTYPES, big_buffers_mmapped, write_safetensors
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
    # The family's own fields win (RoBERTa's pad_token_id fixes its position offset).
    config = {**{k: v for k, v in specials.items() if v is not None}, **family.to_hf_config(model_cfg)}
    config.update(torch_dtype=dtype, dtype=dtype, use_cache=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if not (out / "generation_config.json").exists():
        gen = {k: v for k, v in specials.items() if v is not None}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    log.info("wrote %s (%s, %d tensors in %d files)", out, family.architecture, len(planned), len(files))
    return files + ["config.json"]


def _lazy_params(checkpoint, model_cfg: ModelConfig, peft: bool, export_cfg: ModelConfig) -> tuple[dict, dict]:
    """({path: stored leaf read on demand} of the exported model with the methods merged per slice, {path: leaf} of all).

    peft: keep the base kernels unmerged (the second dict then feeds the PEFT adapter writer).
    export_cfg: the model as written (Family.exported_config); other leaves (a head it has no
    place for) are left out with a warning.
    """
    import jax

    from maxtrain.checkpoint.params import check_shapes, resolve_params_dir
    from maxtrain.convert.orbax_io import ItemReader, LazyLeaf

    params_dir, _ = resolve_params_dir(checkpoint)
    shapes = abstract_param_shapes(model_cfg)
    check_shapes(params_dir, unflatten({n: jax.ShapeDtypeStruct(s, np.float32) for n, s in shapes.items()}), what="params")
    reader = ItemReader(params_dir)
    from maxtrain.finetune import registry

    flat = {path: LazyLeaf(reader, path) for path in shapes}
    adapters = dict(flat)
    if not peft:
        for m, c in registry.active(model_cfg):
            if m.merge_lazy is not None:
                flat = m.merge_lazy(flat, c)
    kept = abstract_param_shapes(export_cfg)
    # A method's own leaves go to its PEFT adapter (or were merged); anything else is left out with a warning.
    efficient = [m.leaves for m, _ in registry.active(model_cfg) if m.efficient]
    dropped = sorted({path.split("/")[0] for path in flat
                      if path not in kept and not any(re.fullmatch(r, path) for r in efficient)})
    if dropped:
        what = {"classifier": "the classification head", "mlm_head": "the MLM head"}
        log.warning("leaving out %s: the exported architecture has no place for it", ", ".join(what.get(d, d) for d in dropped))
    return {path: leaf for path, leaf in flat.items() if path in kept}, adapters


class MergedKernel:
    """A stacked kernel with its LoRA adapters folded in, one layer slice at a time: W[i] + (alpha / r) A[i] B[i]."""

    def __init__(self, kernel, a, b, scale: float):
        self.kernel, self.a, self.b, self.scale = kernel, a, b, scale
        self.shape = kernel.shape

    def __getitem__(self, i: int) -> np.ndarray:
        from maxtrain.finetune.lora import merged_kernel

        return np.asarray(merged_kernel(np.asarray(self.kernel[i]), self.a[i], self.b[i], self.scale))


def convert_to_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    peft_adapter: str | Path | None = None,
) -> list[str]:
    """Export a maxtrain params dir / checkpoint / run dir as a Hugging Face model dir.

    dtype: None keeps the dtype the model was converted from (float32 for models trained here).
    A LoRA run exports its adapters merged into the weights; with `peft_adapter` it exports the
    base weights instead and writes the adapters as a PEFT LoRA adapter dir there.
    A classification head has no causal-LM counterpart and is left out (with a warning);
    an encoder with a head exports as ...ForSequenceClassification (its MLM head left out).
    Stored leaves are read one layer slice at a time, so memory stays a few HF tensors.
    """
    from maxtrain.checkpoint.params import model_config_of, read_metadata
    from maxtrain.checkpoint.source import resolve_model

    meta = read_metadata(checkpoint)
    model_cfg = model_config_of(meta)
    if dtype is None:  # an HF import records {"dtype": ...} as its source; `maxtrain export` the path it read
        origin = meta.get("source")
        dtype = origin.get("dtype", "float32") if isinstance(origin, dict) else "float32"
    if dtype not in _DTYPES:
        raise UserError(f"export dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    from maxtrain.finetune import registry

    refusal = registry.export_refusal(model_cfg, peft=peft_adapter is not None)
    if refusal:
        raise UserError(refusal)
    writers = [(m, c) for m, c in registry.active(model_cfg) if m.peft is not None]
    if peft_adapter is not None and not writers:
        raise UserError(f"'{checkpoint}' has no LoRA, IA3, prompt or prefix tuning to write as a PEFT adapter; drop --peft-adapter")
    base_cfg = family_for_model(model_cfg).exported_config(model_cfg)
    flat, stored = _lazy_params(checkpoint, model_cfg, peft=peft_adapter is not None, export_cfg=base_cfg)
    if peft_adapter is not None:
        for m, c in writers:  # the registry allows one PEFT-writable method per run (they conflict otherwise)
            m.peft(stored, c, base_cfg, peft_adapter, base_model=str(Path(out_dir).absolute()), dtype=_DTYPES[dtype])
    source = resolve_model(checkpoint)  # a run's tokenizer lies in the run dir, an export's next to its params
    tok_dir = source.meta_dir if source.kind == "export" else source.run_dir
    with big_buffers_mmapped():
        return export_to_hf(unflatten(flat), base_cfg, out_dir, dtype=dtype, meta=meta, meta_dir=tok_dir, max_shard_bytes=max_shard_bytes)

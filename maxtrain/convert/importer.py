"""`maxtrain convert from-hf`: a Hugging Face dir (config.json + safetensors) -> maxtrain params dir.

Everything is checked before anything is written (architecture, every tensor's presence,
shape and dtype, unknown tensors). Small leaves are then written with orbax's partial save,
big ones a layer slice at a time into the same orbax item, so peak memory is a few HF
tensors, not a stacked leaf or the model; the result has the layout of
`maxtrain.checkpoint.save_params` and loads with `load_params` / `init_from`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from maxtrain.convert.core import ImportedLeaf, check_checkpoint, flatten, iter_imported_leaves, normalize_names, unflatten
from maxtrain.convert.orbax_io import register_arrays, sync_item, write_array
from maxtrain.convert.families import family_for_hf
from maxtrain.convert.safetensors_io import FLOAT_DTYPES, SafetensorsReader, big_buffers_mmapped, return_freed_memory
from maxtrain.errors import UserError

log = logging.getLogger("maxtrain.convert")

# Tokenizer and generation files kept (under OUT/hf/) so export can write them back unchanged.
HF_SIDE_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)  # fmt: skip
HF_SIDE_DIR = "hf"
_FLUSH_BYTES = 16 << 20  # small leaves are written together, up to this many bytes per orbax call
DIRECT_WRITE_BYTES = 4 << 20  # leaves this big are written slice by slice, not through orbax


def read_json(path: Path, what: str) -> dict:
    """A JSON file as a dict; a UserError naming the file when missing or malformed."""
    if not path.is_file():
        raise UserError(f"'{path}' does not exist; {what}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"'{path}' is not valid JSON ({e}); re-download it") from None
    if not isinstance(data, dict):
        raise UserError(f"'{path}' must hold a JSON object")
    return data


def _token_name(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def tokenizer_metadata(hf_dir: Path, hf: dict, add_bos_default: bool) -> dict:
    """Special tokens (names and ids) and whether prompts start with BOS, from the HF side files."""
    tc = read_json(hf_dir / "tokenizer_config.json", "") if (hf_dir / "tokenizer_config.json").is_file() else {}
    gen = read_json(hf_dir / "generation_config.json", "") if (hf_dir / "generation_config.json").is_file() else {}
    eos = gen.get("eos_token_id", hf.get("eos_token_id"))
    meta = {
        # Encoders (BERT) have [CLS] ... [SEP] where decoders have BOS ... EOS: the same roles here.
        "bos_token": _token_name(tc.get("bos_token") or tc.get("cls_token")),
        "eos_token": _token_name(tc.get("eos_token") or tc.get("sep_token")),
        "pad_token": _token_name(tc.get("pad_token")),
        "mask_token": _token_name(tc.get("mask_token")),
        "bos_token_id": gen.get("bos_token_id", hf.get("bos_token_id")),
        "eos_token_id": [eos] if isinstance(eos, int) else (eos or []),
        "pad_token_id": gen.get("pad_token_id", hf.get("pad_token_id")),
    }
    meta["add_bos"] = bool(tc.get("add_bos_token", add_bos_default)) and meta["bos_token_id"] is not None
    tok_json = hf_dir / "tokenizer.json"
    if tok_json.is_file():
        try:
            from tokenizers import Tokenizer  # optional: names of special tokens given only by id
        except ImportError:
            return meta
        tok = Tokenizer.from_file(str(tok_json))
        for key in ("bos", "pad"):
            if meta[f"{key}_token"] is None and meta[f"{key}_token_id"] is not None:
                meta[f"{key}_token"] = tok.id_to_token(meta[f"{key}_token_id"])
        if meta["eos_token"] is None and meta["eos_token_id"]:
            meta["eos_token"] = tok.id_to_token(meta["eos_token_id"][0])
    return meta


def _stored_dtype(reader: SafetensorsReader) -> str:
    dtypes = {t.dtype for t in reader.tensors.values() if t.dtype in FLOAT_DTYPES}
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[sorted(dtypes)[0]] if len(dtypes) == 1 else "float32"


def write_params_streaming(out: Path, leaves: Iterable[ImportedLeaf], *, cfg, tokenizer_path: Path | None, extra: dict) -> None:
    """Write params leaf by leaf into the `save_params` layout (OUT/params + OUT/maxtrain.json last).

    Small leaves go through orbax's partial save in groups; leaves of DIRECT_WRITE_BYTES or
    more are then written into the same orbax item slice by slice (maxtrain.convert.orbax_io),
    so memory holds about one HF tensor. Without partial save, falls back to `save_params`
    on the whole tree (memory = model size).
    """
    from maxtrain.checkpoint.params import METADATA_FILE, PARAMS_ITEM, base_metadata, save_params, saved_tree_metadata, write_atomic

    try:
        from orbax.checkpoint.experimental.v1 import partial
    except ImportError:
        log.warning("orbax partial save unavailable; writing the whole tree at once (memory = model size)")
        tree = unflatten({leaf.path: leaf.assemble() for leaf in leaves})
        save_params(out, tree, cfg=cfg, tokenizer_path=str(tokenizer_path) if tokenizer_path else None, extra=extra)
        return
    staging = out / "params-staging"  # no leading dot: orbax globs its pending dirs
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(staging.with_name(staging.name + ".partial_save"), ignore_errors=True)
    pending: dict[str, np.ndarray] = {}
    pending_bytes = 0
    direct: list[ImportedLeaf] = []
    shapes: dict[str, tuple] = {}
    for leaf in leaves:
        shapes[leaf.path] = leaf.shape
        if leaf.nbytes >= DIRECT_WRITE_BYTES:
            direct.append(leaf)  # read and written after the orbax item exists
            continue
        pending[leaf.path] = leaf.assemble()
        pending_bytes += leaf.nbytes
        if pending_bytes >= _FLUSH_BYTES:  # orbax holds ~3x what one call writes
            partial.save(staging, unflatten(pending))
            pending, pending_bytes = {}, 0
            return_freed_memory()
    if not pending and not staging.with_name(staging.name + ".partial_save").exists():
        smallest = min(direct, key=lambda leaf: leaf.nbytes)  # orbax must create the item (its _METADATA)
        direct.remove(smallest)
        pending[smallest.path] = smallest.assemble()
    if pending:
        partial.save(staging, unflatten(pending))
    del pending
    partial.finalize(staging)
    items = [d for d in staging.iterdir() if (d / "_METADATA").is_file()]
    if len(items) != 1:
        raise RuntimeError(f"unexpected orbax partial-save layout in {staging}: {sorted(p.name for p in staging.iterdir())}")
    item = out / PARAMS_ITEM
    items[0].rename(item)
    shutil.rmtree(staging)
    for leaf in direct:
        write_array(item, leaf.path, leaf.shape, leaf.dtype, leaf.pieces(), stacked=leaf.stacked)
        return_freed_memory()
    sync_item(item)
    register_arrays(item, [leaf.path for leaf in direct])
    written = {path: tuple(m.shape) for path, m in flatten(saved_tree_metadata(item)).items()}
    if written != shapes:  # orbax must read back exactly the tree we meant to write
        raise RuntimeError(f"params written to {item} read back as {sorted(written)} instead of {sorted(shapes)}")
    meta = base_metadata(cfg, fmt="maxtrain-params")
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, out / tokenizer_path.name)
        import hashlib

        prefix = "hf:" if tokenizer_path.suffix == ".json" else "sp:"
        meta["tokenizer"] = {"identity": prefix + hashlib.sha256(tokenizer_path.read_bytes()).hexdigest()[:12], "file": tokenizer_path.name}
    meta.update(extra)
    write_atomic(out / METADATA_FILE, (json.dumps(meta, indent=2) + "\n").encode())


def convert_from_hf(hf_dir: str | Path, out_dir: str | Path, *, param_dtype: str = "float32") -> dict:
    """Convert a Hugging Face checkpoint dir into a maxtrain params dir; returns a summary dict.

    param_dtype: dtype of the written params (float32 keeps bf16/f16 weights exactly).
    """
    from pydantic import ValidationError

    from maxtrain.config import RunConfig
    from maxtrain.model.config import ModelConfig

    t0 = time.perf_counter()
    hf_dir, out = Path(hf_dir), Path(out_dir).absolute()
    hf = read_json(hf_dir / "config.json", "pass a Hugging Face model dir (config.json + *.safetensors)")
    family = family_for_hf(hf)
    fields = family.to_model_config(hf)
    reader = SafetensorsReader(hf_dir)
    if family.from_tensors is not None:
        normalize_names(reader, family)
        fields.update(family.from_tensors(hf, {n: t.shape for n, t in reader.tensors.items()}))
    try:
        model_cfg = ModelConfig(**fields)
    except ValidationError as e:
        first = e.errors()[0]
        raise UserError(f"config.json of '{hf_dir}' maps to an invalid model ({first['loc']}: {first['msg']})") from None
    check_checkpoint(reader, family, model_cfg)
    if (out / "params").exists() or (out / "maxtrain.json").exists():
        raise UserError(f"'{out}' already holds params; choose a new output directory or delete it first")
    if param_dtype not in ("float32", "bfloat16"):
        raise UserError(f"param dtype {param_dtype!r} is not float32 or bfloat16")
    out.mkdir(parents=True, exist_ok=True)
    tok_meta = tokenizer_metadata(hf_dir, hf, family.add_bos)
    tokenizer = next((hf_dir / n for n in ("tokenizer.json", "tokenizer.model") if (hf_dir / n).is_file()), None)
    source = {
        "format": "huggingface", "dir": str(hf_dir.absolute()), "model_type": hf.get("model_type"),
        "architectures": hf.get("architectures"), "dtype": _stored_dtype(reader),
    }  # fmt: skip
    dtype = np.dtype(FLOAT_DTYPES["BF16"] if param_dtype == "bfloat16" else np.float32)
    largest = max(np.dtype(FLOAT_DTYPES[t.dtype]).itemsize * int(np.prod(t.shape)) for t in reader.tensors.values())
    with big_buffers_mmapped():
        write_params_streaming(
            out, iter_imported_leaves(reader, family, model_cfg, dtype), cfg=RunConfig(model=model_cfg),
            tokenizer_path=tokenizer, extra={"source": source, "hf_tokenizer": tok_meta},
        )  # fmt: skip
    side = out / HF_SIDE_DIR
    side.mkdir(exist_ok=True)
    for name in HF_SIDE_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, side / name)
    summary = {
        "family": family.name, "params": model_cfg.param_count(), "tensors": len(reader.tensors),
        "largest_tensor_bytes": largest, "seconds": round(time.perf_counter() - t0, 2), "out": str(out),
    }  # fmt: skip
    log.info("converted %s (%s, %d params) to %s in %.1fs", hf_dir, family.architecture, summary["params"], out, summary["seconds"])
    return summary

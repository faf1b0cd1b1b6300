"""`maxtrain convert from-hf HF_DIR OUT_DIR` and `maxtrain convert to-hf CHECKPOINT OUT_DIR`."""

from __future__ import annotations

import argparse
import json


def _from_hf(ns: argparse.Namespace) -> int:
    from maxtrain.convert.importer import convert_from_hf

    print(json.dumps(convert_from_hf(ns.hf_dir, ns.out_dir, param_dtype=ns.param_dtype)))
    return 0


def _to_hf(ns: argparse.Namespace) -> int:
    from maxtrain.convert.exporter import convert_to_hf

    files = convert_to_hf(ns.checkpoint, ns.out_dir, dtype=ns.dtype, max_shard_bytes=int(ns.max_shard_gb * 1e9),
                          peft_adapter=ns.peft_adapter)
    print(json.dumps({"out": ns.out_dir, "files": files, **({"peft_adapter": ns.peft_adapter} if ns.peft_adapter else {})}))
    return 0


def register_commands(sub) -> None:
    """Add `convert from-hf` and `convert to-hf` to the CLI's subparsers."""
    convert = sub.add_parser("convert", help="convert models between Hugging Face and maxtrain formats")
    csub = convert.add_subparsers(dest="convert_command", required=True)
    imp = csub.add_parser("from-hf", help="HF dir (config.json + safetensors) -> maxtrain params dir")
    imp.add_argument("hf_dir")
    imp.add_argument("out_dir")
    imp.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
    imp.set_defaults(func=_from_hf)
    exp = csub.add_parser("to-hf", help="maxtrain params dir, checkpoint or run dir -> HF dir")
    exp.add_argument("checkpoint")
    exp.add_argument("out_dir")
    exp.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                     help="weights dtype (default: the dtype the model was converted from, else float32)")
    exp.add_argument("--max-shard-gb", type=float, default=5.0, help="split safetensors above this size")
    exp.add_argument("--peft-adapter", metavar="DIR", default=None,
                     help="LoRA runs: write the adapters as a PEFT adapter dir here and the base (unmerged) weights to "
                          "OUT_DIR; default: OUT_DIR holds the adapters merged into the weights")
    exp.set_defaults(func=_to_hf)

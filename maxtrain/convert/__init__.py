"""Hugging Face <-> maxtrain conversion, per model family, streaming tensor by tensor.

    from maxtrain.convert import convert_from_hf, convert_to_hf, export_to_hf
    convert_from_hf("hf_model/", "params/")           # config.json + safetensors -> params dir
    convert_to_hf("params/", "hf_out/")               # params dir / checkpoint -> HF dir
    export_to_hf(merged_params, model_cfg, "hf_out/")  # any base-layout params tree (e.g. LoRA merged)
    convert_to_hf("lora_run/", "hf_base/", peft_adapter="adapter/")  # base weights + a PEFT LoRA adapter

Families: families.py (llama, mistral, qwen2, qwen3, gpt2, bert, roberta). Big leaves move a layer slice
at a time (orbax_io.py), so memory is a few HF tensors. torch/transformers/peft are never
imported here; they are test-only references.
"""

from maxtrain.convert.exporter import convert_to_hf, export_to_hf
from maxtrain.convert.families import FAMILIES, family_for_hf, family_for_model
from maxtrain.convert.importer import convert_from_hf

__all__ = ["FAMILIES", "convert_from_hf", "convert_to_hf", "export_to_hf", "family_for_hf", "family_for_model"]

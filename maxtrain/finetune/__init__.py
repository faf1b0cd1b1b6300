"""Finetuning pieces that are not the step: trainable sets, LoRA merge/export, init from pretrained params."""

"""Checkpoints on orbax: async training checkpoints with exact resume, params export, init_from.

    from maxtrain.checkpoint import save_params, read_metadata, load_params
    save_params(out_dir, state.params, cfg=cfg, tokenizer_path="tok.model")
    params = load_params(out_dir_or_step_dir_or_run_dir, abstract_params)   # any mesh
"""

from maxtrain.checkpoint.manager import TrainCheckpointer, abstract_of, complete_steps
from maxtrain.checkpoint.params import load_params, read_metadata, save_params
from maxtrain.checkpoint.resume import init_state_from

__all__ = [
    "TrainCheckpointer",
    "abstract_of",
    "complete_steps",
    "init_state_from",
    "load_params",
    "read_metadata",
    "save_params",
]

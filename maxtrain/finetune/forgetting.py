"""Forgetting: the causal-LM loss on held-out pretraining text, scored before and after a finetune."""

from __future__ import annotations

from typing import Any, Callable

import jax

from maxtrain.data import build_pipeline, local_rows
from maxtrain.data.config import TextFormat
from maxtrain.objectives import causal_lm_objective
from maxtrain.step import build_eval_step


def build_forgetting_eval(cfg, exp, tokenizer) -> Callable[[Any], float] | None:
    """`loss(params)` on the eval split of `finetune.forgetting` sources (None when none are set).

    Uses the run's tokenizer and the causal-LM objective whatever the run's own objective is,
    so a classification or SFT run still reports how much language modelling it lost.
    """
    if not cfg.finetune.forgetting:
        return None
    data = cfg.data.model_copy(update={"sources": list(cfg.finetune.forgetting), "format": TextFormat(), "prefetch": 0})
    step = jax.jit(build_eval_step(causal_lm_objective(exp.apply_fn)),
                   in_shardings=(exp.state_shardings.params, exp.batch_sharding))

    def loss(params) -> float:
        from maxtrain.trainer import evaluate  # the trainer imports this module

        it = build_pipeline(data, tokenizer, split="eval", seq_len=cfg.train.seq_len, global_batch=cfg.train.global_batch,
                            seed=cfg.seed, rows=local_rows(exp.batch_sharding, cfg.train.global_batch),
                            process_index=jax.process_index(), process_count=jax.process_count())
        with it:
            batches = None if cfg.eval.batches == "all" else cfg.eval.batches
            return evaluate(exp, it, batches, step=step, params=params)["eval_loss"]

    return loss

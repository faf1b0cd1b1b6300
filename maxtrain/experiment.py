"""Wire a RunConfig into a mesh, model, objective, optimizer, sharded state and jitted step.

No side effects beyond device allocation: the trainer, evaluation and tests all build the
same pieces from here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from maxtrain.config import RunConfig
from maxtrain.errors import UserError
from maxtrain.mesh import batch_sharding, build_mesh, data_parallel_size
from maxtrain.model.transformer import Transformer
from maxtrain.finetune.trainable import TrainableSet, path_name, trainable_set
from maxtrain.model.config import ModelConfig
from maxtrain.objectives import Objective, causal_lm_objective, classification_objective, masked_lm_objective, sft_objective
from maxtrain.optim import build_optimizer
from maxtrain.step import TrainState, build_eval_step, build_train_step, init_train_state, jit_train_step, xla_options

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str, platform: str | None = None) -> Any:
    """`auto` is bf16 on accelerators (f32 master weights stay in the params) and f32 on CPU."""
    if name == "auto":
        return jnp.float32 if (platform or jax.default_backend()) == "cpu" else jnp.bfloat16
    return _DTYPES[name]


def attention_kernel(name: str, platform: str, dtype: Any) -> str:
    """The kernel for `train.attention` on `platform` at compute `dtype` (auto: cudnn where it applies)."""
    fits = platform == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if name == "auto":
        return "cudnn" if fits else "xla"
    if name == "cudnn" and not fits:
        raise UserError(
            f"train.attention=cudnn needs a GPU and bf16 compute (this run: {platform}, {jnp.dtype(dtype).name}); "
            "use train.attention=auto or xla"
        )
    return name


def build_model(cfg: RunConfig, platform: str | None = None) -> Transformer:
    """The run's Transformer as it compiles on `platform` (default: this process's backend).

    `platform` lets `maxtrain plan` build the GPU/TPU program from a CPU host:
    compute_dtype=auto means bf16 there.
    """
    platform = platform or jax.default_backend()
    dtype = compute_dtype(cfg.train.compute_dtype, platform)
    return Transformer(
        finetuned_model_config(cfg), dtype=dtype, param_dtype=_DTYPES[cfg.train.param_dtype], remat=cfg.train.remat,
        unroll_layers=cfg.train.unroll_layers, attention_query_block=cfg.train.attention_query_block,
        attention_kernel=attention_kernel(cfg.train.attention, platform, dtype),
    )  # fmt: skip


def check_batch_geometry(cfg: RunConfig, mesh: Mesh) -> None:
    """User errors for batch shapes the mesh or the model cannot take."""
    t, dp = cfg.train, data_parallel_size(mesh)
    if t.global_batch % dp:
        raise UserError(
            f"train.global_batch={t.global_batch} is not divisible by the data-parallel size {dp} "
            f"(mesh.data x mesh.fsdp); use a multiple of {dp}"
        )
    if t.global_batch % t.microbatches or (t.global_batch // t.microbatches) % dp:
        raise UserError(
            f"train.global_batch={t.global_batch} must split into train.microbatches={t.microbatches} "
            f"microbatches each divisible by the data-parallel size {dp}; use a global batch multiple of {dp * t.microbatches}"
        )
    if cfg.model.positions == "learned" and t.seq_len > cfg.model.max_seq_len:
        raise UserError(
            f"train.seq_len={t.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len} (learned positions); lower it"
        )


def make_apply_fn(model: nn.Module, rules) -> Callable[..., jax.Array]:
    """`apply(params, tokens, positions, segment_ids, **kw)` with the logical-axis rules in scope.

    Other model methods go through `method=` (e.g. `apply(params, hidden, method="logits")`).
    """

    from maxtrain.checkpoint.params import without_frozen

    def apply(params, *args, **kwargs):
        with nn.logical_axis_rules(rules):  # a frozen subtree (DPO's reference) is no part of the model
            return model.apply({"params": without_frozen(params)}, *args, **kwargs)

    return apply


def build_objective(cfg: RunConfig, apply_fn) -> Objective:
    """The objective named by `train.objective` (one table; modes add rows, not branches)."""
    objectives = {
        "causal_lm": lambda: causal_lm_objective(apply_fn, z_loss=cfg.train.z_loss, loss_chunk=cfg.train.loss_chunk),
        "sft": lambda: sft_objective(apply_fn, z_loss=cfg.train.z_loss, loss_chunk=cfg.train.loss_chunk),
        "classification": lambda: classification_objective(apply_fn),
        "masked_lm": lambda: masked_lm_objective(apply_fn, z_loss=cfg.train.z_loss, loss_chunk=cfg.train.loss_chunk),
        "reward": lambda: reward_model_objective(cfg, apply_fn),
        "dpo": lambda: direct_preference_objective(cfg, apply_fn),
        "grpo": lambda: policy_gradient_objective(cfg, apply_fn),
    }
    if cfg.data.format.type == "prompts" and cfg.train.objective != "grpo":
        raise UserError(f"data.format.type=prompts feeds rollouts to train.objective=grpo, not {cfg.train.objective}; "
                        "set train.objective=grpo or use another data format")
    return objectives[cfg.train.objective]()


def _needs_pairs(cfg: RunConfig) -> None:
    if cfg.data.format.type != "preference":
        raise UserError(f"train.objective={cfg.train.objective} needs preference pairs; set data.format.type=preference")


def reward_model_objective(cfg: RunConfig, apply_fn) -> Objective:
    """The Bradley-Terry reward objective, after checking the run has pairs and a scalar last-token head."""
    from maxtrain.objectives_preference import reward_objective

    _needs_pairs(cfg)
    head = cfg.finetune.classifier
    if head is None or head.num_labels != 1 or head.pooling != "last":
        raise UserError("train.objective=reward needs a scalar head on the last token; "
                        "set finetune.classifier={num_labels: 1, pooling: last}")
    return reward_objective(apply_fn, center_rewards=cfg.train.preference.center_rewards)


def direct_preference_objective(cfg: RunConfig, apply_fn) -> Objective:
    """The DPO objective, after checking the run has pairs and the reference it names."""
    from maxtrain.objectives_preference import dpo_objective

    _needs_pairs(cfg)
    pref = cfg.train.preference
    if pref.reference == "adapters_off" and cfg.finetune.lora is None:
        raise UserError("train.preference.reference=adapters_off needs LoRA adapters (finetune.lora); add them, "
                        "or use train.preference.reference=frozen (a frozen copy of init_from) or precomputed")
    if pref.reference == "frozen" and not cfg.init_from:
        raise UserError("train.preference.reference=frozen copies the weights the run starts from; set init_from "
                        "(an SFT run or a converted model)")
    return dpo_objective(apply_fn, beta=pref.beta, loss=pref.loss, label_smoothing=pref.label_smoothing,
                         reference=pref.reference, rpo_alpha=pref.rpo_alpha)


def frozen_reference(cfg: RunConfig) -> bool:
    """Whether the params carry DPO's frozen reference subtree (train.preference.reference=frozen)."""
    return cfg.train.objective == "dpo" and cfg.train.preference.reference == "frozen"


def policy_gradient_objective(cfg: RunConfig, apply_fn) -> Objective:
    """The GRPO / RLOO objective, after checking the run samples prompts and has the reference it names."""
    from maxtrain.objectives_rl import grpo_objective

    rl = cfg.train.rl
    if cfg.data.format.type != "prompts":
        raise UserError("train.objective=grpo samples completions of prompts; set data.format.type=prompts")
    if not cfg.model.causal:
        raise UserError("train.objective=grpo needs a causal model that can generate (model.causal=true)")
    if rl.max_completion_len >= cfg.train.seq_len:
        raise UserError(f"train.rl.max_completion_len={rl.max_completion_len} leaves no room for the prompt in "
                        f"train.seq_len={cfg.train.seq_len}; raise seq_len or lower max_completion_len")
    if cfg.train.global_batch % rl.group_size:
        raise UserError(f"train.global_batch={cfg.train.global_batch} rollouts do not split into groups of "
                        f"train.rl.group_size={rl.group_size}; use a multiple of it")
    if not rl.rewards:
        raise UserError("train.objective=grpo needs at least one reward; set train.rl.rewards, e.g. "
                        "[{type: exact_match, field: answer}] (see README: Reinforcement learning)")
    reference = rl_reference(cfg)
    if reference == "adapters_off" and cfg.finetune.lora is None:
        raise UserError("train.rl.reference=adapters_off needs LoRA adapters (finetune.lora); add them or use reference=init")
    if reference == "init" and not cfg.init_from:
        raise UserError("train.rl.beta > 0 with reference=init needs the weights to start from; set init_from "
                        "(an SFT run or a converted model) or train.rl.beta=0")
    return grpo_objective(apply_fn, epsilon=rl.epsilon, epsilon_high=rl.epsilon_high, beta=rl.beta,
                          aggregation=rl.aggregation, max_completion_len=rl.max_completion_len,
                          temperature=rl.temperature, fresh_rollouts=rl.iterations == 1)


def rl_reference(cfg: RunConfig) -> str | None:
    """The KL reference of an RL run: None (beta 0), adapters_off or init."""
    rl = cfg.train.rl
    if not rl.beta:
        return None
    if rl.reference == "auto":
        return "adapters_off" if cfg.finetune.lora is not None else "init"
    return rl.reference


def finetuned_model_config(cfg: RunConfig) -> ModelConfig:
    """The run's model: the base architecture plus the `finetune:` methods (finetune/registry.py)."""
    from maxtrain.finetune import registry

    if cfg.train.objective == "classification" and cfg.finetune.classifier is None:
        raise UserError("train.objective=classification needs a head; set finetune.classifier.num_labels")
    check_objective_fits_model(cfg.train.objective, cfg.model)
    registry.check_methods(cfg.finetune, cfg.model, cfg)
    return cfg.model.model_copy(update=registry.model_updates(cfg.finetune))


def check_objective_fits_model(objective: str, model: ModelConfig) -> None:
    """User errors for an objective the model cannot train: LM losses on encoders, masked LM on decoders."""
    if objective in ("causal_lm", "sft") and not model.causal:
        raise UserError(
            f"train.objective={objective} needs a causal model but model.causal=false (a {model.family} encoder); "
            "use train.objective=masked_lm or classification, or a decoder model"
        )
    if objective == "masked_lm" and model.causal:
        raise UserError(
            "train.objective=masked_lm needs a bidirectional encoder but model.causal=true; "
            "use an encoder preset (model=bert-base-uncased, roberta-base) or train.objective=causal_lm"
        )
    if objective == "masked_lm" and not model.mlm_head:
        raise UserError("train.objective=masked_lm needs the model's MLM head; set model.mlm_head=true")


def trainable_parts(cfg: RunConfig) -> tuple[TrainableSet, Callable | None, Callable | None]:
    """(trainable set, leaf predicate or None for all, row-mask fn or None) for the optimizer and step."""
    ts = trainable_set(cfg.finetune, cfg.model.num_layers)
    if frozen_reference(cfg):  # DPO's reference subtree: frozen, so no gradient and no optimizer state
        import re

        from maxtrain.objectives_preference import FROZEN_REFERENCE

        ts = dataclasses.replace(ts, freeze=(*ts.freeze, re.compile(f"{FROZEN_REFERENCE}/.*")))
    if ts.everything:
        return ts, None, None
    rows = (lambda path, ndim: ts.row_mask(path_name(path), ndim)) if ts.frozen_layers else None
    return ts, ts.leaf_predicate(), rows


@dataclasses.dataclass
class Experiment:
    """Everything a run computes with. `state` is born sharded; `train_step` is compiled on first use."""

    cfg: RunConfig
    mesh: Mesh
    model: Transformer
    apply_fn: Callable
    objective: Objective
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    state: TrainState
    state_shardings: Any
    batch_sharding: NamedSharding
    train_step: Callable
    eval_step: Callable
    trainable: TrainableSet | None = None


def build_experiment(cfg: RunConfig, devices=None) -> Experiment:
    """Build the mesh, sharded state and jitted steps for `cfg`."""
    mesh = build_mesh(cfg.mesh, devices)
    check_batch_geometry(cfg, mesh)
    model = build_model(cfg)
    rules = cfg.mesh.rules
    apply_fn = make_apply_fn(model, rules)
    objective = build_objective(cfg, apply_fn)
    trainable, is_trainable, row_masks = trainable_parts(cfg)
    optimizer, schedule = build_optimizer(cfg.optimizer, cfg.steps, is_trainable, row_masks)
    example = jnp.zeros((1, min(cfg.train.seq_len, 8)), jnp.int32)

    def init_params(rng):
        with nn.logical_axis_rules(rules):
            params = model.init(rng, example)["params"]
        if frozen_reference(cfg):  # a placeholder of the policy's shape; init_from fills it (finetune/init.py)
            from maxtrain.objectives_preference import FROZEN_REFERENCE

            params = {**params, FROZEN_REFERENCE: jax.tree.map(lambda x: x, params, is_leaf=lambda x: x is None)}
        return params

    with jax.set_mesh(mesh):
        state, shardings = init_train_state(init_params, optimizer, cfg.seed, mesh, rules)
    batch_shard = batch_sharding(mesh)
    step = build_train_step(
        objective, optimizer, schedule, microbatches=cfg.train.microbatches, mesh=mesh, trainable=is_trainable
    )
    options = xla_options(mesh, cfg.train.xla_options)
    train_step = jit_train_step(step, shardings, batch_shard, options)
    eval_step = jax.jit(build_eval_step(objective), in_shardings=(shardings.params, batch_shard), compiler_options=options)
    return Experiment(
        cfg, mesh, model, apply_fn, objective, optimizer, schedule, state, shardings, batch_shard, train_step, eval_step,
        trainable,
    )

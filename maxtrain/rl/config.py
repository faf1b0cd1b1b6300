"""The `train.rl` section: group rollouts, the GRPO / RLOO loss, and the rewards (maxtrain/rl/).

Everything here configures the rollout source (maxtrain/rl/rollouts.py) or the objective
(maxtrain/objectives_rl.py); the step itself takes no RL settings.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

_FROZEN = ConfigDict(extra="forbid", frozen=True)


class _Reward(BaseModel):
    model_config = _FROZEN
    weight: float = 1.0  # the reward's share of the total (total = sum of weight x reward)
    name: str | None = None  # the metrics key (rewards/<name>); default: the type (or the function's name)


class ExactMatchReward(_Reward):
    """1.0 when the completion, stripped, equals the record's `field` (stripped), else 0.0."""

    type: Literal["exact_match"] = "exact_match"
    field: str = "answer"


class FormatReward(_Reward):
    """1.0 when the whole completion (stripped) matches the regular expression `pattern`, else 0.0."""

    type: Literal["format"] = "format"
    pattern: str


class FunctionReward(_Reward):
    """A Python function `module:function(prompts, completions, **record_fields) -> list[float]`."""

    type: Literal["function"] = "function"
    function: str


class ModelReward(_Reward):
    """A reward model trained by maxtrain (train.objective=reward): a run dir, checkpoint or export."""

    type: Literal["model"] = "model"
    path: str


RewardConfig = Annotated[Union[ExactMatchReward, FormatReward, FunctionReward, ModelReward], Field(discriminator="type")]


class RLConfig(BaseModel):
    """Knobs of reinforcement learning from a reward (train.objective=grpo).

    Each step's batch is train.global_batch rollouts: global_batch / group_size prompts,
    group_size completions each, sampled from the current weights (temperature, top_p,
    top_k; at most max_completion_len new tokens; a row holds prompt + completion, so
    train.seq_len bounds the prompt).
    baseline: group_mean (GRPO) or leave_one_out (RLOO: the mean of the group's other
      rewards). scale: divide advantages by the group's reward std (GRPO), the batch's
      (Dr. GRPO / Lite PPO), or not at all.
    epsilon, epsilon_high: the clip range [1 - epsilon, 1 + epsilon_high] of the policy ratio
      (epsilon_high None: epsilon; DAPO raises it).
    beta: the KL penalty's weight (k3 estimator) against the reference; 0 builds no reference.
    reference: the frozen policy the KL is measured against: init (the init_from weights, held
      once by the rollout source, no optimizer state), adapters_off (LoRA runs: the same
      params with the adapters off, no second copy) or auto (adapters_off with LoRA, else init).
    aggregation: sequence (each completion's token mean, then the mean over completions:
      GRPO), token (the mean over every completion token of the batch: DAPO) or constant
      (the sum over tokens divided by completions x max_completion_len: Dr. GRPO).
    iterations: optimisation steps per rollout batch (mu); the sampling-time log-probs are
      kept, so the clipped ratio measures how far the policy moved since it sampled.
    """

    model_config = _FROZEN
    group_size: int = Field(4, ge=2)
    max_completion_len: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    baseline: Literal["group_mean", "leave_one_out"] = "group_mean"
    scale: Literal["group", "batch", "none"] = "group"
    epsilon: float = Field(0.2, gt=0, lt=1)
    epsilon_high: float | None = Field(None, gt=0)
    beta: float = Field(0.0, ge=0)
    reference: Literal["auto", "init", "adapters_off"] = "auto"
    aggregation: Literal["sequence", "token", "constant"] = "sequence"
    iterations: int = Field(1, ge=1)
    rewards: tuple[RewardConfig, ...] = ()

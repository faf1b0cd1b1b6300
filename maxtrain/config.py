"""Typed, frozen run configuration: YAML file + dotted `key=value` overrides + model presets.

Each subsystem gets only its own section (`model`, `mesh`, `optimizer`, `train`, `data`,
`eval`, `log`). Mistakes become a one-line `UserError` naming the key and the fix.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from maxtrain.data.config import DataConfig, SourceConfig
from maxtrain.errors import UserError
from maxtrain.finetune.config import FinetuneConfig
from maxtrain.model.config import ModelConfig
from maxtrain.rl.config import RLConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PRESET_DIR = CONFIG_DIR / "models"

_FROZEN = ConfigDict(extra="forbid", frozen=True)

# Logical axis -> mesh axes. FSDP shards the model dimension of every weight; tensor
# parallelism shards heads, MLP and vocabulary (Megatron style). Switching strategy is a
# change of mesh degrees (or of this table), never of model code.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)


class MeshConfig(BaseModel):
    """Device mesh degrees (product = device count; one may be -1 to fill) and sharding rules."""

    model_config = _FROZEN
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...] = DEFAULT_RULES


class OptimizerConfig(BaseModel):
    """AdamW with a learning-rate schedule and global-norm clipping."""

    model_config = _FROZEN
    lr: float = Field(3e-4, gt=0)
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    decay_steps: int | None = None  # None: decay over the whole run (`steps`)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    wsd_decay_fraction: float = Field(0.2, gt=0, le=1)  # WSD: final fraction of steps spent decaying
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = Field(0.1, ge=0)
    clip_norm: float | None = Field(1.0, gt=0)


class PreferenceConfig(BaseModel):
    """Knobs of the preference objectives (maxtrain/objectives_preference.py).

    dpo: loss sigmoid (DPO), ipo or hinge; beta the KL strength; label_smoothing the share of
      flipped labels (conservative DPO, sigmoid loss); rpo_alpha > 0 adds rpo_alpha x the
      chosen reply's mean token NLL (TRL's rpo_alpha: keeps the chosen likelihood up).
      reference, and its memory:
        adapters_off  LoRA runs: the params with every lora_b zeroed; no second copy of the
                      weights, one extra forward pass per step.
        frozen        full-weight runs: params["reference"], a copy of the init_from weights
                      (no gradient, no optimizer state); one copy of the weights, one extra
                      forward pass per step.
        precomputed   ref_chosen_logps / ref_rejected_logps in the records (`maxtrain
                      preference reference`): nothing at train time, one forward pass before.
    reward: center_rewards adds this x mean (r_chosen + r_rejected)^2 (keeps rewards near 0).
    """

    model_config = _FROZEN
    beta: float = Field(0.1, gt=0)
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    reference: Literal["adapters_off", "frozen", "precomputed"] = "adapters_off"
    rpo_alpha: float = Field(0.0, ge=0)
    center_rewards: float = Field(0.0, ge=0)


class TrainConfig(BaseModel):
    """What the jitted step needs: batch geometry, precision, accumulation, remat, objective."""

    model_config = _FROZEN
    global_batch: int = Field(8, gt=0)
    seq_len: int = Field(256, gt=0)
    microbatches: int = Field(1, gt=0)  # gradient accumulation inside the step
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU/TPU, f32 on CPU
    remat: Literal["none", "full", "dots"] = "none"
    # Unroll the layer scan in the compiled program (params stay stacked): ~14% faster steps
    # on CPU, where scan's stacked-residual bookkeeping costs a quarter of the step; slower
    # compiles for deep models, so off by default.
    unroll_layers: bool = False
    # Causal attention in query blocks of this many tokens: each block reads only the keys it
    # can see, skipping the masked upper triangle (exact; 0 disables). ~3x faster attention
    # on CPU at sequence 256 (benchmarks/train_throughput.py).
    attention_query_block: int = Field(128, ge=0)
    # The attention kernel. xla: the blocked attention above (CPU, any dtype); cudnn: cuDNN's
    # fused flash attention via jax.nn.dot_product_attention (GPU, bf16/f16 compute; never
    # writes the [B, N, S, S] scores). auto: cudnn where it applies, else xla.
    attention: Literal["auto", "xla", "cudnn"] = "auto"
    # The LM loss over chunks of this many positions, its gradient taken chunk by chunk in the
    # forward pass (objectives.chunked_lm_loss), so the [batch, seq, vocab] f32 logits never
    # exist at once (Llama 3's 128k vocabulary at 8 x 2048 tokens is 8.4 GB of them) and
    # nothing is recomputed. 0: the whole sequence at once.
    loss_chunk: int = Field(0, ge=0)
    z_loss: float = Field(0.0, ge=0)
    # XLA compiler options for the step (e.g. {xla_cpu_enable_fast_math: true}). None: our
    # measured defaults for the platform (see step.xla_options); {}: XLA's own defaults.
    xla_options: dict[str, str | bool | int | float] | None = None
    # causal_lm: next token on every weighted target; sft: the same loss on response tokens only
    # (the sft data format zeroes prompt weights) with dropout rngs; classification: a head's labels.
    # reward: a Bradley-Terry reward model on preference pairs (a one-label finetune.classifier);
    # dpo: direct preference optimisation against a frozen reference (see train.preference).
    # grpo: the clipped policy gradient on group rollouts scored by rewards (see train.rl).
    objective: Literal["causal_lm", "sft", "classification", "masked_lm", "reward", "dpo", "grpo"] = "causal_lm"
    preference: PreferenceConfig = PreferenceConfig()
    rl: RLConfig = RLConfig()


class EvalSet(BaseModel):
    """A named validation set: every document of its sources (same syntax as data.sources)."""

    model_config = _FROZEN
    sources: list[SourceConfig] = Field(min_length=1)
    batches: int | Literal["all"] = "all"  # batches of train.global_batch rows; all: the whole set

    @model_validator(mode="before")
    @classmethod
    def _sources_only(cls, value):
        return {"sources": value} if isinstance(value, list) else value  # `name: [sources]` shorthand


class EvalConfig(BaseModel):
    """Evaluation cadence and sets.

    batches: batches of the default set (documents held out by data.eval_fraction) per eval,
      or all. sets: named validation sets, each reported apart as eval_loss/<name>.
    """

    model_config = _FROZEN
    every: int = Field(100, ge=0)  # 0 disables periodic eval (a final eval still runs)
    batches: int | Literal["all"] = Field(8)
    sets: dict[str, EvalSet] = Field(default_factory=dict)

    @field_validator("batches")
    @classmethod
    def _positive(cls, value):
        if value != "all" and value < 1:
            raise ValueError("must be a positive number of batches or 'all'")
        return value

    @field_validator("sets")
    @classmethod
    def _names(cls, sets):
        for name in sets:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(f"set name {name!r} must be letters, digits, '_', '.' or '-' (it becomes eval_loss/<name>)")
        return sets


class WandbConfig(BaseModel):
    """Weights & Biases logging beside metrics.jsonl and TensorBoard (needs `pip install maxtrain[wandb]`).

    mode: online, offline (files under RUN_DIR/wandb, `wandb sync` later) or disabled. The
    wandb run id is derived from run_dir, so a resumed run continues the same wandb run.
    """

    model_config = _FROZEN
    project: str = "maxtrain"
    entity: str | None = None
    name: str | None = None  # default: the run dir's name
    mode: Literal["online", "offline", "disabled"] = "online"


class LogConfig(BaseModel):
    """Where and how often metrics go."""

    model_config = _FROZEN
    every: int = Field(10, gt=0)
    tensorboard: bool = True
    wandb: WandbConfig | None = None
    progress: Literal["auto", "bar", "lines"] = "auto"  # auto: a bar on a TTY, plain lines otherwise
    peak_flops: float | None = None  # per device; None: datasheet table, or measured on CPU


class CheckpointConfig(BaseModel):
    """Training checkpoints under RUN_DIR/checkpoints (see maxtrain/checkpoint/).

    every: save every N steps (0: only the final save and on preemption).
    keep: the newest N checkpoints are kept; keep_best also keeps the one with the lowest eval loss.
    async_save: write in the background while training continues.
    resume: continue from the latest checkpoint in run_dir (false, or `maxtrain train --fresh`,
    starts over and moves the old checkpoints and metrics aside).
    restore_data: restore the data position too (false restarts the data stream, e.g. after
    changing the number of processes).
    preemption_sync_every: how often multi-process runs agree on a stop signal (see below).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)  # `async` or `async_save`
    every: int = Field(100, ge=0)
    keep: int = Field(3, gt=0)
    keep_best: bool = False
    async_save: bool = Field(True, alias="async")
    resume: bool = True
    restore_data: bool = True
    # Multi-process runs agree on a stop signal (SIGTERM/SIGINT on any process) every N steps:
    # each check is a host sync that stalls the dispatch pipeline, so not every step. A signal
    # is honoured within N steps. Single-process runs check every step (no sync needed).
    preemption_sync_every: int = Field(10, gt=0)


class DistributedConfig(BaseModel):
    """How this process joins a multi-process run (see maxtrain/distributed.py and launch/).

    cluster: auto detects SLURM (srun with several tasks), Kubernetes indexed Jobs/JobSets
    (JOB_COMPLETION_INDEX) and TPU pods (TPU_WORKER_HOSTNAMES); `none` forces one process.
    coordinator/num_processes/process_id: explicit settings (also from the environment
    variables MAXTRAIN_COORDINATOR, MAXTRAIN_NUM_PROCESSES, MAXTRAIN_PROCESS_ID).
    heartbeat_timeout_s: when a process dies, the others stop within about this long.
    """

    model_config = _FROZEN
    cluster: Literal["auto", "none", "explicit", "slurm", "tpu", "kubernetes"] = "auto"
    coordinator: str | None = None  # host:port of process 0
    num_processes: int | None = Field(None, gt=0)
    process_id: int | None = Field(None, ge=0)
    init_timeout_s: int = Field(300, gt=0)  # how long to wait for the coordinator and every process
    heartbeat_timeout_s: int = Field(60, gt=0)
    shutdown_timeout_s: int = Field(60, gt=0)  # how long a finished process waits for the others at exit


class RunConfig(BaseModel):
    """A whole run. `model` is resolved from a preset in configs/models plus field overrides."""

    model_config = _FROZEN
    model: ModelConfig
    preset: str | None = None
    run_dir: str = "runs/demo"
    steps: int = Field(600, gt=0)
    seed: int = 0
    mesh: MeshConfig = MeshConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    log: LogConfig = LogConfig()
    distributed: DistributedConfig = DistributedConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    init_from: str | None = None  # exported params / checkpoint / run dir: new run from its weights, fresh optimizer

    def to_yaml(self) -> str:
        """The resolved config; loading it back gives the same run."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_preset(name: str) -> dict[str, Any]:
    """Fields of a model preset: a name in configs/models, or a path to a YAML file."""
    is_file = name.endswith((".yaml", ".yml")) or "/" in name
    path = Path(name) if is_file else PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        hint = difflib.get_close_matches(name, available, n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"available: {', '.join(available)}"
        raise UserError(f"model preset '{name}' not found in {PRESET_DIR}; {fix}")
    return yaml.safe_load(path.read_text()) or {}


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (line {key_node.start_mark.line + 1})", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file '{path}' does not exist; pass a YAML path such as configs/base.yaml")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file '{path}' is not valid YAML ({str(e).splitlines()[0]}); fix its syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping of keys, not {type(data).__name__}")
    return data


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, lists, null)."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise UserError(f"override '{override}' is not key=value; write e.g. steps=100 or optimizer.lr=1e-3")
    value = yaml.safe_load(raw) if raw.strip() else ""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        if part == "model" and isinstance(node.get("model"), str):
            node["model"] = {"preset": node["model"]}
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"cannot set '{key}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _resolve_model(tree: dict[str, Any]) -> None:
    """Replace `model: NAME` or `model: {preset: NAME, field: value}` by the full field dict."""
    model = tree.get("model", "demo")
    if isinstance(model, str):
        model = {"preset": model}
    if not isinstance(model, dict):
        raise UserError("'model' must be a preset name or a mapping with 'preset' and field overrides")
    model = dict(model)
    preset = model.pop("preset", None) or tree.get("preset")
    fields = load_preset(preset) if preset else {}
    fields.update(model)
    tree["model"] = fields
    tree["preset"] = preset


def _known_keys(model_cls: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model_cls.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _known_keys(ann, prefix + name + ".")
    return keys


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not isinstance(p, int) or True)
    if first["type"] == "extra_forbidden":
        hint = difflib.get_close_matches(loc, _known_keys(RunConfig), n=1, cutoff=0.6)
        fix = f"did you mean '{hint[0]}'?" if hint else "remove it (see configs/base.yaml for the keys)"
        return f"unknown config key '{loc}'; {fix}"
    value = first.get("input")
    shown = f" {value!r}" if not isinstance(value, dict) else ""
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"bad value for '{loc}':{shown} {first['msg'].lower()}{more}; fix it in the config or override"


def _resolve_chat_template(tree: dict[str, Any]) -> None:
    """`data.format.template: auto` becomes the tokenizer's own chat template ("model") when its
    tokenizer_config.json has one, else the built-in template of the model family (data/formats.py)."""
    data = tree.get("data") if isinstance(tree.get("data"), dict) else {}
    fmt = data.get("format")
    if isinstance(fmt, dict) and fmt.get("type") in ("sft", "preference", "prompts") and fmt.get("template", "auto") == "auto":
        from maxtrain.data.formats import FAMILY_TEMPLATES
        from maxtrain.data.tokenizer import chat_template_near

        path = (data.get("tokenizer") or {}).get("path") if isinstance(data.get("tokenizer"), dict) else None
        own = chat_template_near(path) if path else None
        fmt["template"] = "model" if own else FAMILY_TEMPLATES.get(tree["model"].get("family", "llama"), "plain")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a run config (defaults when `path` is None), apply overrides, resolve the preset, validate."""
    tree = _read_yaml(path) if path is not None else {}
    for override in overrides:
        apply_override(tree, override)
    _resolve_model(tree)
    _resolve_chat_template(tree)
    try:
        return RunConfig(**tree)
    except ValidationError as e:
        raise UserError(_one_line(e)) from None
    except TypeError as e:
        raise UserError(f"malformed config: {e}; check the section structure against configs/base.yaml") from None

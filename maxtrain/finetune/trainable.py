"""Trainable sets: which parameter leaves (and which layer slices) get gradients and optimizer state.

A trainable set is a predicate over parameter paths (`layers/attn/q/kernel`) plus, for
freezing the first k layers of the scanned stack, a row mask over the leading layer axis.
The step differentiates only the trainable leaves; the optimizer keeps state only for them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import numpy as np

from maxtrain.errors import UserError
from maxtrain.finetune import registry
from maxtrain.finetune.config import FinetuneConfig

_BASE_ALIASES = {
    "all": r".*",
    "embeddings": r"(position_)?embedding",
    "norms": r"(?!.*adapter_).*norm/(scale|bias)",  # the base's norms (an adapter's own norm is its alias's)
    "lm_head": r"lm_head/.*",
}
ALIASES = {**_BASE_ALIASES, **registry.aliases()}  # plus each method's: lora, head, adapters, ia3, prompt, prefix


def path_name(path: tuple) -> str:
    """`a/b/c` from a jax key path; attribute steps (the value inside a logical-axis box) are skipped."""
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _compile(patterns: tuple[str, ...], what: str) -> list[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(ALIASES.get(p, p)))
        except re.error as e:
            raise UserError(f"finetune.{what} pattern {p!r} is not a valid regex ({e}); fix it or use an alias: {', '.join(ALIASES)}") from None
    return out


@dataclasses.dataclass(frozen=True)
class TrainableSet:
    """Which leaves train, and which rows of the stacked `layers/...` leaves stay frozen."""

    train: tuple[re.Pattern, ...]
    freeze: tuple[re.Pattern, ...]
    frozen_layers: int = 0
    num_layers: int = 0

    def is_trainable(self, name: str) -> bool:
        """Whether any element of the leaf at `name` trains."""
        if not any(p.fullmatch(name) for p in self.train) or any(p.fullmatch(name) for p in self.freeze):
            return False
        return not (name.startswith("layers/") and self.frozen_layers >= self.num_layers)

    def leaf_predicate(self) -> Callable[[tuple], bool]:
        """`trainable(key_path) -> bool` for the step and the optimizer."""
        return lambda path: self.is_trainable(path_name(path))

    @property
    def everything(self) -> bool:
        return [p.pattern for p in self.train] == [".*"] and not self.freeze and not self.frozen_layers

    def row_mask(self, name: str, ndim: int) -> np.ndarray | None:
        """A [L, 1, ...] 0/1 mask for a partly frozen stacked layer leaf, else None."""
        if not self.frozen_layers or not name.startswith("layers/") or not self.is_trainable(name):
            return None
        mask = (np.arange(self.num_layers) >= self.frozen_layers).astype(np.float32)
        return mask.reshape((self.num_layers,) + (1,) * (ndim - 1))


def trainable_set(cfg: FinetuneConfig, num_layers: int) -> TrainableSet:
    """The trainable set of a run's `finetune:` section (defaults: see FinetuneConfig.train)."""
    train = cfg.train
    if train is None:
        train = registry.default_train(cfg)
    if cfg.freeze_layers > num_layers:
        raise UserError(f"finetune.freeze_layers={cfg.freeze_layers} exceeds model.num_layers={num_layers}; lower it")
    return TrainableSet(tuple(_compile(train, "train")), tuple(_compile(cfg.freeze, "freeze")), cfg.freeze_layers, num_layers)


def new_leaf(name: str) -> bool:
    """Leaves a finetuning method adds to a base model (absent from pretrained checkpoints): see registry.py."""
    return registry.new_leaf(name)


def count_params(params: Any, trainable: TrainableSet | None = None) -> tuple[int, int]:
    """(trainable elements, all elements); a partly frozen layer leaf counts its trained rows only."""
    total, train = 0, 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        n = int(np.prod(leaf.shape))
        total += n
        name = path_name(path)
        if trainable is None:
            train += n
        elif trainable.is_trainable(name):
            rows = trainable.row_mask(name, len(leaf.shape))
            train += n if rows is None else int(n * rows.mean())
    return train, total


def tree_bytes(tree: Any) -> int:
    """Bytes held by the array leaves of a pytree (e.g. the optimizer state)."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree) if hasattr(x, "shape"))

"""The family-independent part of conversion: tensor rules, the streaming import and the export plan.

A family (llama.py, gpt2.py) is data: how its config.json maps to ModelConfig and back,
and a list of `Rule`s, each naming one Hugging Face tensor and the maxtrain leaves it
holds. Per-layer HF tensors ("{i}" in the name) fill one layer slice of our stacked
[L, ...] leaves. Import hands the writer each leaf as lazy pieces (a stacked leaf one layer
slice at a time, each read through a memory map), so the writer can store big leaves slice
by slice and memory holds about one HF tensor, never a stacked leaf or the model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from maxtrain.convert.safetensors_io import FLOAT_DTYPES, PlannedTensor, SafetensorsReader
from maxtrain.errors import UserError
from maxtrain.model.config import ModelConfig

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Rule:
    """One HF tensor <-> one or more maxtrain leaves (several for fused tensors like GPT-2's c_attn).

    hf: the HF name; "{i}" stands for the layer index of per-layer tensors.
    ours: param paths ("layers/attn/q/kernel"); for per-layer rules these are stacked leaves
      and the functions below see one layer's slice.
    hf_shape: the HF shape, from our (per-layer) shapes.
    to_ours: HF array -> our arrays (one per path); to_hf: the inverse. Both exact
      (reshapes, transposes, slices), so a round trip reproduces every bit.
    """

    hf: str
    ours: tuple[str, ...]
    hf_shape: Callable[[list[Shape]], Shape]
    to_ours: Callable[[np.ndarray, list[Shape]], tuple[np.ndarray, ...]]
    to_hf: Callable[[tuple[np.ndarray, ...]], np.ndarray]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


def same(hf: str, ours: str, *, flat: bool = False) -> Rule:
    """Same values: norm scales, embeddings, or (flat) our [N, H] biases as HF's [N*H]."""
    if not flat:
        return Rule(hf, (ours,), lambda s: s[0], lambda a, s: (a,), lambda xs: xs[0])
    return Rule(hf, (ours,), lambda s: (math.prod(s[0]),), lambda a, s: (a.reshape(s[0]),), lambda xs: xs[0].reshape(-1))


def linear(hf: str, ours: str, n_in: int) -> Rule:
    """torch nn.Linear weight [out, in] <-> our kernel [in dims..., out dims...] (n_in leading input dims)."""

    def hf_shape(s):
        return (math.prod(s[0][n_in:]), math.prod(s[0][:n_in]))

    def to_hf(xs):
        x = xs[0]
        return x.reshape(math.prod(x.shape[:n_in]), -1).T

    return Rule(hf, (ours,), hf_shape, lambda a, s: (a.T.reshape(s[0]),), to_hf)


def conv1d(hf: str, ours: str, n_in: int) -> Rule:
    """GPT-2 Conv1D weight [in, out] <-> our kernel [in dims..., out dims...]: a reshape, no transpose."""

    def hf_shape(s):
        return (math.prod(s[0][:n_in]), math.prod(s[0][n_in:]))

    def to_hf(xs):
        x = xs[0]
        return x.reshape(math.prod(x.shape[:n_in]), -1)

    return Rule(hf, (ours,), hf_shape, lambda a, s: (a.reshape(s[0]),), to_hf)


def fused_columns(hf: str, ours: tuple[str, ...], n_in: int) -> Rule:
    """One HF tensor whose last axis concatenates several of our leaves (GPT-2 c_attn: q|k|v).

    Weights are [in, sum(out)] (n_in=1), biases [sum(out)] (n_in=0).
    """

    def widths(s):
        return [math.prod(x[n_in:]) for x in s]

    def hf_shape(s):
        return (*((math.prod(s[0][:n_in]),) if n_in else ()), sum(widths(s)))

    def to_ours(a, s):
        cuts = np.cumsum(widths(s))[:-1]
        return tuple(part.reshape(shape) for part, shape in zip(np.split(a, cuts, axis=-1), s))

    def to_hf(xs):
        lead = (math.prod(xs[0].shape[:n_in]),) if n_in else ()
        return np.concatenate([x.reshape(*lead, -1) for x in xs], axis=-1)

    return Rule(hf, tuple(ours), hf_shape, to_ours, to_hf)


@dataclass(frozen=True)
class Family:
    """How one HF architecture maps onto ModelConfig and our param tree.

    model_types: config.json `model_type` values it reads; architecture: the class name written.
    to_model_config: config.json dict -> ModelConfig fields; to_hf_config: the inverse.
    rules: the tensor rules for a config. ignored: regexes of HF tensors that are buffers, not
    weights (rotary caches, causal-mask buffers). prefix: the name prefix some checkpoints omit.
    rename: maps legacy tensor names to current ones (BERT's LayerNorm.gamma/beta).
    from_tensors: (config.json dict, {tensor name: shape}) -> more ModelConfig fields, for
      parts config.json does not name (whether a BERT checkpoint holds a pooler or an MLM head).
    export_model: the ModelConfig written for a model (default: without LoRA, merged, and
      without a classifier, which a causal LM has no place for); leaves of other parts are left out.
    """

    name: str
    model_types: tuple[str, ...]
    architecture: str
    to_model_config: Callable[[dict], dict]
    to_hf_config: Callable[[ModelConfig], dict]
    rules: Callable[[ModelConfig], list[Rule]]
    check_exportable: Callable[[ModelConfig], list[str]]
    ignored: tuple[str, ...] = ()
    prefix: str = ""
    add_bos: bool = False  # whether prompts start with BOS when the tokenizer config does not say
    extra: dict = field(default_factory=dict)
    rename: Callable[[str], str] | None = None
    from_tensors: Callable[[dict, dict[str, Shape]], dict] | None = None
    export_model: Callable[[ModelConfig], ModelConfig] | None = None

    def exported_config(self, cfg: ModelConfig) -> ModelConfig:
        """The ModelConfig this family writes for `cfg` (see export_model)."""
        if self.export_model is not None:
            return self.export_model(cfg)
        from maxtrain.finetune import registry

        return cfg.model_copy(update=registry.base_updates())


def abstract_param_shapes(cfg: ModelConfig) -> dict[str, Shape]:
    """{param path: shape} of the maxtrain model for `cfg`, without allocating it."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from maxtrain.model.transformer import Transformer

    model = Transformer(cfg)
    tree = jax.eval_shape(lambda r: nn.unbox(model.init(r, jnp.zeros((1, 2), jnp.int32))["params"]), jax.random.PRNGKey(0))
    return {path: tuple(leaf.shape) for path, leaf in flatten(tree).items()}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a/b/c": leaf} of a nested dict."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) or hasattr(value, "items"):
            out.update(flatten(dict(value), path + "/"))
        else:
            out[path] = value
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    """The nested dict of a {"a/b/c": leaf} dict."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return tree


def _bind(family: Family, cfg: ModelConfig) -> tuple[list[Rule], dict[str, Shape], int]:
    shapes = abstract_param_shapes(cfg)
    rules = family.rules(cfg)
    covered = [p for r in rules for p in r.ours]
    missing, doubled = set(shapes) - set(covered), {p for p in covered if covered.count(p) > 1}
    if missing or doubled or set(covered) - set(shapes):
        raise AssertionError(f"{family.name} rules do not cover the param tree: missing {missing}, doubled {doubled}")
    return rules, shapes, cfg.num_layers


def _layer_shapes(rule: Rule, shapes: dict[str, Shape]) -> list[Shape]:
    return [shapes[p][1:] if rule.per_layer else shapes[p] for p in rule.ours]


def _hf_names(rule: Rule, num_layers: int) -> list[str]:
    return [rule.hf.format(i=i) for i in range(num_layers)] if rule.per_layer else [rule.hf]


def normalize_names(reader: SafetensorsReader, family: Family) -> None:
    """Give the reader's tensors the family's current names: the prefix some checkpoints omit, legacy renames."""
    if family.prefix and not any(n.startswith(family.prefix) for n in reader.tensors):
        reader.tensors = {family.prefix + n: info for n, info in reader.tensors.items()}
    if family.rename is not None:
        reader.tensors = {family.rename(n): info for n, info in reader.tensors.items()}


def check_checkpoint(reader: SafetensorsReader, family: Family, cfg: ModelConfig) -> None:
    """UserErrors, before anything is written, for missing, misshapen, wrongly typed or unknown tensors."""
    normalize_names(reader, family)
    rules, shapes, layers = _bind(family, cfg)
    expected = set()
    for rule in rules:
        want = tuple(rule.hf_shape(_layer_shapes(rule, shapes)))
        for name in _hf_names(rule, layers):
            info = reader.info(name)
            expected.add(name)
            if info.dtype not in FLOAT_DTYPES:
                raise UserError(
                    f"tensor {name} has dtype {info.dtype}; only {', '.join(FLOAT_DTYPES)} weights convert (dequantize first)"
                )
            if info.shape != want:
                raise UserError(
                    f"tensor {name} has shape {list(info.shape)} but config.json implies {list(want)}; "
                    "the weights and config.json disagree (fix config.json or use matching weights)"
                )
    unknown = sorted(n for n in set(reader.tensors) - expected if not any(re.fullmatch(p, n) for p in family.ignored))
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise UserError(
            f"unexpected tensor {', '.join(unknown[:3])}{more} for a {family.architecture} with this config.json; "
            "it does not fit the architecture (wrong model_type or layer count?)"
        )


@dataclass(frozen=True)
class ImportedLeaf:
    """One maxtrain leaf to write: path, shape, dtype, and its values as pieces along axis 0.

    pieces(): (first row, array) pairs; a stacked leaf comes one layer slice ([1, ...]) at a
    time, read from its HF tensor only when asked for.
    """

    path: str
    shape: Shape
    dtype: np.dtype
    stacked: bool
    pieces: Callable[[], Iterator[tuple[int, np.ndarray]]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def assemble(self) -> np.ndarray:
        """The whole leaf in memory (small leaves, handed to orbax together)."""
        out = np.empty(self.shape, self.dtype)
        for start, block in self.pieces():
            out[start : start + block.shape[0]] = block
        return out


def iter_imported_leaves(reader: SafetensorsReader, family: Family, cfg: ModelConfig, dtype) -> Iterator[ImportedLeaf]:
    """The maxtrain leaves of a checkpoint, each read lazily (layer by layer); call check_checkpoint first."""
    rules, shapes, layers = _bind(family, cfg)
    dtype = np.dtype(dtype)
    for rule in rules:
        layer_shapes = _layer_shapes(rule, shapes)
        for j, path in enumerate(rule.ours):

            def pieces(rule=rule, j=j, layer_shapes=layer_shapes):
                if not rule.per_layer:
                    yield 0, np.asarray(rule.to_ours(reader.read(rule.hf), layer_shapes)[j], dtype)
                    return
                for i, name in enumerate(_hf_names(rule, layers)):
                    yield i, np.asarray(rule.to_ours(reader.read(name), layer_shapes)[j], dtype)[None]

            yield ImportedLeaf(path, shapes[path], dtype, rule.per_layer, pieces)


def plan_export(params_flat: dict[str, Any], family: Family, cfg: ModelConfig, dtype) -> list[PlannedTensor]:
    """The HF tensors of `params_flat` ({path: array, stacked layers}), each produced only when written."""
    problems = family.check_exportable(cfg)
    if problems:
        raise UserError(f"this model cannot be written as {family.architecture}: {'; '.join(problems)}")
    rules, shapes, layers = _bind(family, cfg)
    dtype = np.dtype(dtype)
    planned = []
    for rule in rules:
        shape = tuple(rule.hf_shape(_layer_shapes(rule, shapes)))
        for i, name in enumerate(_hf_names(rule, layers)):

            def produce(rule=rule, i=i):
                slices = tuple(np.asarray(params_flat[p][i] if rule.per_layer else params_flat[p]) for p in rule.ours)
                return np.ascontiguousarray(rule.to_hf(slices), dtype)  # one copy: cast and C order together

            planned.append(PlannedTensor(name, shape, dtype, produce))
    return planned


def first_present(hf: dict, *keys, default=None):
    """The first of `keys` present (and not None) in a config dict."""
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    return default


def require(hf: dict, key: str, where: str = "config.json"):
    """hf[key], or a UserError naming the missing key."""
    if hf.get(key) is None:
        raise UserError(f"{where} lacks '{key}'; it is not a complete Hugging Face config")
    return hf[key]

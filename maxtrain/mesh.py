"""Device mesh from config, and logical-axis -> mesh-axis shardings for params and batches."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from maxtrain.errors import UserError

if TYPE_CHECKING:
    from maxtrain.config import MeshConfig

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolve the (data, fsdp, tensor) degrees, filling at most one -1 with the remaining devices."""
    degrees = [cfg.data, cfg.fsdp, cfg.tensor]
    fill = [i for i, d in enumerate(degrees) if d == -1]
    if len(fill) > 1:
        raise UserError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1; set the others explicitly")
    if any(d == 0 or d < -1 for d in degrees):
        raise UserError(f"mesh degrees must be positive or -1, got data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor}")
    known = math.prod(d for d in degrees if d != -1)
    if fill:
        if num_devices % known:
            raise UserError(
                f"mesh degrees {known} (product of the fixed ones) do not divide the {num_devices} devices; "
                "choose degrees whose product divides the device count"
            )
        degrees[fill[0]] = num_devices // known
    if math.prod(degrees) != num_devices:
        raise UserError(
            f"mesh data={degrees[0]} x fsdp={degrees[1]} x tensor={degrees[2]} = {math.prod(degrees)} "
            f"but there are {num_devices} devices; make the product equal the device count (or use -1 for one axis)"
        )
    return tuple(degrees)  # type: ignore[return-value]


def build_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all devices of all processes with axes (data, fsdp, tensor).

    Axes are `Auto`: jit propagates shardings from the in/out annotations and the few
    logical constraints inside the model.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _mesh_axes_for(logical: str | None, rules: dict[str, Any]) -> tuple[str, ...]:
    if logical is None:
        return ()
    target = rules.get(logical)
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules) -> P:
    """PartitionSpec for an array with these logical axes, replicating dims that do not divide.

    A mesh axis is used at most once per array; a dim whose size is not a multiple of its
    mesh axes' product stays replicated (logged), e.g. 2 kv heads on tensor=4.
    """
    rules = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape):
        axes = tuple(a for a in _mesh_axes_for(name, rules) if a not in used and mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes):
            log.info("replicating logical axis %s (size %d) instead of sharding over %s", name, size, axes)
            axes = ()
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*spec)


def param_shardings(abstract_vars: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a (possibly `nn.Partitioned`-boxed) abstract variable tree."""
    logical = nn.get_partition_spec(abstract_vars)
    shapes = nn.unbox(abstract_vars)

    def one(spec, leaf):
        axes = tuple(spec) if spec is not None else (None,) * leaf.ndim
        return NamedSharding(mesh, logical_to_spec(axes, leaf.shape, mesh, rules))

    return jax.tree.map(one, logical, shapes, is_leaf=lambda x: isinstance(x, P) or x is None)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch rows over (data, fsdp); sequence and the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]

"""Logical axis names -> mesh axes: parallelism is chosen by config rules, not by model edits.

The model names every parameter axis (`out_sharding` metadata) and constrains key
activations with `constrain`; a handful of rules from the config (for example
`('embed', 'fsdp')`, `('q_heads', 'tensor')`) decide where each axis lives on the mesh.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from phi4_jax.errors import Phi4Error

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "sequence", "tensor")
LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# A jit-cache-sensitive context: a function traced under one set of rules is traced afresh
# under another, rather than reusing layouts (and shard_maps) baked in for the first.
_ACTIVE_RULES = jax.make_user_context(default_value=None)


class MeshError(Phi4Error, ValueError):
    """A mesh shape that does not fit the devices; the message says how to fix it."""


def resolve_mesh_shape(requested: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fills one `-1` axis with the devices left over and checks the product."""
    shape = {axis: int(requested[axis]) for axis in MESH_AXES}
    free = [axis for axis, size in shape.items() if size == -1]
    bad = [axis for axis, size in shape.items() if size == 0 or size < -1]
    if bad or len(free) > 1:
        raise MeshError(f"mesh sizes {shape}: each of {MESH_AXES} must be a positive size, with at "
                        f"most one -1 (fill with the remaining devices).")
    fixed = int(np.prod([size for size in shape.values() if size != -1]))
    if free:
        if num_devices % fixed:
            raise MeshError(f"mesh sizes {shape}: the fixed axes use {fixed} devices, which does "
                            f"not divide the {num_devices} available; change the fixed sizes.")
        shape[free[0]] = num_devices // fixed
    if int(np.prod(list(shape.values()))) != num_devices:
        raise MeshError(f"mesh sizes {shape} need {int(np.prod(list(shape.values())))} devices but "
                        f"{num_devices} are available; make the product equal the device count "
                        f"or set one axis to -1.")
    return shape


def make_mesh(requested: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, sequence, tensor) mesh over all devices, shaped by the config."""
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(requested, len(devices))
    # Auto axes: XLA's partitioner propagates layouts from the parameter and batch shardings
    # and the logical constraints, as in the GSPMD codebases this mirrors.
    return jax.make_mesh(tuple(shape[axis] for axis in MESH_AXES), MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(names: Sequence[str | None], rules: LogicalRules) -> PartitionSpec:
    """Maps logical names to mesh axes by the first matching rule; unmatched stay replicated."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in names:
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)  # a mesh axis may shard one dim only
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


@contextlib.contextmanager
def logical_rules(rules: LogicalRules) -> Iterator[None]:
    """Activates the rules for `constrain` while tracing the model under a mesh."""
    hashable = tuple((name, tuple(target) if isinstance(target, list) else target)
                     for name, target in rules)
    with _ACTIVE_RULES(hashable):
        yield


def active_rules() -> LogicalRules | None:
    """The rules of the innermost `logical_rules` block, or None outside one."""
    return _ACTIVE_RULES.value


def split_axes(entry: str | tuple[str, ...] | None, mesh: Mesh | AbstractMesh) -> tuple[str, ...]:
    """The mesh axes of size > 1 that one PartitionSpec entry splits its dimension over."""
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    return tuple(axis for axis in axes if mesh.shape[axis] > 1)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pins an activation's layout by logical names; a no-op outside `logical_rules`."""
    rules = active_rules()
    if rules is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules: LogicalRules) -> nnx.State:
    """NamedShardings for every leaf of a (possibly abstract) parameter state."""
    names = nnx.get_partition_spec(state)  # PartitionSpecs of logical names
    return jax.tree.map(lambda spec: NamedSharding(mesh, logical_to_spec(tuple(spec), rules)),
                        names, is_leaf=lambda x: isinstance(x, PartitionSpec))

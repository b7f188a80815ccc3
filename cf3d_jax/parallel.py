"""The one place that knows about devices: the mesh and how arrays are laid out on it.

Mesh axes are ('data', 'fsdp', 'spatial') with sizes from `config.mesh.shape` (-1 = the
remaining devices). Batches are split along their leading axis over data × fsdp; parameters,
optimizer state and EMA are replicated (FSDP and spatial rules come with the scale-out work).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cf3d_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "spatial")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves one -1 entry so the product equals `num_devices`; ConfigError otherwise."""
  shape = [int(s) for s in shape]
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ConfigError(f"config.mesh.shape={tuple(shape)}: positive sizes and at most one -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if num_devices % known:
      raise ConfigError(f"config.mesh.shape={tuple(shape)} does not divide {num_devices} devices")
    shape[shape.index(-1)] = num_devices // known
  if int(np.prod(shape)) != num_devices:
    raise ConfigError(f"config.mesh.shape={tuple(shape)} needs {int(np.prod(shape))} devices; "
                      f"{num_devices} are available")
  return tuple(shape)


def make_mesh(shape: Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
  """A Mesh over `devices` (default: all) with axes MESH_AXES (Auto axis types)."""
  devices = list(jax.devices() if devices is None else devices)
  dims = mesh_shape(shape, len(devices))
  return Mesh(np.asarray(devices).reshape(dims), MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data × fsdp; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_divisible(batch_size: int, mesh: Mesh, key: str) -> None:
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % n:
    raise ConfigError(f"config.{key}={batch_size} must be divisible by data × fsdp = {n}")


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host batch (this process's rows) → global arrays sharded along the batch axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}

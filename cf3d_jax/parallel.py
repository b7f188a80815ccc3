"""The one place that knows about devices: the mesh, the logical-axis rules and the layouts.

Mesh axes are ('data', 'fsdp', 'spatial') with sizes from `config.mesh.shape` (-1 = the
remaining devices). Models name the axes of their params and activations logically
(`cf3d_jax.models.layers`); `config.mesh.rules` maps each logical name to mesh axes, in order of
precedence (flax semantics: a rule applies when its mesh axes are still free in that array):

  activation_batch    → ('data', 'fsdp')   batch split over data × fsdp
  activation_depth    → 'spatial'          volumes split along D (XLA adds the conv halos)
  conv_out, mlp, heads → 'fsdp'           FSDP: params, EMA and Adam moments split on their
  conv_in, embed, text_embed → 'fsdp'      output features (else input features); GroupNorm
  norm → 'fsdp'                            scales and biases too

A mesh axis that does not divide an array's dimension is dropped for that array (a tuple of
axes keeps its longest dividing prefix), so a 1×1×1 conv with 8 outputs or a 4³ bottleneck on a
spatial axis of 8 stays replicated rather than erroring: every array gets a legal layout. The
rules are data (`config.mesh.rules`); `DEFAULT_RULES` below is the default.

Also here: `shard_map` helpers for the parts whose data flow is local (the per-device loss sum
with an explicit psum; the Haar transform lives in `cf3d_jax.wavelets`), the per-host batch
feed (`put_batch`) and `jax.distributed` initialisation.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cf3d_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "spatial")
BATCH_AXES = ("data", "fsdp")
VOLUME_AXES = ("activation_batch", "activation_depth", "activation_height",
               "activation_width", "activation_channels")

Rules = tuple[tuple[str, Any], ...]

DEFAULT_RULES: Rules = (   # config_base's default config.mesh.rules (the one definition)
    ("activation_batch", ("data", "fsdp")),
    ("activation_depth", "spatial"),
    ("conv_out", "fsdp"), ("mlp", "fsdp"), ("heads", "fsdp"),
    ("conv_in", "fsdp"), ("embed", "fsdp"), ("text_embed", "fsdp"), ("norm", "fsdp"),
)


# ---- mesh -------------------------------------------------------------------------------------

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
  """A Mesh over `devices` (default: all, process-major) with axes MESH_AXES (Auto axes).

  Auto axis types on purpose: XLA's SPMD partitioner propagates the layouts we pin (params,
  batch, block-boundary activations) through everything else, convolution halos included.
  """
  devices = list(jax.devices() if devices is None else devices)
  dims = mesh_shape(shape, len(devices))
  return Mesh(device_grid(dims, devices), MESH_AXES)


def device_grid(dims: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
  """`devices` arranged as an array of shape `dims`.

  TPU: in the chips' physical order (`mesh_utils.create_device_mesh`), so that neighbours along
  each mesh axis are neighbours on the interconnect (the last axes — `spatial`, `fsdp`, which
  carry the convolution halos and the FSDP all-gathers — get the fastest links). Elsewhere, and
  when the TPU shape cannot be mapped onto the physical torus, the given (process-major) order.
  The input pipeline does not depend on the order: each host finds the rows its devices hold
  (`host_rows`).
  """
  devices = list(devices)
  if devices and getattr(devices[0], "platform", "") == "tpu":
    from jax.experimental import mesh_utils
    try:
      return mesh_utils.create_device_mesh(tuple(dims), devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError) as e:
      from absl import logging
      logging.warning("mesh %s: no physical TPU layout (%s); using the device list order",
                      tuple(dims), e)
  return np.asarray(devices, dtype=object).reshape(tuple(dims))


def rules_from_config(mesh_config) -> Rules:
  """`config.mesh.rules` as a tuple of (logical name, mesh axes); ConfigError if malformed."""
  out = []
  for rule in mesh_config.rules:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ConfigError(f"config.mesh.rules: {rule!r} is not a (logical name, mesh axes) pair")
    axes = rule[1]
    flat = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    bad = [a for a in flat if a not in MESH_AXES]
    if bad:
      raise ConfigError(f"config.mesh.rules: {rule!r} names mesh axes {bad}; expected "
                        f"among {MESH_AXES} or None")
    out.append((rule[0], axes if axes is None or isinstance(axes, str) else tuple(axes)))
  return tuple(out)


# ---- logical names → layouts ------------------------------------------------------------------

def _axes_tuple(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], rules: Rules,
                    axis_sizes: dict[str, int]) -> P:
  """PartitionSpec for an array of `shape` whose dims are named `names`, under `rules`.

  Rules in order; each mesh axis is used at most once per array; a mesh axis (group) is only
  assigned where its size divides the dimension (tuples keep their longest dividing prefix).
  """
  result: list[Any] = [None] * len(names)
  assigned = [False] * len(names)
  used: set[str] = set()
  for logical, mesh_axes in rules:
    if logical not in names:
      continue
    pos = list(names).index(logical)
    if assigned[pos]:
      continue
    axes = tuple(a for a in _axes_tuple(mesh_axes) if a in axis_sizes)
    if not axes or used.intersection(axes):
      continue
    kept = fit_axes(axes, shape[pos], axis_sizes)
    if kept is None:
      continue
    result[pos] = kept
    assigned[pos] = True
    used.update(_axes_tuple(kept))
  return P(*result)


def fit_axes(entry: Any, dim: int, axis_sizes: dict[str, int]) -> Any:
  """The longest prefix of the mesh axes `entry` whose total size divides `dim`, as a
  PartitionSpec entry (name, tuple of names, or None)."""
  kept: list[str] = []
  for a in _axes_tuple(entry):
    if dim % int(np.prod([axis_sizes[k] for k in kept + [a]])):
      break
    kept.append(a)
  if not kept:
    return None
  return kept[0] if len(kept) == 1 else tuple(kept)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names, under the active flax rules and mesh.

  A no-op outside `activation_context` (no rules or no mesh): single-device code and tests see
  plain arrays. Non-dividing axes are dropped (see `logical_to_spec`).
  """
  rules = nn.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return x
  spec = logical_to_spec(names, x.shape, rules, dict(mesh.shape))
  return jax.lax.with_sharding_constraint(x, spec)


@contextlib.contextmanager
def activation_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Activates `mesh` and the logical rules: trace sharded functions inside it."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def tree_shardings(logical_specs: Any, abstract: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree of arrays from a matching tree of logical PartitionSpecs."""
  sizes = dict(mesh.shape)
  return jax.tree.map(
      lambda names, a: NamedSharding(mesh, logical_to_spec(tuple(names), a.shape, rules, sizes)),
      logical_specs, abstract, is_leaf=lambda x: isinstance(x, P))


def _dict_keys(path) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def state_shardings(abstract_state: dict, param_shardings: Any, mesh: Mesh) -> dict:
  """Shardings of `{params, ema, opt_state, step}`: params and EMA as `param_shardings`;
  optimizer leaves whose dict path and shape match a parameter's (Adam's mu and nu) follow that
  parameter; everything else (counts, the step) is replicated."""
  by_path = {}
  for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
    by_path[_dict_keys(path)] = s
  shapes = {_dict_keys(p): a.shape
            for p, a in jax.tree_util.tree_flatten_with_path(abstract_state["params"])[0]}
  rep = replicated(mesh)

  def opt_leaf(path, a):
    keys = _dict_keys(path)
    for start in range(len(keys)):
      sub = keys[start:]
      if sub in by_path and shapes[sub] == a.shape:
        return by_path[sub]
    return rep

  return {"params": param_shardings, "ema": param_shardings,
          "opt_state": jax.tree_util.tree_map_with_path(opt_leaf, abstract_state["opt_state"]),
          "step": rep}


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_spec(shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> P:
  """Layout of a batch array: `[B, D, H, W, C]` volumes by VOLUME_AXES, others by batch only."""
  names = VOLUME_AXES if len(shape) == 5 else ("activation_batch",) + (None,) * (len(shape) - 1)
  return logical_to_spec(names, shape, rules, dict(mesh.shape))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data × fsdp; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_shardings(shapes: dict[str, Sequence[int]], mesh: Mesh,
                    rules: Rules = DEFAULT_RULES) -> dict[str, NamedSharding]:
  """One NamedSharding per batch key from its global shape."""
  return {k: NamedSharding(mesh, batch_spec(s, mesh, rules)) for k, s in shapes.items()}


def check_batch_divisible(batch_size: int, mesh: Mesh, key: str) -> None:
  """The batch must split over 'data' (pure data parallelism). Over 'fsdp' it splits where it
  divides; otherwise (batch 1 at 256³) fsdp devices share the batch and rules such as
  activation_height → fsdp keep the activations divided (cf3d_jax.memory.RULE_SETS)."""
  n = mesh.shape["data"]
  if batch_size % n:
    raise ConfigError(f"config.{key}={batch_size} must be divisible by the data axis = {n}")


def check_spatial_divisible(image_shape: Sequence[int], mesh: Mesh, key: str) -> None:
  """Spatial sharding splits D: every shard's block must be even (local Haar transform)."""
  s = mesh.shape["spatial"]
  if s > 1 and image_shape[0] % (2 * s):
    raise ConfigError(f"config.{key}={tuple(image_shape)}: depth must be divisible by "
                      f"2 × spatial = {2 * s} (each shard transforms an even block)")


def host_rows(sharding: NamedSharding, global_shape: Sequence[int]) -> slice:
  """The rows of the leading axis that this process's devices hold under `sharding`."""
  starts, stops = [], []
  for idx in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
    sl = idx[0] if idx else slice(None)
    start, stop, _ = sl.indices(global_shape[0])
    starts.append(start)
    stops.append(stop)
  return slice(min(starts), max(stops))


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh, rules: Rules = DEFAULT_RULES,
              global_rows: bool = True) -> dict[str, jax.Array]:
  """Host batch → global arrays laid out by `batch_shardings`.

  global_rows=True: `batch` holds the whole global batch (every host reads the same stream) and
  each host keeps only the rows its devices hold. False: `batch` holds exactly this process's
  rows (a per-host data shard), in process order.
  """
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if global_rows:
      shape = v.shape
    else:
      shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
    sharding = NamedSharding(mesh, batch_spec(shape, mesh, rules))
    local = v[host_rows(sharding, shape)] if global_rows else v
    out[k] = jax.make_array_from_process_local_data(sharding, local, shape)
  return out


def replicate(tree: Any, mesh: Mesh) -> Any:
  """A host tree (every process holds the same values) → global arrays replicated on `mesh`."""
  rep = replicated(mesh)
  return jax.tree.map(
      lambda v: jax.make_array_from_callback(np.shape(v), rep, lambda idx: np.asarray(v)[idx]),
      tree)


def to_host(x: jax.Array) -> np.ndarray:
  """A (global) array → the whole value as NumPy on every process; across processes its
  shards are gathered (`multihost_utils.process_allgather`)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def interleaved_order(batch_size: int, num_hosts: int) -> np.ndarray:
  """Row order that turns n per-host blocks of an element-interleaved stream (host p holds
  elements p, p + n, …) back into stream order: `batch[order][e]` is element e."""
  local = batch_size // num_hosts
  e = np.arange(batch_size)
  return (e % num_hosts) * local + e // num_hosts


# ---- shard_map helpers ------------------------------------------------------------------------

def global_mean(per_example: jax.Array, mesh: Mesh | None, rules: Rules = DEFAULT_RULES
                ) -> jax.Array:
  """Mean of a per-example `[B]` array over the global batch.

  With a mesh: each device sums its own rows and an explicit `psum` over the batch mesh axes
  adds the partial sums (shard_map); without one, `jnp.mean`.
  """
  if mesh is None:
    return jnp.mean(per_example)
  spec = batch_spec(per_example.shape, mesh, rules)
  axes = _axes_tuple(spec[0]) if len(spec) else ()
  total = per_example.shape[0]

  def local(x):
    s = jnp.sum(x)
    return (jax.lax.psum(s, axes) if axes else s) / total

  return jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=P())(per_example)


# ---- multi-host -------------------------------------------------------------------------------

DISTRIBUTED_ENV = ("CF3D_COORDINATOR_ADDRESS", "CF3D_NUM_PROCESSES", "CF3D_PROCESS_ID")


def usable_cores() -> int:
  """The CPU cores this process may run on (its affinity mask where the OS has one)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:                          # macOS, Windows
    return os.cpu_count() or 1


def cpu_device_count(requested: int, batch_sizes: Sequence[int], cores: int,
                     processes: int = 1) -> int:
  """How many CPU devices to split this host into (`config.mesh.cpu_devices`).

  `requested` > 0 is taken as given; -1 (auto) is the largest n <= `cores` that divides every
  per-process batch in `batch_sizes` (global batches / `processes`), so each device gets whole
  examples; 0 means JAX's own (returned as 0).
  """
  if requested >= 0:
    return requested
  per_process = [max(int(b) // max(processes, 1), 1) for b in batch_sizes] or [1]
  for n in range(max(cores, 1), 0, -1):
    if all(b % n == 0 for b in per_process):
      return n
  return 1


def configure_cpu_devices(requested: int, batch_sizes: Sequence[int]) -> int | None:
  """Splits the host CPU into `cpu_device_count(...)` JAX devices before the backend starts.

  XLA's CPU backend leaves part of a multi-core CPU idle on a U-Net's small ops; the default mesh
  puts the batch on every device, so 2 devices on 2 cores train the demo 1.27-1.37x faster
  (docs/benchmarks.md). Returns the count set, or None when nothing was set: `requested` is 0,
  `$XLA_FLAGS` already forces a host device count (that wins), or the backend is already running
  (a notebook or test that used JAX before; it keeps its devices, with a warning).
  """
  from jax._src import distributed as _distributed, xla_bridge
  if requested == 0 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return None
  processes = getattr(_distributed.global_state, "num_processes", None) or 1
  n = cpu_device_count(requested, batch_sizes, usable_cores(), processes)
  if xla_bridge.backends_are_initialized():
    if jax.config.jax_num_cpu_devices != n:
      from absl import logging
      logging.warning("mesh.cpu_devices: JAX already runs (%d CPU device(s)); %d not applied",
                      len(jax.devices("cpu")), n)
    return None
  jax.config.update("jax_num_cpu_devices", n)
  return n


def initialize_distributed(mode: str = "auto", coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           local_device_ids: Sequence[int] | None = None) -> bool:
  """Joins a multi-process job via `jax.distributed.initialize`; returns whether it did.

  mode 'off': never. 'on': always; unset arguments are left to JAX's cluster detection (TPU pod
  metadata, SLURM, Open MPI, Kubernetes). 'auto': when a coordinator is given (argument or
  `$CF3D_COORDINATOR_ADDRESS`) or a multi-host cluster is detected (`$SLURM_NTASKS` > 1, or
  `$TPU_WORKER_HOSTNAMES` / `$MEGASCALE_COORDINATOR_ADDRESS` naming several workers).
  Arguments default from `$CF3D_COORDINATOR_ADDRESS`, `$CF3D_NUM_PROCESSES`,
  `$CF3D_PROCESS_ID`. Call before anything touches a JAX device.
  """
  if mode not in ("auto", "on", "off"):
    raise ConfigError(f"--distributed={mode!r}: expected 'auto', 'on' or 'off'")
  env = os.environ
  coordinator_address = coordinator_address or env.get("CF3D_COORDINATOR_ADDRESS") or None
  if num_processes is None and env.get("CF3D_NUM_PROCESSES"):
    num_processes = int(env["CF3D_NUM_PROCESSES"])
  if process_id is None and env.get("CF3D_PROCESS_ID"):
    process_id = int(env["CF3D_PROCESS_ID"])
  if mode == "off":
    return False
  if mode == "auto":
    cluster = (int(env.get("SLURM_NTASKS", "1") or 1) > 1
               or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
               or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS")))
    if not coordinator_address and not cluster:
      return False
  if coordinator_address and (num_processes is None or process_id is None):
    raise ConfigError("--coordinator_address needs --num_processes and --process_id (or "
                      "$CF3D_NUM_PROCESSES and $CF3D_PROCESS_ID)")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids)
  return True


def is_writer() -> bool:
  """True on the process that writes images, NIfTI and summaries (process 0)."""
  return jax.process_index() == 0

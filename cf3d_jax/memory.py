"""Ahead-of-time memory and FLOPs of the sharded train step, for any mesh, without running it.

`python -m cf3d_jax.benchmark --what=memory --memory_configs=wdm256 --topology=v5e:4x4
 --mesh=1,4,4 --remat=full --dtype=bfloat16 --rules=spatial_hw`

The train step is lowered with abstract inputs (`jax.ShapeDtypeStruct`s carrying their
shardings: no array is allocated) and compiled; `compiled.memory_analysis()` gives the bytes one
device needs (arguments + outputs + temporaries − donated aliases) and `cost_analysis()` the
FLOPs. The devices come from this machine (`--topology=cpu`, e.g. with
`XLA_FLAGS=--xla_force_host_platform_device_count=16`) or from a TPU topology description
(`--topology=v5e:4x4`, `v4:2x2x4`): that needs `libtpu` (`pip install libtpu`, optional, not a
dependency of cf3d_jax) and compiles for the TPU on this CPU, with no TPU present.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

import jax
import numpy as np

from cf3d_jax import parallel
from cf3d_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The paper's configurations (config file, get_config argument). The MAISI rows compile the
# latent U-Net's train step on prepared latents (the VAE is not in the step).
PAPER_CONFIGS = {
    "wdm128": ("configs/wdm_ms.py", None),
    "wdm256": ("configs/wdm_ms.py", "res256"),
    "maisi128": ("configs/maisi_rflow_ms.py", "res128"),
    "maisi256": ("configs/maisi_rflow_ms.py", None),
}

# Named rule sets for `--rules`. 'default' = config.mesh.rules. 'spatial_hw' splits volumes along
# depth on `spatial` AND height on `fsdp`: for batch 1, where the batch cannot be split, so that
# fsdp devices still divide the activations rather than each holding all of them.
RULE_SETS = {
    "default": None,
    "spatial_hw": (("activation_batch", "data"), ("activation_depth", "spatial"),
                   ("activation_height", "fsdp"))
                  + tuple(r for r in parallel.DEFAULT_RULES if not r[0].startswith("activation")),
}


def topology_devices(topology: str) -> list[Any]:
  """Devices of this machine ('cpu' / 'local') or of a TPU topology ('v5e:4x4', 'v4:2x2x4')."""
  if topology in ("cpu", "local"):
    return list(jax.devices())
  try:
    import libtpu  # noqa: F401
  except ImportError as e:
    raise ConfigError(f"--topology={topology}: compiling for a TPU topology without a TPU needs "
                      "libtpu (pip install libtpu; optional, not a cf3d_jax dependency)") from e
  from jax.experimental import topologies
  # Any JAX process on this machine may hold libtpu's lockfile (JAX probes the plugin at start);
  # a topology description needs no chip, so sharing is safe.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)


@dataclasses.dataclass
class MemoryResult:
  config: str
  topology: str
  mesh: tuple[int, ...]
  batch: int
  image: tuple[int, ...]
  dtype: str
  remat: str
  rules: str
  per_device_gib: float          # arguments + outputs + temporaries − aliased (donated)
  arguments_gib: float
  temporaries_gib: float
  flops_per_device: float
  compile_s: float

  def row(self) -> dict:
    return {"bench": "memory", **dataclasses.asdict(self)}


def _gib(n: float) -> float:
  return round(float(n) / 2 ** 30, 3)


def peak_bytes(compiled) -> int:
  """Bytes one device needs to run `compiled` (a `jax.stages.Compiled`), from XLA's
  `memory_analysis()`: arguments + outputs + temporaries − aliased (donated) buffers."""
  mem = compiled.memory_analysis()
  return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)


def compiled_flops(compiled) -> float:
  """XLA's FLOP count of one run of `compiled` per device (`cost_analysis()['flops']`; nan
  when the backend reports none)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", float("nan")))


def compile_train_step(config, devices: Sequence[Any], mesh_shape: Sequence[int],
                       text_shape: tuple[int, int]):
  """Lowers and compiles the jitted train step of `config` on a mesh over `devices` with
  abstract, sharded inputs. Returns the compiled executable."""
  from cf3d_jax import checkpoints, train
  mesh = parallel.make_mesh(mesh_shape, devices)
  rules = parallel.rules_from_config(config.mesh)
  parallel.check_batch_divisible(config.train.batch_size, mesh, "train.batch_size")
  model, objective, space = checkpoints.build_components(config)
  tx = train.make_optimizer(config.train)
  abstract = checkpoints.abstract_state(model, tx, config, text_shape, mesh)
  state_sh = jax.tree.map(lambda a: a.sharding, abstract)
  b = config.train.batch_size
  shapes = {"volume": (b,) + space.record_shape(tuple(config.data.shape)),
            "text_emb": (b,) + text_shape,
            "text_mask": (b, text_shape[0]), "label": (b,)}
  dtypes = {"volume": np.float32, "text_emb": np.float32, "text_mask": np.bool_,
            "label": np.int32}
  batch_sh = parallel.batch_shardings(shapes, mesh, rules)
  batch = {k: jax.ShapeDtypeStruct(s, dtypes[k], sharding=batch_sh[k]) for k, s in shapes.items()}
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=parallel.replicated(mesh))
  step = train.make_train_step(model, tx, objective, space, config, mesh, state_sh, batch_sh)
  with parallel.activation_context(mesh, rules):
    return step.lower(abstract, batch, key).compile()


def measure(name: str, config, topology: str, mesh_shape: Sequence[int],
            text_shape: tuple[int, int], remat: str, rules_name: str) -> MemoryResult:
  """Compiles `config` (with `remat` on every level and the middle, rules `rules_name`) and
  reads the per-device memory and FLOPs."""
  levels = len(config.model.channel_mult)
  config.model.remat_levels = (remat,) * levels
  config.model.middle_remat = remat
  if RULE_SETS.get(rules_name, "missing") == "missing":
    raise ConfigError(f"--rules={rules_name!r}: expected one of {sorted(RULE_SETS)}")
  if RULE_SETS[rules_name] is not None:
    config.mesh.rules = RULE_SETS[rules_name]
  devices = topology_devices(topology)
  t0 = time.perf_counter()
  compiled = compile_train_step(config, devices, mesh_shape, text_shape)
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  total = peak_bytes(compiled)
  return MemoryResult(
      config=name, topology=topology,
      mesh=parallel.mesh_shape(mesh_shape, len(devices)), batch=config.train.batch_size,
      image=tuple(config.data.shape), dtype=config.model.dtype, remat=remat, rules=rules_name,
      per_device_gib=_gib(total), arguments_gib=_gib(mem.argument_size_in_bytes),
      temporaries_gib=_gib(mem.temp_size_in_bytes),
      flops_per_device=compiled_flops(compiled),
      compile_s=round(compile_s, 1))


def bench_memory(configs: Sequence[str], topology: str, mesh_shape: Sequence[int],
                 remats: Sequence[str], dtype: str, rules_name: str,
                 batch_size: int = 0) -> list[dict]:
  """Rows of `MemoryResult` for each paper config × remat policy."""
  from cf3d_jax.config_base import load_config_file
  from cf3d_jax.data.prepare import table_source
  from cf3d_jax.text.table import load_table
  rows = []
  for name in configs:
    if name not in PAPER_CONFIGS:
      raise ConfigError(f"--memory_configs: {name!r} is not one of {sorted(PAPER_CONFIGS)}")
    path, arg = PAPER_CONFIGS[name]
    for remat in remats:
      config = load_config_file(os.path.join(ROOT, path), arg)
      config.model.dtype = dtype
      if batch_size:
        config.train.batch_size = batch_size
      text_shape = tuple(load_table(table_source(config)).embeddings.shape[1:])
      rows.append(measure(name, config, topology, mesh_shape, text_shape, remat,
                          rules_name).row())
      print(rows[-1], flush=True)
  return rows

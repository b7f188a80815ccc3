"""Speed measurements: `python -m cf3d_jax.benchmark --config=configs/demo.py --what=train,conv`.

Prints a table and writes JSON (`--output`, default `benchmark.json`). Timings are the median of
`--repeats` runs after a warm-up/compile run, with `jax.block_until_ready`.
  train: the jitted train step of the config's model, for each U-Net `conv_impl`: compile
         time, ms/step, voxels/s (image voxels per second).
  conv:  the dominant primitive, a 3×3×3 conv fwd+bwd at each U-Net level's real shape
         (batch, resolution, channels), for each conv formulation, and PyTorch (channels-first
         and channels-last) when torch is installed.
"""

from __future__ import annotations

import functools
import json
import platform
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from cf3d_jax.data import bench as data_bench
from cf3d_jax.files import write_text
from cf3d_jax.models import layers

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file.",
                                          lock_config=False)
_WHAT = flags.DEFINE_list("what", ["train", "conv"], "Benchmarks to run: train, conv.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (median reported).")
_OUTPUT = flags.DEFINE_string("output", "benchmark.json", "Where to write the JSON results.")
# --what=memory (cf3d_jax.memory): AOT-compiled train step, per-device memory and FLOPs.
_MEM_CONFIGS = flags.DEFINE_list("memory_configs", ["wdm128", "wdm256"],
                                 "memory: paper configs (cf3d_jax.memory.PAPER_CONFIGS).")
_TOPOLOGY = flags.DEFINE_string("topology", "cpu", "memory: 'cpu' (this machine's devices) or a "
                                "TPU topology such as v5e:4x4 or v4:2x2x4 (needs libtpu).")
_MESH = flags.DEFINE_list("mesh", ["-1", "1", "1"], "memory: mesh shape (data, fsdp, spatial).")
_REMAT = flags.DEFINE_list("remat", ["none", "full"], "memory: remat policies to compare.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"],
                           "memory: compute dtype (params stay float32).")
_RULES = flags.DEFINE_string("rules", "default", "memory: rule set (cf3d_jax.memory.RULE_SETS).")
_MEM_BATCH = flags.DEFINE_integer("memory_batch", 0, "memory: global batch (0 = the config's).")


def time_fn(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
  """(seconds of the first call incl. compile, median seconds of `repeats` later calls)."""
  t = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t
  runs = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    runs.append(time.perf_counter() - t)
  return first, statistics.median(runs)


def bench_train(config, repeats: int) -> list[dict]:
  """Train-step timing for each conv formulation at the config's batch and shape."""
  from cf3d_jax import train
  from cf3d_jax.data.prepare import table_source
  from cf3d_jax.text.table import load_table
  length, width = load_table(table_source(config)).embeddings.shape[1:]
  rows = []
  configured = config.model.conv_impl
  for impl in layers.CONV_IMPLS:
    config.model.conv_impl = impl
    model, objective, space = train.build_components(config)
    tx = train.make_optimizer(config.train)
    b = config.train.batch_size
    shape = tuple(config.data.shape)
    z_shape = (b,) + space.latent_shape(shape)
    state = train.init_state(model, tx, jax.random.key(0), z_shape, (length, width))
    batch = {"volume": jnp.zeros((b,) + shape + (1,)),
             "text_emb": jnp.ones((b, length, width)), "text_mask": jnp.ones((b, length), bool)}
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, objective=objective,
                                     space=space, ema_decay=0.99))
    key = jax.random.key(1)
    first, median = time_fn(lambda: step(state, batch, key)[1]["loss"], repeats)
    rows.append({"bench": "train", "conv_impl": impl, "batch": b, "shape": list(shape),
                 "compile_plus_first_s": round(first, 2), "ms_per_step": round(median * 1e3, 1),
                 "voxels_per_s": round(b * int(np.prod(shape)) / median)})
  config.model.conv_impl = configured
  return rows


def _torch_conv_ms(n, s, c, repeats, channels_last) -> float | None:
  try:
    import torch
  except ImportError:
    return None
  x = torch.randn(n, c, s, s, s, requires_grad=True)
  conv = torch.nn.Conv3d(c, c, 3, padding=1)
  if channels_last:
    x = x.detach().to(memory_format=torch.channels_last_3d).requires_grad_()
    conv = conv.to(memory_format=torch.channels_last_3d)

  def run():
    (conv(x) ** 2).sum().backward()

  run()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    run()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def bench_conv(config, repeats: int) -> list[dict]:
  """3×3×3 conv fwd+bwd at each U-Net level's (batch, resolution, channels)."""
  b = config.train.batch_size
  s0 = config.data.shape[0] // 2   # wavelet space halves the image
  rows = []
  for level, mult in enumerate(config.model.channel_mult):
    c, s = config.model.base_channels * mult, s0 // 2 ** level
    x = jax.random.normal(jax.random.key(0), (b, s, s, s, c))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, c, c)) * 0.05
    row = {"bench": "conv", "level": level, "batch": b, "size": s, "channels": c}
    for impl in layers.CONV_IMPLS:
      grad = jax.jit(jax.grad(lambda x, w, impl=impl: jnp.sum(layers.conv3d(x, w, 1, 1, impl) ** 2),
                              argnums=(0, 1)))
      row[f"jax_{impl}_ms"] = round(time_fn(lambda: grad(x, w), repeats)[1] * 1e3, 1)
    for name, cl in (("torch_ms", False), ("torch_channels_last_ms", True)):
      ms = _torch_conv_ms(b, s, c, repeats, cl)
      if ms is not None:
        row[name] = round(ms * 1e3, 1)
    rows.append(row)
  return rows


def bench_memory(config, repeats: int) -> list[dict]:
  """Per-device memory and FLOPs of the compiled train step (cf3d_jax.memory); no timing."""
  del config, repeats
  from cf3d_jax import memory
  return memory.bench_memory(_MEM_CONFIGS.value, _TOPOLOGY.value, [int(s) for s in _MESH.value],
                             _REMAT.value, _DTYPE.value, _RULES.value, _MEM_BATCH.value)


BENCHES = {"train": bench_train, "conv": bench_conv, "data": data_bench.bench_data,
           "memory": bench_memory}


def print_table(rows: list[dict]) -> None:
  for bench in dict.fromkeys(r["bench"] for r in rows):
    sub = [r for r in rows if r["bench"] == bench]
    keys = list(dict.fromkeys(k for r in sub for k in r if k != "bench"))
    print(f"\n[{bench}]")
    print(" | ".join(keys))
    for r in sub:
      print(" | ".join(str(r.get(k, "")) for k in keys))


def main(argv):
  del argv
  unknown = set(_WHAT.value) - set(BENCHES)
  if unknown:
    raise app.UsageError(f"--what: unknown {sorted(unknown)}; known {sorted(BENCHES)}")
  rows = []
  for what in _WHAT.value:
    rows += BENCHES[what](_CONFIG.value, _REPEATS.value)
  print_table(rows)
  result = {"device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(),
            "cpu": platform.processor() or platform.machine(), "jax": jax.__version__,
            "rows": rows}
  write_text(_OUTPUT.value, json.dumps(result, indent=1))
  print(f"\nwrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)

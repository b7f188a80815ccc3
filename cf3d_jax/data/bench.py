"""Input-pipeline throughput: `python -m cf3d_jax.benchmark --what=data`.

Self-contained: writes synthetic record shards (`--data_records` volumes of each size in
`--data_sizes`, float32 as `prepare` writes them) into a temporary folder, then times the
training stream of `pipeline.make_train_dataset` (decode, prompt pick, batching; batch 1) with each
worker count in `--data_workers`: volumes/s = batches/s after a warm-up that starts the workers,
median of `--repeats` windows of `--data_batches` batches. The loader alone: nothing consumes
the batches. Quick run: `--data_sizes=32 --data_workers=0 --data_batches=4 --repeats=1`.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Sequence

import numpy as np
from absl import flags

from cf3d_jax.data import records

_SIZES = flags.DEFINE_list("data_sizes", ["128", "256"], "data bench: cubic volume sizes.")
_WORKERS = flags.DEFINE_list("data_workers", ["0", "2", "4"], "data bench: grain worker counts.")
_RECORDS = flags.DEFINE_integer("data_records", 8, "data bench: synthetic records per size.")
_BATCHES = flags.DEFINE_integer("data_batches", 16, "data bench: batches per timed window.")


def write_synthetic_records(folder: str, size: int, num_records: int, seed: int = 0) -> dict:
  """`num_records` brain-like volumes `[size³, 1]` as record shards (4 per shard), 3 classes in
  turn, one subject each; returns the index. Like a conformed scan, most of the grid is
  background (−1): an ellipsoid filling a third of it holds random intensities (so compression
  gains only what the background gives)."""
  rng = np.random.default_rng(seed)
  axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
  inside = ((axis[:, None, None] / 0.85) ** 2 + (axis[None, :, None] / 0.95) ** 2
            + (axis[None, None, :] / 0.8) ** 2) < 1.0

  def recs():
    for i in range(num_records):
      noise = rng.uniform(-0.8, 1.0, (size, size, size)).astype(np.float32)
      volume = np.where(inside, noise, np.float32(-1.0))[..., None]
      yield {"volume": volume, "affine": np.eye(4), "subject_id": f"bench-{i:04d}",
             "label": i % 3, "clinical_value": float(i)}

  return records.write_dataset(folder, recs(), 4, {"shape": [size] * 3, "source": "bench"})


def measure_loader(folder: str, index: dict, size: int, workers: int, batches: int, repeats: int
                   ) -> dict:
  """Volumes/s of the training stream over the records in `folder` with `workers` processes."""
  from cf3d_jax import config_base
  from cf3d_jax.data import pipeline
  from cf3d_jax.text.table import builtin_table_path, load_table
  config = config_base.base_config()
  config.data.shape = (size,) * 3
  config.data.split = (1.0, 0.0, 0.0)
  config.data.num_workers = workers
  config.train.batch_size = 1
  table = load_table(builtin_table_path("ms_minilm"))
  ds = pipeline.make_train_dataset(folder, index, table, config, shard_index=0, shard_count=1)
  it = iter(ds)
  t = time.perf_counter()
  for _ in range(max(2, 2 * workers)):      # starts the workers and fills the buffers
    next(it)
  warmup = time.perf_counter() - t
  rates = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(batches):
      batch = next(it)
    rates.append(batches / (time.perf_counter() - t))
  assert batch["volume"].shape == (1, size, size, size, 1)
  del it
  return {"bench": "data", "size": size, "workers": workers, "batch": 1,
          "warmup_s": round(warmup, 2), "volumes_per_s": round(statistics.median(rates), 2),
          "mb_per_s": round(statistics.median(rates) * size ** 3 * 4 / 2 ** 20, 1)}


def run(sizes: Sequence[int], workers: Sequence[int], num_records: int, batches: int,
        repeats: int) -> list[dict]:
  """One row per (size, workers), the records written once per size into a temporary folder."""
  rows = []
  with tempfile.TemporaryDirectory(prefix="cf3d-data-bench-") as tmp:
    for size in sizes:
      folder = os.path.join(tmp, f"records-{size}")
      index = write_synthetic_records(folder, size, num_records)
      for w in workers:
        rows.append(measure_loader(folder, index, size, w, batches, repeats))
        print(f"data: {rows[-1]}", flush=True)
  return rows


def bench_data(config, repeats: int) -> list[dict]:
  """`benchmark.BENCHES['data']`: the loader at the flag-given sizes and worker counts."""
  del config  # the bench makes its own data; the config's dataset is not needed
  return run([int(s) for s in _SIZES.value], [int(w) for w in _WORKERS.value], _RECORDS.value,
             _BATCHES.value, repeats)

"""The benchmark module: the CLI writes its table and JSON; each benchmark's rows in-process on
the WDM and latent smoke configs (no timing is asserted, only that the numbers exist)."""

import functools
import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, load_config
from cf3d_jax.models import layers

CONFIGS = ("demo.py", "demo_latent.py")
PEAK = 1e12   # a made-up peak, so the of_peak column is filled on CPU


def test_benchmark_writes_table_and_json(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run(
      [sys.executable, "-m", "cf3d_jax.benchmark", "--config=configs/demo.py:smoke",
       "--what=train,conv,wavelets", "--repeats=1", "--conv_impls=xla,planes",
       f"--output={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[train]" in proc.stdout and "[conv]" in proc.stdout and "[wavelets]" in proc.stdout
  result = json.loads(out.read_text())
  assert {"device", "platform", "cpu", "jax", "rows"} <= set(result)
  train = [r for r in result["rows"] if r["bench"] == "train"]
  # --conv_impls picks the formulations timed (im2col, the slowest to compile, is left out here;
  # test_conv_rows_follow_the_space times all three).
  assert [r["conv_impl"] for r in train] == ["xla", "planes"]
  assert all(r["ms_per_step"] > 0 and r["voxels_per_s"] > 0 for r in train)
  for row in train:     # the WDM smoke config's train rows (the latent one runs in-process)
    check_train_row(row, load_config("demo.py"), peak=None)
  (wavelet_row,) = [r for r in result["rows"] if r["bench"] == "wavelets"]
  check_wavelet_row(wavelet_row, load_config("demo.py"))
  conv = [r for r in result["rows"] if r["bench"] == "conv"]
  assert [r["level"] for r in conv] == [0, 1, 2]
  assert all(r["jax_planes_ms"] > 0 and r["torch_ms"] > 0 for r in conv)


def test_importing_defines_no_flags():
  """Other tests import cf3d_jax.main (which defines --config): the benchmark's flags exist
  only when it runs as a program."""
  from absl import flags
  import cf3d_jax.benchmark  # noqa: F401
  assert not {"what", "repeats", "conv_impls", "peak_flops"} & set(flags.FLAGS)


@functools.lru_cache(maxsize=None)
def bench_rows(name: str, bench: str) -> tuple:
  """The rows of `bench` on configs/NAME:smoke with repeats=1 (computed once per module)."""
  from cf3d_jax import benchmark
  config = load_config(name)
  if bench == "train":
    return tuple(benchmark.bench_train(config, 1, [config.model.conv_impl], peak_flops=PEAK))
  return tuple(getattr(benchmark, f"bench_{bench}")(config, 1))


def _positive(row: dict, keys) -> None:
  for k in keys:
    v = row[k]
    assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, (k, v)


TRAIN_NUMBERS = ("compile_s", "first_step_ms", "ms_per_step", "voxels_per_s", "flops_per_step",
                 "flops_per_s", "peak_memory_mib")


def check_train_row(row: dict, config, peak: float | None) -> None:
  assert row["space"] == config.space.name and row["dtype"] == config.model.dtype
  assert row["batch"] == config.train.batch_size and row["shape"] == list(config.data.shape)
  _positive(row, TRAIN_NUMBERS)
  assert row["flops_per_s"] == pytest.approx(row["flops_per_step"] / (row["ms_per_step"] / 1e3),
                                             rel=2e-3)
  if peak is None and jax.default_backend() == "cpu":   # no known peak: the columns are empty
    assert row["peak_flops_per_s"] is None and row["of_peak"] is None
  elif peak is not None:
    assert row["peak_flops_per_s"] == peak
    assert row["of_peak"] == pytest.approx(row["flops_per_s"] / peak, rel=2e-3)


def test_train_row_latent_space():
  """The latent space trains on unscaled latents (`space.record_shape`), not images."""
  config = load_config("demo_latent.py")
  (row,) = bench_rows("demo_latent.py", "train")
  assert row["conv_impl"] == layers.resolve_conv_impl(config.model.conv_impl) == "planes"
  check_train_row(row, config, peak=PEAK)


def test_train_flops_equal_an_independent_compile():
  """flops_per_step is XLA's cost analysis of the step the trainer compiles: here lowered
  independently on abstract inputs shaped by the latent space's record shape."""
  from cf3d_jax import train
  from cf3d_jax.data.prepare import table_source
  from cf3d_jax.text.table import load_table
  config = load_config("demo_latent.py")
  (row,) = bench_rows("demo_latent.py", "train")
  model, objective, space = train.build_components(config)
  tx = train.make_optimizer(config.train)
  b, shape = config.train.batch_size, tuple(config.data.shape)
  length, width = load_table(table_source(config)).embeddings.shape[1:]
  state = jax.eval_shape(lambda k: train.init_state(model, tx, k, (b,) + space.latent_shape(shape),
                                                    (length, width)), jax.random.key(0))
  batch = {"volume": jax.ShapeDtypeStruct((b,) + space.record_shape(shape), np.float32),
           "text_emb": jax.ShapeDtypeStruct((b, length, width), np.float32),
           "text_mask": jax.ShapeDtypeStruct((b, length), np.bool_)}
  key = jax.eval_shape(lambda: jax.random.key(1))
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, objective=objective,
                                   space=space, ema_decay=config.train.ema_decay),
                 donate_argnums=0)
  cost = step.lower(state, batch, key).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert row["flops_per_step"] == pytest.approx(cost["flops"], rel=1e-9)


def test_peak_flops_table():
  from cf3d_jax.benchmark import peak_flops_for
  assert peak_flops_for("cpu", "float32") is None
  assert peak_flops_for("cpu", "float32", override=2e11) == 2e11
  assert peak_flops_for("NVIDIA H100 80GB HBM3", "bfloat16") == 989.5e12
  assert peak_flops_for("NVIDIA H100 PCIe", "bfloat16") == 756e12
  assert peak_flops_for("TPU v5 lite", "bfloat16") == 197e12
  assert peak_flops_for("TPU v5p", "float32") == 459e12


@pytest.mark.parametrize("name", CONFIGS)
def test_sample_rows(name):
  config = load_config(name)
  (row,) = bench_rows(name, "sample")
  assert row["space"] == config.space.name and row["objective"] == config.objective.name
  assert row["batch"] == 2 and row["guidance_scale"] != 1.0
  assert row["steps"] == config.objective.num_sample_steps
  assert ("VAE" in row["decode"] and "random" in row["decode"]) == (name == "demo_latent.py")
  _positive(row, ("steps", "compile_s", "first_call_s", "s_per_pair", "ms_per_step"))


def check_wavelet_row(row: dict, config) -> None:
  b, shape = config.train.batch_size, tuple(config.data.shape)
  # float32 image batch read, and its 8-subband transform (as many values) written.
  assert row["bytes"] == 2 * b * int(np.prod(shape)) * 4
  for op in ("dwt", "idwt", "copy"):
    _positive(row, (f"{op}_ms", f"{op}_gb_per_s"))
    assert row[f"{op}_gb_per_s"] == pytest.approx(row["bytes"] / (row[f"{op}_ms"] * 1e6), rel=2e-3)
  for op in ("dwt", "idwt"):
    _positive(row, (f"{op}_of_copy",))
    assert row[f"{op}_of_copy"] == pytest.approx(row[f"{op}_gb_per_s"] / row["copy_gb_per_s"],
                                                 rel=2e-3)


@pytest.mark.parametrize("name", CONFIGS)
def test_wavelet_rows(name):
  (row,) = bench_rows(name, "wavelets")
  check_wavelet_row(row, load_config(name))


@pytest.mark.parametrize("name", CONFIGS)
def test_conv_rows_follow_the_space(name):
  from cf3d_jax.spaces import make_space
  config = load_config(name)
  rows = bench_rows(name, "conv")
  top = make_space(config.space).latent_shape(tuple(config.data.shape))[:3]
  assert [r["level"] for r in rows] == list(range(len(config.model.channel_mult)))
  for r, mult in zip(rows, config.model.channel_mult):
    assert r["size"] == [s // 2 ** r["level"] for s in top]
    assert r["channels"] == config.model.base_channels * mult
    _positive(r, [f"jax_{impl}_ms" for impl in layers.CONV_IMPLS])


def test_conv_impl_override_leaves_the_config_unchanged():
  """bench_train times each conv formulation on a copy: the caller's config is never mutated."""
  from cf3d_jax import benchmark
  config = load_config("demo.py")
  config.lock()
  before = config.to_json()
  other = next(i for i in ("xla", "im2col") if i != config.model.conv_impl)
  copy = benchmark.with_conv_impl(config, other)
  assert copy.model.conv_impl == other and config.to_json() == before

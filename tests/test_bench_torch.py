"""`--what=vs_torch` (cf3d_jax.bench_torch): the rows at a tiny size, the two sides compute the
same network (forward and Haar DWT), and the error without torch."""

from __future__ import annotations

import importlib.util
import math
import sys

import jax
import numpy as np
import pytest

from conftest import load_config
from cf3d_jax import bench_torch, benchmark
from cf3d_jax.convert import wdm_unet

needs_torch = pytest.mark.skipif(importlib.util.find_spec('torch') is None,
                                 reason='torch is test-only')
# wdm-3d's architecture shrunk: 3 levels of 1 ResBlock at base 8 (4 groups), 16³ images → 8³ × 8
# grids.
ARCH = dict(bench_torch.vs_torch_arch(8), channel_mult=(1, 2, 2), num_res_blocks=1, num_groups=4)
COLUMNS = ['size', 'grid', 'base', 'params_jax', 'params_torch', 'jax_ms', 'torch_ms',
           'torch_channels_last_ms', 'ratio', 'conv_impl', 'threads', 'torch_device', 'torch',
           'omp_wait_policy', 'note']


def _assert_rel(actual, desired, rel: float = 1e-4):
  actual, desired = np.asarray(actual), np.asarray(desired)
  assert actual.shape == desired.shape
  err, scale = np.max(np.abs(actual - desired)), np.max(np.abs(desired))
  assert err <= rel * scale, (err, scale)


@needs_torch
def test_vs_torch_rows(monkeypatch):
  monkeypatch.setenv('OMP_WAIT_POLICY', 'PASSIVE')   # what the bench would set, restored after
  free = iter([None, 1])     # memory: unknown for the first size, 1 byte for the second
  monkeypatch.setattr(bench_torch, 'available_bytes', lambda: next(free))
  config = load_config('demo.py')
  row, skipped = bench_torch.bench_vs_torch(config, 1, sizes=(16, 16), arch=ARCH)
  assert list(skipped) == list(row) and skipped['params_jax'] == row['params_jax']
  assert skipped['note'].startswith('skipped: needs ~') and 'GiB available' in skipped['note']
  assert skipped['jax_ms'] is skipped['torch_ms'] is skipped['ratio'] is None
  assert row['bench'] == 'vs_torch' and list(row)[1:] == COLUMNS
  assert (row['size'], row['grid'], row['base'], row['note']) == (16, 8, 8, '')
  torch_model = bench_torch.torch_unet(ARCH)
  assert row['params_jax'] == row['params_torch'] == sum(
      p.numel() for p in torch_model.parameters())
  for key in ('jax_ms', 'torch_ms', 'torch_channels_last_ms', 'ratio'):
    assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, key
  assert row['ratio'] == pytest.approx(
      row['jax_ms'] / min(row['torch_ms'], row['torch_channels_last_ms']), rel=1e-2)
  assert row['conv_impl'] == 'planes' and row['threads'] == bench_torch.jax_threads() >= 1
  assert row['torch_device'] == 'cpu' and row['omp_wait_policy'] == 'PASSIVE'


@needs_torch
def test_jax_and_torch_compute_the_same_network():
  """The benchmark's two models, the torch weights converted into ours: the same output to
  1e-4 relative with the conv formulation the benchmark times; the torch step's Haar DWT is
  `cf3d_jax.wavelets.haar_dwt3d`."""
  import torch
  from cf3d_jax import wavelets
  from cf3d_jax.models import layers
  torch.manual_seed(0)
  reference = bench_torch.randomised(bench_torch.torch_unet(ARCH))
  params = wdm_unet.convert_wdm_unet_state_dict(reference.state_dict(), ARCH)
  impl = layers.resolve_conv_impl(load_config('demo.py').model.conv_impl)
  model = bench_torch.jax_unet(ARCH, impl)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 8, 8)).astype(np.float32)
  t = np.array([3, 917], np.int64)
  out = jax.jit(lambda p, x, t: model.apply({'params': p}, x, t))(params, x, t)
  with torch.no_grad():
    expected = reference(torch.from_numpy(x.transpose(0, 4, 1, 2, 3)), torch.from_numpy(t))
  expected = expected.numpy().transpose(0, 2, 3, 4, 1)
  assert float(np.std(expected)) > 1e-2
  _assert_rel(out, expected)

  image = rng.uniform(-1, 1, (1, 1, 8, 8, 8)).astype(np.float32)
  dwt = torch.nn.functional.conv3d(torch.from_numpy(image),
                                   torch.from_numpy(bench_torch.torch_haar_kernel()), stride=2)
  _assert_rel(dwt.numpy().transpose(0, 2, 3, 4, 1),
              wavelets.haar_dwt3d(image.transpose(0, 2, 3, 4, 1)), rel=1e-6)


def test_without_torch_is_a_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)   # `import torch` raises ImportError
  bench_torch.wdm3d_modules.cache_clear()
  try:
    for call in (lambda: benchmark.BENCHES['vs_torch'](load_config('demo.py'), 1, (16,)),
                 lambda: bench_torch.torch_unet(ARCH)):
      with pytest.raises(ImportError, match=r'need PyTorch .*install the test extras: '
                                            r'`pip install -c constraints\.txt torch==2\.13\.0`'):
        call()
  finally:
    bench_torch.wdm3d_modules.cache_clear()


def test_sizes_must_fit_the_levels():
  pytest.importorskip('torch')
  from cf3d_jax.errors import ConfigError
  with pytest.raises(ConfigError, match=r'vs_torch_sizes \[24\]: .* multiple of 32'):
    bench_torch.bench_vs_torch(load_config('demo.py'), 1, sizes=(32, 24))

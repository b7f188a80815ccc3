"""PSNR, SSIM and MS-SSIM of cf3d_jax.metrics.image against MONAI and float64 NumPy."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from cf3d_jax.errors import ConfigError
from cf3d_jax.metrics import image

TOL = 1e-4


@pytest.fixture(scope='module')
def monai_metrics():
  """`monai.metrics`, the oracle (test-only dependency with torch)."""
  pytest.importorskip('torch')
  return pytest.importorskip('monai.metrics')


def _pair(shape: tuple[int, ...], seed: int, low: float = 0.0, high: float = 1.0,
          noise: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
  """Two related float32 volumes `[N, D, H, W, C]` in [low, high]: smooth structure + noise.

  Smooth structure keeps every scale of MS-SSIM away from 0 and 1, so the tests compare
  non-trivial values.
  """
  rng = np.random.default_rng(seed)
  base = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=(0, 2, 2, 2, 0))
  base = (base - base.min()) / (base.max() - base.min())
  a = base + noise * rng.standard_normal(shape)
  b = base + noise * rng.standard_normal(shape)
  scale = lambda x: (low + (high - low) * np.clip(x, 0, 1)).astype(np.float32)
  return scale(a), scale(b)


def _torch(x: np.ndarray):
  """`[N, D, H, W, C]` NumPy → torch `[N, C, D, H, W]` (MONAI's layout)."""
  import torch
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def _monai(metric, a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """MONAI metric values per item `[N]` (reduction 'none')."""
  return metric(_torch(a), _torch(b)).numpy().reshape(a.shape[0], -1).mean(axis=1)


# --- PSNR -----------------------------------------------------------------------------------

@pytest.mark.parametrize('data_range,low,high', [(1.0, 0.0, 1.0), (2.0, -1.0, 1.0)])
def test_psnr_matches_float64_numpy_and_monai(data_range, low, high, monai_metrics):
  a, b = _pair((3, 12, 10, 8, 2), seed=0, low=low, high=high)
  got = np.asarray(image.psnr(a, b, data_range))
  assert got.shape == (3,)
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3, 4))
  want = 10 * np.log10(data_range ** 2 / mse)
  np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
  ref = _monai(monai_metrics.PSNRMetric(max_val=data_range, reduction='none'), a, b)
  np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)


def test_psnr_identical_items_are_infinite():
  a, b = _pair((2, 8, 8, 8, 1), seed=1)
  b[1] = a[1]
  got = np.asarray(image.psnr(a, b, 1.0))
  assert np.isfinite(got[0]) and got[1] == np.inf


# --- SSIM -----------------------------------------------------------------------------------

@pytest.mark.parametrize('shape,data_range,low,kwargs', [
    ((2, 32, 28, 24, 1), 1.0, 0.0, {}),
    ((1, 20, 20, 20, 2), 2.0, -1.0, {}),
    ((2, 16, 16, 16, 1), 1.0, 0.0, dict(kernel_size=(5, 7, 3), kernel_sigma=(1.0, 1.5, 0.8))),
    ((2, 16, 16, 16, 1), 1.0, 0.0, dict(kernel_size=5, kernel_type='uniform')),
], ids=['default', 'two_channels_range2', 'anisotropic_window', 'uniform'])
def test_ssim_matches_monai(shape, data_range, low, kwargs, monai_metrics):
  a, b = _pair(shape, seed=2, low=low, high=low + data_range)
  got = np.asarray(image.ssim_3d(a, b, data_range, **kwargs))
  assert got.shape == (shape[0],)
  monai_kwargs = dict(kwargs)
  if 'kernel_size' in monai_kwargs:
    monai_kwargs['win_size'] = monai_kwargs.pop('kernel_size')
  metric = monai_metrics.SSIMMetric(spatial_dims=3, data_range=data_range, reduction='none',
                                    **monai_kwargs)
  want = _monai(metric, a, b)
  assert np.all((want > 0.05) & (want < 0.95)), want  # a non-trivial comparison
  np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_ssim_of_identical_volumes_is_one_and_symmetric():
  a, b = _pair((2, 16, 16, 16, 1), seed=3)
  np.testing.assert_allclose(np.asarray(image.ssim_3d(a, a, 1.0)), 1.0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(image.ms_ssim_3d(a, a, 1.0, kernel_size=1)), 1.0,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(image.ssim_3d(a, b, 1.0)),
                             np.asarray(image.ssim_3d(b, a, 1.0)), atol=1e-6)
  assert np.all(np.asarray(image.ssim_3d(a, b, 1.0)) < 0.99)


# --- MS-SSIM --------------------------------------------------------------------------------

@pytest.mark.parametrize('shape,data_range,low,kwargs', [
    ((2, 48, 48, 48, 1), 1.0, 0.0, dict(kernel_size=3)),
    ((1, 48, 56, 51, 2), 2.0, -1.0, dict(kernel_size=3)),  # odd size: pooling drops a voxel
    ((1, 80, 80, 80, 1), 1.0, 0.0, dict(kernel_size=5)),
    ((2, 24, 24, 24, 1), 1.0, 0.0, dict(kernel_size=5, weights=(0.2, 0.3, 0.5))),
], ids=['48_k3', 'non_cubic_range2', '80_k5', 'three_scales'])
def test_ms_ssim_matches_monai(shape, data_range, low, kwargs, monai_metrics):
  a, b = _pair(shape, seed=4, low=low, high=low + data_range)
  got = np.asarray(image.ms_ssim_3d(a, b, data_range, **kwargs))
  assert got.shape == (shape[0],)
  metric = monai_metrics.MultiScaleSSIMMetric(spatial_dims=3, data_range=data_range,
                                              reduction='none', **kwargs)
  want = _monai(metric, a, b)
  assert np.all((want > 0.05) & (want < 0.98)), want
  np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


@pytest.mark.parametrize('kernel_size', [3, 5, 11])
def test_ms_ssim_minimum_size_agrees_with_monai(kernel_size, monai_metrics):
  need = image.ms_ssim_min_size(kernel_size)
  assert need == 16 * kernel_size
  small = np.zeros((1, need - 1, need, need, 1), np.float32)
  with pytest.raises(image.MetricInputError, match=f'at least {need}'):
    image.ms_ssim_3d(small, small, 1.0, kernel_size=kernel_size)
  with pytest.raises(ValueError):  # MONAI refuses the same size
    _monai(monai_metrics.MultiScaleSSIMMetric(spatial_dims=3, kernel_size=kernel_size), small,
           small)
  if kernel_size <= 3:  # the boundary itself works in both (cheap only for small windows)
    a, b = _pair((1, need, need, need, 1), seed=5)
    got = np.asarray(image.ms_ssim_3d(a, b, 1.0, kernel_size=kernel_size))
    want = _monai(monai_metrics.MultiScaleSSIMMetric(spatial_dims=3, kernel_size=kernel_size,
                                                     reduction='none'), a, b)
    np.testing.assert_allclose(got, want, atol=TOL)


def test_metrics_jit_with_traced_data_range():
  a, b = _pair((2, 48, 48, 48, 1), seed=6, low=-1.0, high=1.0)
  for fn, kw in [(image.psnr, {}), (image.ssim_3d, dict(kernel_size=7)),
                 (image.ms_ssim_3d, dict(kernel_size=3))]:
    eager = np.asarray(fn(a, b, 2.0, **kw))
    jitted = jax.jit(lambda x, y, r, fn=fn, kw=kw: fn(x, y, r, **kw))
    np.testing.assert_allclose(np.asarray(jitted(jnp.asarray(a), jnp.asarray(b), 2.0)), eager,
                               rtol=1e-6)
    # data_range is an argument, not a constant: a different range changes the value.
    assert not np.allclose(np.asarray(jitted(a, b, 1.0)), eager)


# --- diversity ------------------------------------------------------------------------------

def test_pairwise_diversity_equals_mean_over_ordered_pairs_with_monai(monai_metrics):
  a, b = _pair((2, 48, 48, 48, 1), seed=7, noise=0.3)
  volumes = np.concatenate([a, b[:1], a[:1] * 0.8], axis=0)  # 4 volumes, 6 pairs
  got = image.pairwise_ms_ssim_diversity(volumes, 1.0, batch_size=4, kernel_size=3)
  metric = monai_metrics.MultiScaleSSIMMetric(spatial_dims=3, kernel_size=3, reduction='none')
  ordered = [_monai(metric, volumes[i:i + 1], volumes[j:j + 1])[0]
             for i, j in itertools.permutations(range(4), 2)]  # wdm-3d's loop: all i != j
  assert len(ordered) == 12
  assert abs(got - np.mean(ordered)) < TOL
  # batch size and padding of the last batch do not change the result
  assert abs(image.pairwise_ms_ssim_diversity(volumes, 1.0, batch_size=5, kernel_size=3)
             - got) < 1e-6


def test_pairwise_diversity_subsampled_pairs():
  a, b = _pair((3, 16, 16, 16, 1), seed=8, noise=0.3)
  volumes = jnp.asarray(np.concatenate([a, b], axis=0))  # 6 volumes, 15 pairs
  kw = dict(kernel_size=3, weights=(0.5, 0.5))
  i, j = image.sample_pairs(6, max_pairs=4, seed=3)
  assert i.size == 4 and np.all(i < j)
  assert len(set(zip(i.tolist(), j.tolist()))) == 4
  got = image.pairwise_ms_ssim_diversity(volumes, 1.0, batch_size=3, max_pairs=4, seed=3, **kw)
  want = np.mean([float(image.ms_ssim_3d(volumes[p:p + 1], volumes[q:q + 1], 1.0, **kw)[0])
                  for p, q in zip(i, j)])
  assert abs(got - want) < 1e-6
  all_i, _ = image.sample_pairs(6)
  assert all_i.size == 15
  assert image.sample_pairs(6, max_pairs=100)[0].size == 15


# --- errors ---------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
  vol = np.zeros((1, 16, 16, 16, 1), np.float32)
  with pytest.raises(image.MetricInputError, match=r'\[N, D, H, W, C\]'):
    image.psnr(vol[0], vol[0], 1.0)
  with pytest.raises(ValueError, match='same shape'):
    image.ssim_3d(vol, np.zeros((1, 16, 16, 8, 1), np.float32), 1.0)
  with pytest.raises(ConfigError, match='smaller than the window'):
    image.ssim_3d(vol[:, :8], vol[:, :8], 1.0)
  with pytest.raises(image.MetricInputError, match='kernel_type'):
    image.ssim_3d(vol, vol, 1.0, kernel_type='box')
  with pytest.raises(image.MetricInputError, match='kernel_size'):
    image.ssim_3d(vol, vol, 1.0, kernel_size=(3, 3))
  with pytest.raises(image.MetricInputError, match='at least 2 volumes'):
    image.pairwise_ms_ssim_diversity(vol, 1.0, kernel_size=1)
  with pytest.raises(image.MetricInputError, match='at least 176'):
    image.pairwise_ms_ssim_diversity(np.zeros((2, 64, 64, 64, 1), np.float32), 1.0)

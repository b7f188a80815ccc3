"""Image similarity of 3D volumes: PSNR, SSIM and MS-SSIM (jnp, batched, jit-able).

All functions take two volumes `a`, `b` of shape `[N, D, H, W, C]` (channels-last) and return
one value per item, `[N]` float32. They are symmetric in `a` and `b`. Inputs are cast to
float32. Keyword settings (window, weights) are Python values, static under `jax.jit`;
`data_range` may be a traced scalar. Intensities in [-1, 1] have `data_range=2.0`.

The numbers equal MONAI's (`monai.metrics.PSNRMetric`, `SSIMMetric(spatial_dims=3)`,
`MultiScaleSSIMMetric(spatial_dims=3)`, monai 1.6, `reduction='none'`), to float32 rounding:

  PSNR     `20·log10(data_range) − 10·log10(mse)`, mse over all voxels and channels of an item
           (identical items give +inf).
  SSIM     local statistics under a normalised window (Gaussian: size 11, sigma 1.5, the outer
           product of three 1D Gaussians `exp(−x²/2σ²)` at offsets `x = −(k−1)/2 … (k−1)/2`;
           or uniform), applied per channel with NO padding ("valid": a `D − k + 1` grid);
           `σ` from `E[x²] − E[x]²`; `c1 = (k1·data_range)²`, `c2 = (k2·data_range)²`;
           the SSIM map is averaged over the valid grid AND the channels of an item.
  MS-SSIM  with `S = len(weights)` scales (default 5, weights 0.0448, 0.2856, 0.3001, 0.2363,
           0.1333): at scales 0 … S−2 the contrast-structure term `cs` (averaged over grid and
           channels, then clamped at 0), at the coarsest scale the full SSIM (averaged, clamped
           at 0); `MS-SSIM = Π cs_s^w_s · ssim_{S−1}^w_{S−1}`. Between scales both volumes are
           average-pooled by 2 on every spatial axis (window 2, stride 2, an odd trailing voxel
           dropped, as torch's `avg_pool3d(kernel_size=2)`), so scale s has `⌊D / 2^s⌋` voxels.
           The window must fit the coarsest scale: every spatial size must be at least
           `2^(S−1) · kernel_size` (176 for the default 11 and 5 scales; 112 for kernel 7, 80
           for 5, 48 for 3), else `MetricInputError` names the minimum. Use a smaller
           `kernel_size` for small volumes (wdm-3d evaluates 128³ volumes with kernel 7).
           MONAI's own check uses `(S−1)²` in place of `2^(S−1)`; the two agree for 3 and 5
           scales.

The window is applied as three 1D passes (it is separable), which equals MONAI's 3D
convolution to float rounding at a fraction of the cost.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cf3d_jax.errors import ConfigError

__all__ = ['MS_SSIM_WEIGHTS', 'KERNEL_TYPES', 'MetricInputError', 'psnr', 'ssim_3d',
           'ms_ssim_3d', 'ms_ssim_min_size', 'sample_pairs', 'pairwise_ms_ssim_diversity']

Array = Any  # jax.Array or numpy.ndarray

MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
KERNEL_TYPES = ('gaussian', 'uniform')


class MetricInputError(ConfigError, ValueError):
  """Inputs or settings a metric cannot use (a `ConfigError` and a `ValueError`)."""


def _check_pair(a: Array, b: Array, fn: str) -> None:
  """Raises `MetricInputError` unless `a` and `b` are both `[N, D, H, W, C]` of one shape."""
  if np.ndim(a) != 5 or np.ndim(b) != 5:
    raise MetricInputError(f'{fn}: inputs must be volumes [N, D, H, W, C], got shapes '
                           f'{tuple(np.shape(a))} and {tuple(np.shape(b))}.')
  if tuple(np.shape(a)) != tuple(np.shape(b)):
    raise MetricInputError(f'{fn}: inputs must have the same shape, got {tuple(np.shape(a))} '
                           f'and {tuple(np.shape(b))}.')


def _triple(value: Any, name: str, fn: str, kind: type) -> tuple:
  """`value` (a scalar or a sequence of 3) as a 3-tuple, one entry per spatial axis D, H, W."""
  values = tuple(value) if isinstance(value, Sequence) else (value,) * 3
  if len(values) != 3:
    raise MetricInputError(f'{fn}: {name} must be a number or 3 numbers (D, H, W), got {value!r}.')
  if kind is int and not all(isinstance(v, (int, np.integer)) and v > 0 for v in values):
    raise MetricInputError(f'{fn}: {name} must be positive integers, got {value!r}.')
  if kind is float and not all(float(v) > 0 for v in values):
    raise MetricInputError(f'{fn}: {name} must be positive, got {value!r}.')
  return tuple(kind(v) for v in values)


def _window_spec(kernel_size: Any, kernel_sigma: Any, kernel_type: str, fn: str) -> tuple:
  """Validated, hashable window settings `(sizes, sigmas, kernel_type)`, one entry per axis."""
  sizes = _triple(kernel_size, 'kernel_size', fn, int)
  sigmas = _triple(kernel_sigma, 'kernel_sigma', fn, float)
  if kernel_type not in KERNEL_TYPES:
    raise MetricInputError(f'{fn}: kernel_type={kernel_type!r}, expected one of {KERNEL_TYPES}.')
  return sizes, sigmas, kernel_type


def _windows(spec: tuple) -> tuple[np.ndarray, ...]:
  """The three normalised 1D windows (float32, for D, H, W) whose outer product is MONAI's."""
  sizes, sigmas, kernel_type = spec
  windows = []
  for k, sigma in zip(sizes, sigmas):
    if kernel_type == 'uniform':
      w = np.full(k, 1.0 / k, np.float32)
    else:
      x = np.arange((1 - k) / 2, (1 + k) / 2, 1.0, dtype=np.float32)[:k]
      w = np.exp(-np.square(x / np.float32(sigma)) / 2).astype(np.float32)
      w = w / w.sum()
    windows.append(w)
  return tuple(windows)


def _filter_valid(x: Array, windows: tuple[np.ndarray, ...]) -> Array:
  """Separable correlation with no padding: `[M, D, H, W, C] → [M, D−kd+1, H−kh+1, W−kw+1, C]`."""
  for axis, w in zip((1, 2, 3), windows):
    n = x.shape[axis] - w.shape[0] + 1
    x = sum(float(w[i]) * jax.lax.slice_in_dim(x, i, i + n, axis=axis)
            for i in range(w.shape[0]))
  return x


def _ssim_cs_maps(a: Array, b: Array, data_range: Array, windows: tuple[np.ndarray, ...],
                  k1: float, k2: float) -> tuple[Array, Array]:
  """SSIM and contrast-structure maps on the valid grid, each `[N, D', H', W', C]`."""
  n = a.shape[0]
  stats = _filter_valid(jnp.concatenate([a, b, a * a, b * b, a * b], axis=0), windows)
  mu_a, mu_b, mu_aa, mu_bb, mu_ab = (stats[i * n:(i + 1) * n] for i in range(5))
  c1 = jnp.square(k1 * data_range)
  c2 = jnp.square(k2 * data_range)
  var_a = mu_aa - mu_a * mu_a
  var_b = mu_bb - mu_b * mu_b
  cov = mu_ab - mu_a * mu_b
  cs = (2 * cov + c2) / (var_a + var_b + c2)
  ssim = (2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1) * cs
  return ssim, cs


def _item_mean(x: Array) -> Array:
  """`[N, ...] → [N]`: mean over everything but the batch axis."""
  return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def _avg_pool_2x_floor(x: Array) -> Array:
  """`[N, D, H, W, C] → [N, ⌊D/2⌋, ⌊H/2⌋, ⌊W/2⌋, C]`, mean of 2×2×2 blocks (odd voxel dropped)."""
  n, d, h, w, c = x.shape
  x = x[:, :d // 2 * 2, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(n, d // 2, 2, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4, 6))


def psnr(a: Array, b: Array, data_range: float | Array) -> Array:
  """Peak signal-to-noise ratio in dB, `[N, D, H, W, C]` × 2 → `[N]` float32.

  `20·log10(data_range) − 10·log10(mse)` with mse over all voxels and channels of an item
  (MONAI's `PSNRMetric(max_val=data_range)`); +inf where the items are identical.
  """
  _check_pair(a, b, 'psnr')
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  mse = _item_mean(jnp.square(a - b))
  return 20.0 * jnp.log10(jnp.asarray(data_range, jnp.float32)) - 10.0 * jnp.log10(mse)


def ssim_3d(a: Array, b: Array, data_range: float | Array, *,
            kernel_size: int | Sequence[int] = 11,
            kernel_sigma: float | Sequence[float] = 1.5, k1: float = 0.01, k2: float = 0.03,
            kernel_type: str = 'gaussian') -> Array:
  """Structural similarity, `[N, D, H, W, C]` × 2 → `[N]` float32 (MONAI's `SSIMMetric`).

  Valid (unpadded) window of `kernel_size` (int or per-axis D, H, W) with `kernel_sigma`;
  the SSIM map is averaged over the valid grid and the channels. Every spatial size must be
  at least `kernel_size`. Identical inputs give exactly 1 up to rounding.
  """
  _check_pair(a, b, 'ssim_3d')
  spec = _window_spec(kernel_size, kernel_sigma, kernel_type, 'ssim_3d')
  spatial = tuple(np.shape(a)[1:4])
  if any(s < k for s, k in zip(spatial, spec[0])):
    raise MetricInputError(f'ssim_3d: spatial size {spatial} is smaller than the window '
                           f'{spec[0]}; use a smaller kernel_size.')
  return _ssim_impl(a, b, data_range, spec, float(k1), float(k2))


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _ssim_impl(a: Array, b: Array, data_range: Array, spec: tuple, k1: float,
               k2: float) -> Array:
  """`ssim_3d` after validation (one compiled program per shape and setting)."""
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  ssim, _ = _ssim_cs_maps(a, b, jnp.asarray(data_range, jnp.float32), _windows(spec), k1, k2)
  return _item_mean(ssim)


def ms_ssim_min_size(kernel_size: int, num_scales: int = len(MS_SSIM_WEIGHTS)) -> int:
  """Smallest spatial size MS-SSIM accepts: `2^(num_scales − 1) · kernel_size`."""
  return 2 ** (num_scales - 1) * kernel_size


def ms_ssim_3d(a: Array, b: Array, data_range: float | Array, *,
               kernel_size: int | Sequence[int] = 11,
               kernel_sigma: float | Sequence[float] = 1.5, k1: float = 0.01, k2: float = 0.03,
               weights: Sequence[float] = MS_SSIM_WEIGHTS,
               kernel_type: str = 'gaussian') -> Array:
  """Multi-scale SSIM, `[N, D, H, W, C]` × 2 → `[N]` float32 (MONAI's `MultiScaleSSIMMetric`).

  `len(weights)` scales; between scales, 2×2×2 average pooling with stride 2 (odd trailing
  voxels dropped), so scale s sees `⌊size / 2^s⌋` voxels per axis. Each spatial size must be
  at least `ms_ssim_min_size(kernel_size, len(weights))` (176 for the defaults), else
  `MetricInputError`; pass a smaller `kernel_size` (e.g. 7, 5 or 3) for smaller volumes.
  """
  _check_pair(a, b, 'ms_ssim_3d')
  spec = _window_spec(kernel_size, kernel_sigma, kernel_type, 'ms_ssim_3d')
  weights = tuple(float(w) for w in weights)
  if not weights:
    raise MetricInputError('ms_ssim_3d: weights must hold at least one scale weight.')
  spatial = tuple(np.shape(a)[1:4])
  for axis, (s, k) in enumerate(zip(spatial, spec[0])):
    need = ms_ssim_min_size(k, len(weights))
    if s < need:
      raise MetricInputError(
          f'ms_ssim_3d: spatial size {spatial} is too small for {len(weights)} scales with '
          f'kernel_size {k} on axis {"DHW"[axis]}: each side must be at least {need} '
          f'(= 2^{len(weights) - 1} · {k}); use a smaller kernel_size.')
  return _ms_ssim_impl(a, b, data_range, spec, float(k1), float(k2), weights)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _ms_ssim_impl(a: Array, b: Array, data_range: Array, spec: tuple, k1: float, k2: float,
                  weights: tuple[float, ...]) -> Array:
  """`ms_ssim_3d` after validation (one compiled program per shape and setting)."""
  windows = _windows(spec)
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  data_range = jnp.asarray(data_range, jnp.float32)
  factors = []
  for s in range(len(weights)):
    if s:
      a, b = _avg_pool_2x_floor(a), _avg_pool_2x_floor(b)
    ssim, cs = _ssim_cs_maps(a, b, data_range, windows, k1, k2)
    term = ssim if s == len(weights) - 1 else cs
    factors.append(jax.nn.relu(_item_mean(term)) ** weights[s])
  return jnp.prod(jnp.stack(factors), axis=0)


def sample_pairs(num_volumes: int, max_pairs: int | None = None,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Index pairs `(i, j)`, `i < j`, for the diversity metric: all of them, or `max_pairs`.

  All `n(n−1)/2` pairs in row-major order; with `max_pairs` below that, a sample of
  `max_pairs` distinct pairs drawn with `numpy.random.default_rng(seed)` (sorted).
  """
  if num_volumes < 2:
    raise MetricInputError(f'MS-SSIM diversity needs at least 2 volumes, got {num_volumes}.')
  i, j = np.triu_indices(num_volumes, k=1)
  if max_pairs is not None:
    if max_pairs < 1:
      raise MetricInputError(f'max_pairs must be positive or None, got {max_pairs}.')
    if max_pairs < i.size:
      pick = np.sort(np.random.default_rng(seed).choice(i.size, max_pairs, replace=False))
      i, j = i[pick], j[pick]
  return i, j


def pairwise_ms_ssim_diversity(volumes: Array, data_range: float, *, batch_size: int = 4,
                               max_pairs: int | None = None, seed: int = 0,
                               **ms_ssim_kwargs: Any) -> float:
  """Mean MS-SSIM over pairs of distinct volumes of a set (lower = more diverse).

  `volumes` `[N, D, H, W, C]` (NumPy, to keep large sets on the host, or JAX). Pairs `(i, j)`,
  `i < j`, from `sample_pairs(N, max_pairs, seed)`: all `N(N−1)/2` by default (MS-SSIM is
  symmetric, so this equals wdm-3d's mean over ordered pairs). Pairs are evaluated
  `batch_size` at a time by one jitted `ms_ssim_3d(…, **ms_ssim_kwargs)` (the last batch
  padded, so it compiles once); the mean is accumulated in float64. wdm-3d uses
  `data_range=1.0, kernel_size=7` on [0, 1] volumes.
  """
  if np.ndim(volumes) != 5:
    raise MetricInputError('pairwise_ms_ssim_diversity: volumes must be [N, D, H, W, C], got '
                           f'shape {tuple(np.shape(volumes))}.')
  if batch_size < 1:
    raise MetricInputError(f'batch_size must be positive, got {batch_size}.')
  first, second = sample_pairs(np.shape(volumes)[0], max_pairs, seed)
  # Validate the settings and size once, on abstract values.
  probe = jax.ShapeDtypeStruct((1,) + tuple(np.shape(volumes)[1:]), jnp.float32)
  jax.eval_shape(lambda a, b: ms_ssim_3d(a, b, data_range, **ms_ssim_kwargs), probe, probe)
  fn = jax.jit(lambda a, b: ms_ssim_3d(a, b, data_range, **ms_ssim_kwargs))
  total = 0.0
  for start in range(0, first.size, batch_size):
    i, j = first[start:start + batch_size], second[start:start + batch_size]
    count = i.size
    if count < batch_size:
      i = np.concatenate([i, np.repeat(i[-1:], batch_size - count)])
      j = np.concatenate([j, np.repeat(j[-1:], batch_size - count)])
    values = np.asarray(fn(volumes[i], volumes[j]), np.float64)
    total += float(values[:count].sum())
  return total / first.size

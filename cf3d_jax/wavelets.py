"""Orthonormal 3D Haar wavelet transform in jnp, channels-last, with WDM's subband order.

Layout: volumes are `[N, D, H, W, C]`. `haar_dwt3d` returns `[N, D/2, H/2, W/2, 8*C]` where
channel `subband * C + c` holds subband `subband` of input channel `c`. Subbands are ordered
LLL, LLH, LHL, LHH, HLL, HLH, HHL, HHH: the first letter is the filter along D, the last along W
(L = `[1, 1]/sqrt(2)`, H = `[1, -1]/sqrt(2)`). This equals `sorted(pywt.dwtn(x, 'haar'))`
('aaa', 'aad', ..., 'ddd') per channel, and wdm-3d's DWT_3D('haar').

The transform is orthonormal, so i.i.d. Gaussian noise in image space maps to i.i.d. Gaussian
noise in wavelet space, and `haar_idwt3d(haar_dwt3d(x)) == x` up to float rounding.
"""

from __future__ import annotations

import jax.numpy as jnp

SUBBANDS = ("LLL", "LLH", "LHL", "LHH", "HLL", "HLH", "HHL", "HHH")
_INV_SQRT2 = 0.7071067811865476


def _check_even(shape: tuple[int, ...]) -> None:
  spatial = shape[1:4]
  if len(shape) != 5 or any(s % 2 for s in spatial):
    raise ValueError(
        f"haar_dwt3d expects [N, D, H, W, C] with even D, H, W; got shape {tuple(shape)}. "
        "Pad the volume to even sizes first.")


def _split(x: jnp.ndarray, axis: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """One 1D Haar analysis step along `axis`: (low, high), each half the length."""
  even = jnp.take(x, jnp.arange(0, x.shape[axis], 2), axis=axis)
  odd = jnp.take(x, jnp.arange(1, x.shape[axis], 2), axis=axis)
  return (even + odd) * _INV_SQRT2, (even - odd) * _INV_SQRT2


def _merge(low: jnp.ndarray, high: jnp.ndarray, axis: int) -> jnp.ndarray:
  """Inverse of `_split`: interleaves (low ± high)/sqrt(2) along `axis`."""
  even = (low + high) * _INV_SQRT2
  odd = (low - high) * _INV_SQRT2
  stacked = jnp.stack([even, odd], axis=axis + 1)
  shape = list(low.shape)
  shape[axis] *= 2
  return stacked.reshape(shape)


def haar_dwt3d(x: jnp.ndarray) -> jnp.ndarray:
  """Single-level 3D Haar DWT. `[N, D, H, W, C]` → `[N, D/2, H/2, W/2, 8*C]` (module docstring)."""
  _check_even(x.shape)
  bands = [x]
  for axis in (1, 2, 3):  # D, then H, then W: the first letter is the D filter.
    bands = [part for b in bands for part in _split(b, axis)]
  return jnp.concatenate(bands, axis=-1)


def haar_idwt3d(z: jnp.ndarray) -> jnp.ndarray:
  """Exact inverse of `haar_dwt3d`: `[N, d, h, w, 8*C]` → `[N, 2d, 2h, 2w, C]`."""
  if z.ndim != 5 or z.shape[-1] % 8:
    raise ValueError(
        f"haar_idwt3d expects [N, d, h, w, 8*C] (channels a multiple of 8); got {tuple(z.shape)}.")
  bands = jnp.split(z, 8, axis=-1)
  for axis in (3, 2, 1):  # undo W, then H, then D.
    bands = [_merge(bands[i], bands[i + 1], axis) for i in range(0, len(bands), 2)]
  return bands[0]

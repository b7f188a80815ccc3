"""Orthonormal 3D Haar wavelet transform in jnp, channels-last, with WDM's subband order.

Layout: volumes are `[N, D, H, W, C]`. `haar_dwt3d` returns `[N, D/2, H/2, W/2, 8*C]` where
channel `subband * C + c` holds subband `subband` of input channel `c`. Subbands are ordered
LLL, LLH, LHL, LHH, HLL, HLH, HHL, HHH: the first letter is the filter along D, the last along W
(L = `[1, 1]/sqrt(2)`, H = `[1, -1]/sqrt(2)`). This equals `sorted(pywt.dwtn(x, 'haar'))`
('aaa', 'aad', ..., 'ddd') per channel, and wdm-3d's DWT_3D('haar').

The transform is orthonormal, so i.i.d. Gaussian noise in image space maps to i.i.d. Gaussian
noise in wavelet space, and `haar_idwt3d(haar_dwt3d(x)) == x` up to float rounding.

Sharded volumes (`haar_dwt3d_sharded`, `haar_idwt3d_sharded`): the Haar filters have two taps
and stride two, so a volume split along any spatial axis into even-sized blocks transforms block
by block with no communication. These run the plain transform on each device's own block under
`jax.shard_map`; the result is laid out like the input (same PartitionSpec) and equals the
unsharded transform exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

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


def _shard_counts(spec: P, mesh: Mesh, ndim: int) -> list[int]:
  """Number of shards along each of `ndim` axes under `spec`."""
  counts = []
  for i in range(ndim):
    entry = spec[i] if i < len(spec) else None
    axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    n = 1
    for a in axes:
      n *= mesh.shape[a]
    counts.append(n)
  return counts


def _check_spec(shape: tuple[int, ...], spec: P, mesh: Mesh, block_multiple: int,
                name: str) -> None:
  counts = _shard_counts(spec, mesh, len(shape))
  if counts[-1] != 1:
    raise ValueError(f"{name}: the channel axis must not be sharded (spec {spec}); subbands are "
                     "stacked on it")
  for axis in range(len(shape)):
    mult = block_multiple if axis in (1, 2, 3) else 1
    if shape[axis] % (counts[axis] * mult):
      raise ValueError(f"{name}: axis {axis} of {tuple(shape)} splits into {counts[axis]} shards "
                       f"under {spec}; each block must be a multiple of {mult}")


def haar_dwt3d_sharded(x: jnp.ndarray, mesh: Mesh, spec: P) -> jnp.ndarray:
  """`haar_dwt3d` of `x` `[N, D, H, W, C]` laid out as `spec` on `mesh`, block by block.

  Every spatial block must be even (`D / shards_D` etc.); the channel axis unsharded.
  Output `[N, D/2, H/2, W/2, 8C]` with the same spec.
  """
  _check_even(x.shape)
  _check_spec(x.shape, spec, mesh, 2, "haar_dwt3d_sharded")
  return jax.shard_map(haar_dwt3d, mesh=mesh, in_specs=spec, out_specs=spec)(x)


def haar_idwt3d_sharded(z: jnp.ndarray, mesh: Mesh, spec: P) -> jnp.ndarray:
  """`haar_idwt3d` of `z` `[N, d, h, w, 8C]` laid out as `spec`, block by block; output
  `[N, 2d, 2h, 2w, C]` with the same spec."""
  if z.ndim != 5 or z.shape[-1] % 8:
    raise ValueError(
        f"haar_idwt3d expects [N, d, h, w, 8*C] (channels a multiple of 8); got {tuple(z.shape)}.")
  _check_spec(z.shape, spec, mesh, 1, "haar_idwt3d_sharded")
  return jax.shard_map(haar_idwt3d, mesh=mesh, in_specs=spec, out_specs=spec)(z)

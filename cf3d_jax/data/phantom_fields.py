"""Smooth random fields and the acquisition model of the phantoms (`cf3d_jax.data.phantoms`).

A subject's anatomy is warped by `deformed_maps` (a cubic B-spline displacement field, control
points every `DEFORM_SPACING_MM`), its tissues mixed into a contrast by `tissue_intensity`, and
`acquire` adds a smooth multiplicative bias field (control points every `BIAS_SPACING_MM`) and
Rician noise and maps full scale [0, 1] to [-1, 1]. Everything random comes from the
`numpy.random.Generator` passed in. Maps are float32 `[D, H, W]` on the reference grid.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cf3d_jax.data.phantom_reference import Reference

DEFORM_SPACING_MM = 40.0          # B-spline control point spacing of the deformation
BIAS_SPACING_MM = 80.0            # B-spline control point spacing of the bias field


def _bspline_matrix(n: int, spacing_vox: float) -> np.ndarray:
  """[n, m] cubic B-spline weights from m control points (every `spacing_vox`) to n voxels."""
  spacing_vox = max(float(spacing_vox), 1.0)
  m = int(np.ceil((n - 1) / spacing_vox)) + 3
  u = np.arange(n)[:, None] / spacing_vox - (np.arange(m)[None, :] - 1)
  a = np.abs(u)
  return np.where(a < 1, 2 / 3 - a**2 + a**3 / 2, np.where(a < 2, (2 - a)**3 / 6, 0.0))


def smooth_fields(rng: np.random.Generator, shape: tuple[int, int, int], spacing_vox: float,
                   count: int) -> np.ndarray:
  """float32 [count, D, H, W] smooth Gaussian random fields with unit RMS (in expectation)."""
  mats = [_bspline_matrix(n, spacing_vox) for n in shape]
  gain = np.prod([np.sqrt(np.mean(np.sum(m**2, axis=1))) for m in mats])
  ctrl = rng.standard_normal((count,) + tuple(m.shape[1] for m in mats)) / gain
  out = np.einsum('ia,cabd->cibd', mats[0], ctrl)
  out = np.einsum('jb,cibd->cijd', mats[1], out)
  out = np.einsum('kd,cijd->cijk', mats[2], out)
  return out.astype(np.float32)


def _warp(maps: list[np.ndarray], displacement_vox: np.ndarray) -> list[np.ndarray]:
  """Samples each [D, H, W] map at `index + displacement` ([3, D, H, W], voxels); linear."""
  grid = np.indices(displacement_vox.shape[1:], dtype=np.float32)
  coords = grid + displacement_vox
  return [ndimage.map_coordinates(m, coords, order=1, mode='nearest') for m in maps]


def unit_fields(rng: np.random.Generator, brain: np.ndarray, spacing_vox: float,
                 count: int) -> np.ndarray:
  """float32 [count, D, H, W] smooth random fields f with mean(f) = 0, max|f| = 1 in `brain`."""
  out = []
  for f in smooth_fields(rng, brain.shape, spacing_vox, count):
    if brain.any():
      f = f - f[brain].mean()
      f = f / max(float(np.abs(f[brain]).max()), 1e-6)
    out.append(f)
  return np.stack(out).astype(np.float32)


def _bias_field(rng: np.random.Generator, brain: np.ndarray, spacing_vox: float,
                strength: float) -> np.ndarray:
  """float32 [D, H, W] multiplicative field `1 + strength · f`, mean(f) = 0, max|f| = 1 in brain."""
  f = unit_fields(rng, brain, spacing_vox, 1)[0]
  return (1.0 + strength * f).astype(np.float32)


def check_acquisition(deform_mm: float, bias_strength: float, noise_std: float) -> None:
  """ValueError unless deform_mm ≥ 0, 0 ≤ bias_strength < 1 and noise_std ≥ 0."""
  if not (deform_mm >= 0 and 0 <= bias_strength < 1 and noise_std >= 0):
    raise ValueError('need deform_mm ≥ 0, 0 ≤ bias_strength < 1, noise_std ≥ 0; got '
                     f'{deform_mm!r}, {bias_strength!r}, {noise_std!r}')


def deformed_maps(rng: np.random.Generator, reference: Reference, deform_mm: float,
                   maps: list[np.ndarray]) -> list[np.ndarray]:
  """Draws one smooth random deformation (RMS `deform_mm`) and warps each [D, H, W] map with it."""
  voxel_mm = reference.voxel_mm
  displacement = smooth_fields(rng, reference.shape, DEFORM_SPACING_MM / voxel_mm, 3)
  displacement *= deform_mm / np.sqrt(3) / voxel_mm
  return _warp(maps, displacement)


def tissue_intensity(gm: np.ndarray, wm: np.ndarray, csf: np.ndarray, brain: np.ndarray,
                      levels: dict[str, float]) -> np.ndarray:
  """float32 [D, H, W]: tissue levels mixed by the tissue fractions; background outside `brain`."""
  total = gm + wm + csf
  tissue = (gm * levels['gm'] + wm * levels['wm'] + csf * levels['csf']) / np.maximum(total, 1e-3)
  return np.where(brain, tissue, levels['background']).astype(np.float32)


def acquire(rng: np.random.Generator, intensity: np.ndarray, brain: np.ndarray, voxel_mm: float,
             bias_strength: float, noise_std: float) -> np.ndarray:
  """Bias field, Rician noise, full scale [0, 1] → [-1, 1] (clipped), background -1; float32."""
  shape = intensity.shape
  intensity = intensity * _bias_field(rng, brain, BIAS_SPACING_MM / voxel_mm, bias_strength)
  noise = rng.standard_normal((2,) + shape, dtype=np.float32) * np.float32(noise_std)
  intensity = np.sqrt((intensity + noise[0])**2 + noise[1]**2)
  volume = np.clip(2.0 * intensity - 1.0, -1.0, 1.0).astype(np.float32)
  volume[~brain] = -1.0
  return volume

"""Ventricle volume of a T1-like volume: CSF-dark voxels in the central region around the ventricles.

The measurement rule (what the sampler reports per prompt for generated AD-phantom volumes, the
counterpart of `metrics.lesion` for the MS phantom):

  A voxel counts if it lies inside the template brain mask, within `margin_mm` (15 mm) of the
  template lateral ventricles (`Reference.ventricle_fraction > 0`, Euclidean distance on the
  output grid), and its intensity, in [-1, 1], is strictly below `threshold`. The volume is the
  number of such voxels × `voxel_ml` (mL).

`DEFAULT_VENTRICLE_THRESHOLD = -0.4` is the midpoint of the phantom's CSF and GM T1 levels
(0.12 and 0.48 of full scale → -0.76 and -0.04). The central region also holds some sulcal CSF
and partial-volume voxels, so the measured value is a monotone proxy of the ground-truth
ventricle volume (offset by the CSF around the ventricles), not an unbiased estimate: compare
it between prompts of one subject and between classes, as the sampler's means do.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

DEFAULT_VENTRICLE_THRESHOLD: float = -0.4
DEFAULT_MARGIN_MM: float = 15.0


def central_region(ventricle_fraction: np.ndarray, brain_mask: np.ndarray, voxel_ml: float,
                   margin_mm: float = DEFAULT_MARGIN_MM) -> np.ndarray:
  """bool `[D, H, W]`: brain voxels within margin_mm of any template-ventricle voxel."""
  ventricles = np.asarray(ventricle_fraction) > 0
  if not ventricles.any():
    raise ValueError("the template ventricle map is empty on this grid")
  voxel_mm = (voxel_ml * 1000.0) ** (1.0 / 3.0)
  dist = ndimage.distance_transform_edt(~ventricles, sampling=voxel_mm)
  return (dist <= margin_mm) & np.asarray(brain_mask, bool)


def ventricle_volume_ml(volume: np.ndarray, region: np.ndarray, voxel_ml: float,
                        threshold: float = DEFAULT_VENTRICLE_THRESHOLD) -> float:
  """mL of voxels of `volume` `[D, H, W]` (or `[D, H, W, 1]`) in `region` below `threshold`."""
  v = np.asarray(volume)
  if v.ndim == 4 and v.shape[-1] == 1:
    v = v[..., 0]
  if v.shape != region.shape:
    raise ValueError(f"volume of shape {v.shape} does not match the region grid {region.shape}")
  return float(np.count_nonzero((v < threshold) & region) * voxel_ml)

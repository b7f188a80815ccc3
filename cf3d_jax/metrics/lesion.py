"""Lesion volume of a FLAIR-like volume by thresholding inside the template white matter.

The measurement rule (what the sampler reports per prompt for generated volumes):

  A voxel counts as lesion if it lies inside the template white-matter mask
  (`Reference.wm_mask` of :mod:`cf3d_jax.data.phantoms`: the undeformed MNI152 WM, `wm > 0.5`,
  outside the lateral ventricles, on the output grid) and its intensity, in [-1, 1], is strictly
  greater than `threshold`. The lesion volume is the number of such voxels × `voxel_ml` (mL).

The template mask is used because a generated volume has no per-subject segmentation; lesion
voxels that a model puts outside the template WM are not counted.

`DEFAULT_LESION_THRESHOLD = 0.2` is calibrated on the phantoms (default deformation, bias and
noise): it lies between the brightest normal tissue (pure GM under the strongest bias, about
0.15) and the darkest lesions (about 0.26), in the range of thresholds (0.2–0.225) where the
measured volume equals the ground truth to within a few voxels. Observed over 36 phantoms per
grid (12 per class): at 32³ no error, at 64³ at most 0.027 mL, at 128³ at most 0.044 mL
(mean |error| below 0.01 mL, Spearman ρ = 1). Harsher phantoms widen it: bias_strength 0.25
or noise_std 0.05 at 64³ give up to 0.43 mL (3.4 % of the ground truth). On generated volumes
the error depends on how sharply the model renders lesions: blurred lesion borders shrink the
measured volume.

Works on NumPy and JAX arrays alike (and under `jax.jit`): the functions use only array methods
and operators.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_LESION_THRESHOLD: float = 0.2

Array = Any  # numpy.ndarray or jax.Array


def _spatial(volume: Array, wm_shape: tuple[int, ...]) -> Array:
  """`volume` as [..., D, H, W]: drops a trailing channel axis of size 1 ([..., D, H, W, 1])."""
  wm_shape = tuple(wm_shape)
  if len(wm_shape) != 3:
    raise ValueError(f'wm_mask must be 3D [D, H, W], got shape {wm_shape}')
  shape = tuple(volume.shape)
  if shape[-3:] == wm_shape:
    return volume
  if len(shape) >= 4 and shape[-4:-1] == wm_shape and shape[-1] == 1:
    return volume[..., 0]
  raise ValueError(f'volume of shape {shape} does not end in the wm_mask grid {wm_shape} '
                   '(expected [..., D, H, W] or [..., D, H, W, 1])')


def lesion_mask_from_intensity(volume: Array, wm_mask: Array, threshold: float) -> Array:
  """Bool [..., D, H, W]: inside `wm_mask` and intensity > `threshold`.

  Args:
    volume: [..., D, H, W] (or [..., D, H, W, 1]) intensities in [-1, 1].
    wm_mask: bool [D, H, W] template white-matter mask.
    threshold: intensity above which a WM voxel counts as lesion.
  """
  volume = _spatial(volume, np.shape(wm_mask))
  return (volume > threshold) & wm_mask


def lesion_volume_ml(volume: Array, wm_mask: Array, voxel_ml: float,
                     threshold: float = DEFAULT_LESION_THRESHOLD) -> float | Array:
  """Lesion volume in mL by the measurement rule of this module.

  Args:
    volume: [..., D, H, W] (or [..., D, H, W, 1]) intensities in [-1, 1].
    wm_mask: bool [D, H, W] template white-matter mask.
    voxel_ml: volume of one voxel in mL.
    threshold: intensity above which a WM voxel counts as lesion.

  Returns:
    A Python float for a single NumPy volume, else an array [...] (NumPy or JAX, as the input).
  """
  mask = lesion_mask_from_intensity(volume, wm_mask, threshold)
  ml = mask.sum(axis=(-3, -2, -1)) * voxel_ml
  if isinstance(ml, np.generic) or (isinstance(ml, np.ndarray) and ml.ndim == 0):
    return float(ml)
  return ml

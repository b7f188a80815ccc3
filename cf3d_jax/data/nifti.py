"""NIfTI in and out: validated loading, conforming to the training grid, atomic writing.

Loading checks, in order, and raises DataError naming the file: it exists, nibabel can read it,
it is 3D (a 4D image with one frame is accepted), it has no NaN/Inf voxels. Conforming reorients
to RAS+ canonical, resamples onto an isotropic grid of `shape` spanning `fov_mm` centred on the
brain (`foreground_center`), and maps robust percentiles to [-1, 1].
"""

from __future__ import annotations

import os
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from cf3d_jax.errors import DataError
from cf3d_jax.files import atomic_path


def load_volume(path: str, max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Returns (data float32 `[X, Y, Z]` in RAS+ canonical orientation, its 4×4 affine).

  The header is checked before any voxel is read: complex data is an error (no silent drop of
  the imaginary part), and with `max_bytes` a volume whose reading would peak above it is
  rejected (a small compressed file can claim a huge shape). The peak counted is the stored
  values plus their float32 copy: voxels × (bytes per stored voxel + 4)."""
  if not os.path.exists(path):
    raise DataError(f"{path}: file not found")
  if os.path.getsize(path) == 0:
    raise DataError(f"{path}: file is empty (0 bytes)")
  try:
    raw = nib.load(path)
  except Exception as e:  # nibabel raises many types for truncated/corrupt files.
    raise DataError(f"{path}: not a readable NIfTI image ({type(e).__name__}: {e})") from e
  dtype = np.dtype(raw.get_data_dtype())
  if dtype.kind == "c":
    raise DataError(f"{path}: complex voxels ({dtype}); save the magnitude as a real image")
  need = int(np.prod(raw.shape, dtype=np.int64)) * (dtype.itemsize + 4)
  if max_bytes is not None and need > max_bytes:
    raise DataError(f"{path}: header claims shape {tuple(raw.shape)} of {dtype} ({need / 1e9:.2f} "
                    f"GB to read: stored values + float32 copy), over "
                    f"config.data.max_scan_gb={max_bytes / 1e9:g}")
  try:
    img = nib.as_closest_canonical(raw)
    data = np.asarray(img.dataobj, dtype=np.float32)
  except Exception as e:  # nibabel raises many types for truncated/corrupt files.
    raise DataError(f"{path}: not a readable NIfTI image ({type(e).__name__}: {e})") from e
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    raise DataError(f"{path}: expected a 3D volume, got shape {data.shape}")
  bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
  if bad:
    raise DataError(f"{path}: {bad} NaN/Inf voxels")
  return data, img.affine.astype(np.float64)


def grid_affine(shape: Sequence[int], fov_mm: float, center_mm: Sequence[float]) -> np.ndarray:
  """RAS affine of an isotropic grid of `shape` spanning `fov_mm` along its longest axis."""
  voxel = fov_mm / max(shape)
  affine = np.diag([voxel, voxel, voxel, 1.0])
  affine[:3, 3] = np.asarray(center_mm) - voxel * (np.asarray(shape) - 1) / 2.0
  return affine


FOREGROUND_FRACTION = 0.1   # foreground: above lo + this · (hi − lo) of the robust range


def foreground_center(data: np.ndarray, lo: float, hi: float) -> np.ndarray:
  """Voxel coordinates `[3]` of the centre of the head/brain in `data` `[X, Y, Z]`.

  The foreground is `data > lo + FOREGROUND_FRACTION · (hi − lo)`, opened by one voxel (drops
  noise specks and thin ghosting), reduced to its largest connected component (drops separate
  objects: markers, phantoms, wrap-around). The centre is the midpoint of that
  component's bounding box, so a bright but off-centre structure (a lesion, fat, a coil hot-spot)
  does not pull the crop the way an intensity-weighted centre of mass would. Falls back to the
  unopened mask, then to the array centre, when the mask is empty.
  """
  mask = data > lo + FOREGROUND_FRACTION * (hi - lo)
  opened = ndimage.binary_opening(mask)
  if opened.any():
    mask = opened
  if not mask.any():
    return (np.asarray(data.shape, np.float64) - 1) / 2.0
  labels, n = ndimage.label(mask)
  if n > 1:
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = labels == int(np.argmax(sizes))
  (box,) = ndimage.find_objects(mask.astype(np.int8))
  return np.array([(s.start + s.stop - 1) / 2.0 for s in box], np.float64)


def conform(data: np.ndarray, affine: np.ndarray, shape: Sequence[int], fov_mm: float,
            percentiles: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """Resamples `data` `[X, Y, Z]` (RAS+) onto the training grid and normalises to [-1, 1].

  Returns (volume float32 `[D, H, W]`, the grid's affine). The grid is isotropic,
  `fov_mm / max(shape)` mm per voxel, centred on `foreground_center` (so cropping and padding
  are around the brain); trilinear interpolation, outside the image = the lower percentile.
  Intensities are clipped to the percentiles `(lo, hi)` and mapped linearly to [-1, 1].
  """
  lo, hi = np.percentile(data, percentiles)
  if not hi > lo:
    raise DataError(f"image is constant (percentiles {percentiles} give {lo}, {hi})")
  center = (affine @ np.append(foreground_center(data, lo, hi), 1.0))[:3]
  out_affine = grid_affine(shape, fov_mm, center)
  vox = np.linalg.inv(affine) @ out_affine   # output voxel → input voxel
  resampled = ndimage.affine_transform(data, vox[:3, :3], vox[:3, 3], output_shape=tuple(shape),
                                       order=1, mode="constant", cval=lo)
  norm = np.clip((resampled - lo) / (hi - lo), 0.0, 1.0) * 2.0 - 1.0
  return norm.astype(np.float32), out_affine


def save_volume(path: str, volume: np.ndarray, affine: np.ndarray) -> None:
  """Writes a 3D float32 volume `[D, H, W]` as NIfTI atomically."""
  img = nib.Nifti1Image(np.asarray(volume, np.float32), np.asarray(affine, np.float64))
  with atomic_path(path) as tmp:
    nib.save(img, tmp)

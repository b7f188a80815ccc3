"""The phantoms' reference grid: the MNI152 templates (nilearn, offline) resampled onto a fixed
output grid, with the lateral ventricles derived from them, saved to and loaded from .npz.

`make_reference(shape, fov_mm)` builds a `Reference` (the method is step 1 of the
`cf3d_jax.data.phantoms` docstring); `save_reference`, `load_reference`, `find_reference` keep
it in `WORKDIR/data/reference.npz`. Arrays are `[D, H, W]` in RAS voxel order.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import zipfile

import numpy as np
from scipy import ndimage

from cf3d_jax import errors
from cf3d_jax import files

# Version 2 added `ventricle_fraction`; version 1 files load with it recomputed from the templates.
_FORMAT_VERSION = 2
_MAP_KEYS = ('t1', 'gm', 'wm', 'csf', 'ventricle_fraction')
_MASK_KEYS = ('brain_mask', 'wm_mask', 'ventricle_mask')



@dataclasses.dataclass(frozen=True, eq=False)
class Reference:
  """The fixed output grid and the undeformed template maps on it.

  Attributes:
    shape: (D, H, W) voxels of the output grid.
    affine: [4, 4] float64 voxel → RAS world (mm) affine; isotropic voxels.
    voxel_ml: volume of one voxel in mL.
    t1: float32 [D, H, W] T1 template intensity in [0, 1].
    gm, wm, csf: float32 [D, H, W] tissue probabilities in [0, 1].
    brain_mask: bool [D, H, W].
    wm_mask: bool [D, H, W]; where lesions may lie and where the measurement rule looks.
    ventricle_mask: bool [D, H, W]; lateral ventricles (`ventricle_fraction > 0.4`).
    ventricle_fraction: float32 [D, H, W] in [0, 1]; part of each voxel that is lateral
      ventricle (sums to the template's ventricle volume / voxel_ml on any grid).
  """
  shape: tuple[int, int, int]
  affine: np.ndarray
  voxel_ml: float
  t1: np.ndarray
  gm: np.ndarray
  wm: np.ndarray
  csf: np.ndarray
  brain_mask: np.ndarray
  wm_mask: np.ndarray
  ventricle_mask: np.ndarray
  ventricle_fraction: np.ndarray

  @property
  def voxel_mm(self) -> float:
    """Edge length of one (isotropic) voxel in mm."""
    return float(abs(self.affine[0, 0]))


# ------------------------------------------------------------------------------------------------
# Templates and the reference grid.


@functools.lru_cache(maxsize=1)
def _templates() -> dict[str, np.ndarray]:
  """The 1 mm MNI152 templates (read-only float32 [197, 233, 189]) plus 'affine' and 'ventricles'."""
  from nilearn import datasets  # pylint: disable=import-outside-toplevel
  t1_img = datasets.load_mni152_template(resolution=1)
  out = {
      't1': t1_img.get_fdata(dtype=np.float32),
      'gm': datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32),
      'wm': datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32),
      'brain': datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32),
  }
  out = {k: np.clip(v, 0.0, 1.0) for k, v in out.items()}
  out['csf'] = np.clip(out['brain'] - out['gm'] - out['wm'], 0.0, 1.0) * (out['brain'] > 0.5)
  out['affine'] = np.asarray(t1_img.affine, dtype=np.float64)
  out['ventricles'] = _lateral_ventricles(out['t1'], out['csf'], out['affine'])
  for v in out.values():
    v.setflags(write=False)
  return out


def _lateral_ventricles(t1: np.ndarray, csf: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """Bool mask of the lateral ventricles on the 1 mm template grid.

  Dark CSF (`csf > 0.5`, `t1 < 0.35`) split into connected components; kept: components of at
  least 2 mL whose centroid lies 5–30 mm off the midline, −40…10 mm anterior, 0–30 mm superior.
  """
  candidates = (csf > 0.5) & (t1 < 0.35)
  labels, n = ndimage.label(candidates)
  idx = np.arange(1, n + 1)
  sizes = ndimage.sum_labels(candidates, labels, idx)
  centroids = np.asarray(ndimage.center_of_mass(candidates, labels, idx)).reshape(-1, 3)
  world = centroids @ affine[:3, :3].T + affine[:3, 3]
  keep = ((sizes >= 2000) & (np.abs(world[:, 0]) >= 5) & (np.abs(world[:, 0]) <= 30) &
          (world[:, 1] >= -40) & (world[:, 1] <= 10) & (world[:, 2] >= 0) & (world[:, 2] <= 30))
  return np.isin(labels, idx[keep])


def _check_shape(shape) -> tuple[int, int, int]:
  """Returns `shape` as a tuple of 3 positive ints or raises ValueError."""
  try:
    ok = (not isinstance(shape, str) and len(shape) == 3 and
          all(not isinstance(s, (bool, str)) and int(s) == s and int(s) > 0 for s in shape))
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f'grid shape must be 3 positive ints (D, H, W), got {shape!r}')
  return tuple(int(s) for s in shape)


def _grid_affine(shape: tuple[int, int, int], fov_mm: float, centre_mm: np.ndarray) -> np.ndarray:
  """[4, 4] RAS affine of an isotropic grid, `fov_mm` along its longest axis, centred on `centre_mm`."""
  voxel_mm = fov_mm / max(shape)
  affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
  affine[:3, 3] = centre_mm - voxel_mm * (np.asarray(shape, np.float64) - 1) / 2
  return affine


def _block_mean(volume: np.ndarray, affine: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Averages `volume` over k×k×k blocks (zero-padded at the far edges); returns (volume, affine)."""
  pad = [(0, -n % k) for n in volume.shape]
  v = np.pad(volume.astype(np.float32), pad)
  d, h, w = (n // k for n in v.shape)
  v = v.reshape(d, k, h, k, w, k).mean(axis=(1, 3, 5))
  scale = np.diag([k, k, k, 1.0])
  scale[:3, 3] = (k - 1) / 2
  return v, affine @ scale


def _resample(volume: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray,
              shape: tuple[int, int, int]) -> np.ndarray:
  """Resamples a template [X, Y, Z] onto the grid `shape`; float32.

  When the grid is coarser than the template, the template is first averaged over blocks of
  about half a grid voxel and smoothed with a Gaussian so that the total blur has a FWHM of one
  grid voxel (anti-aliasing); then it is sampled linearly.
  """
  voxel_mm = abs(dst_affine[0, 0])
  k = int(voxel_mm // (2 * abs(src_affine[0, 0])))
  if k >= 2:
    volume, src_affine = _block_mean(volume, src_affine, k)
  src_voxel_mm = abs(src_affine[0, 0])
  sigma = np.sqrt(max(voxel_mm**2 - src_voxel_mm**2, 0.0)) / 2.3548 / src_voxel_mm
  if sigma > 0.3:
    volume = ndimage.gaussian_filter(volume.astype(np.float32), sigma, mode='constant')
  vox2vox = np.linalg.solve(src_affine, dst_affine)
  return ndimage.affine_transform(volume, vox2vox[:3, :3], offset=vox2vox[:3, 3],
                                  output_shape=shape, order=1, mode='constant',
                                  cval=0.0).astype(np.float32)


def make_reference(shape: tuple[int, int, int], fov_mm: float = 192.0) -> Reference:
  """Builds the output grid and resamples the MNI152 templates onto it.

  Args:
    shape: (D, H, W) voxels, e.g. (32, 32, 32) for the demo, (128, 128, 128) for the paper.
    fov_mm: field of view (mm) along the longest axis; voxels are `fov_mm / max(shape)` mm.

  Returns:
    The Reference; its arrays are read-only.
  """
  shape = _check_shape(shape)
  if not np.isfinite(fov_mm) or fov_mm <= 0:
    raise ValueError(f'fov_mm must be a positive number of mm, got {fov_mm!r}')
  tpl = _templates()
  src = tpl['affine']
  inside = np.argwhere(tpl['brain'] > 0.5)
  bbox_centre_vox = (inside.min(0) + inside.max(0)) / 2
  centre_mm = src[:3, :3] @ bbox_centre_vox + src[:3, 3]
  affine = _grid_affine(shape, float(fov_mm), centre_mm)
  maps = {k: np.clip(_resample(tpl[k], src, affine, shape), 0.0, 1.0)
          for k in ('t1', 'gm', 'wm', 'csf', 'brain')}
  brain = maps.pop('brain') > 0.5
  fraction = _ventricle_fraction(affine, shape)
  ventricles = (fraction > 0.4) & brain
  wm_mask = (maps['wm'] > 0.5) & brain & ~ventricles
  voxel_mm = fov_mm / max(shape)
  return _frozen_reference(shape=shape, affine=affine, voxel_ml=voxel_mm**3 / 1000.0,
                           brain_mask=brain, wm_mask=wm_mask, ventricle_mask=ventricles,
                           ventricle_fraction=fraction, **maps)


def _ventricle_fraction(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
  """float32 [D, H, W] in [0, 1]: the template's lateral ventricle mask resampled onto a grid."""
  tpl = _templates()
  return np.clip(_resample(tpl['ventricles'].astype(np.float32), tpl['affine'], affine, shape),
                 0.0, 1.0)


def _frozen_reference(**fields) -> Reference:
  """A Reference whose arrays are read-only (float32 maps, bool masks)."""
  for key in _MAP_KEYS:
    fields[key] = np.ascontiguousarray(fields[key], dtype=np.float32)
  for key in _MASK_KEYS:
    fields[key] = np.ascontiguousarray(fields[key], dtype=bool)
  fields['affine'] = np.array(fields['affine'], dtype=np.float64)
  for key in _MAP_KEYS + _MASK_KEYS + ('affine',):
    fields[key].setflags(write=False)
  fields['shape'] = tuple(int(s) for s in fields['shape'])
  fields['voxel_ml'] = float(fields['voxel_ml'])
  return Reference(**fields)


# ------------------------------------------------------------------------------------------------
# Saving and loading.


def save_reference(reference: Reference, path: str | os.PathLike) -> None:
  """Writes `reference` to `path` (.npz, compressed) atomically."""
  arrays = {k: getattr(reference, k) for k in _MAP_KEYS + _MASK_KEYS}
  with files.atomic_path(path) as tmp:
    with open(tmp, 'wb') as f:
      np.savez_compressed(f, format_version=np.int64(_FORMAT_VERSION),
                          shape=np.asarray(reference.shape, np.int64),
                          affine=reference.affine, voxel_ml=np.float64(reference.voxel_ml),
                          **arrays)


def load_reference(path: str | os.PathLike) -> Reference:
  """Reads a Reference written by :func:`save_reference`; DataError (naming `path`) if unusable.

  Files of format version 1 (before `ventricle_fraction`) still load: the fraction is resampled
  from the MNI152 templates onto the file's grid, as :func:`make_reference` does.
  """
  path = os.fspath(path)
  try:
    with np.load(path, allow_pickle=False) as data:
      contents = {k: data[k] for k in data.files}
  except FileNotFoundError as e:
    raise errors.DataError(f'reference file {path!r} does not exist') from e
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise errors.DataError(f'reference file {path!r} is not a readable .npz: {e}') from e
  if 'format_version' not in contents:
    raise errors.DataError(f"reference file {path!r} lacks the arrays ['format_version']")
  version = int(contents['format_version'])
  if version not in (1, _FORMAT_VERSION):
    raise errors.DataError(f'reference file {path!r} has format version {version}, expected '
                           f'1 or {_FORMAT_VERSION}')
  keys = _MAP_KEYS + _MASK_KEYS
  if version == 1:  # written before `ventricle_fraction` existed: recomputed below
    keys = tuple(k for k in keys if k != 'ventricle_fraction')
  missing = [k for k in ('shape', 'affine', 'voxel_ml') + keys if k not in contents]
  if missing:
    raise errors.DataError(f'reference file {path!r} lacks the arrays {missing}')
  shape = tuple(int(s) for s in contents['shape'])
  bad = [k for k in keys if contents[k].shape != shape]
  if len(shape) != 3 or bad or contents['affine'].shape != (4, 4):
    raise errors.DataError(f'reference file {path!r} is inconsistent: grid {shape}, '
                           f'arrays of another shape: {bad}')
  arrays = {k: contents[k] for k in keys}
  if version == 1:
    arrays['ventricle_fraction'] = _ventricle_fraction(contents['affine'], shape)
  return _frozen_reference(shape=shape, affine=contents['affine'],
                           voxel_ml=float(contents['voxel_ml']), **arrays)


def find_reference(path: str | os.PathLike) -> Reference | None:
  """The Reference at `path` (:func:`load_reference`), or None when there is no such file (a
  workdir prepared from real scans has no phantom reference)."""
  return load_reference(path) if os.path.exists(path) else None

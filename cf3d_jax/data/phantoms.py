"""Synthetic MS FLAIR phantoms with known lesion volume, built from the MNI152 templates.

Two steps:

1. :func:`make_reference` resamples the MNI152 templates that nilearn ships offline (T1, GM, WM,
   brain mask; 1 mm, loaded once per process) onto a fixed output grid: an isotropic grid of
   `shape` voxels whose longest axis spans `fov_mm`, centred on the brain's bounding box, voxel
   axes in RAS order (axis 0 runs left → right, axis 1 posterior → anterior, axis 2 inferior →
   superior, as after `nibabel.as_closest_canonical`). The CSF map is the brain mask minus GM and
   WM; the ventricle mask is the lateral ventricles (dark CSF components left and right of the
   midline); the WM mask is `wm > 0.5` inside the brain, outside the ventricles.
2. :func:`make_ms_subject` draws one subject from a `numpy.random.Generator`:

   * a smooth random deformation (cubic B-spline displacement field with control points every
     `_DEFORM_SPACING_MM`, RMS displacement length `deform_mm`) warps the template maps
     (`scipy.ndimage.map_coordinates`, linear);
   * white-matter lesions: ellipsoids whose centres are drawn inside the allowed region (the
     deformed WM, intersected with the template WM mask and outside the deformed ventricles) with
     probability ∝ `exp(-d / _PERIVENTRICULAR_SCALE_MM) + _DEEP_WM_WEIGHT` (d = distance to the
     deformed ventricles, mm), added until the target volume, drawn uniformly in the class
     bounds, is reached; the last ellipsoid is trimmed to its innermost voxels so that the mask
     holds exactly the target number of voxels;
   * FLAIR-like contrast on a fixed scale (:data:`FLAIR_LEVELS`, fractions of full scale: CSF
     dark, WM < GM < lesion), mixed by the deformed tissue probabilities (partial volume); each
     lesion gets its own level within ±5 % of the lesion level;
   * a smooth multiplicative bias field `1 + bias_strength · f` (f a smooth random field with
     mean 0 and maximum |f| = 1 in the brain) and Rician noise of standard deviation `noise_std`
     (fraction of full scale);
   * the mapping of full scale [0, 1] to [-1, 1] (clipped), with the background (outside the
     deformed brain mask) set to exactly -1.

   The intensity scale is fixed rather than per-volume min-max, so that the lesion intensity
   does not depend on the lesion load; the measurement rule in :mod:`cf3d_jax.metrics.lesion`
   relies on it.

Ground truth: `lesion_volume_ml = lesion_mask.sum() · voxel_ml`, always (by construction) with
`lo ≤ lesion_volume_ml < hi` for the class bounds `(lo, hi)` of :data:`LESION_CLASS_BOUNDS_ML`.
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

MS_CLASSES = ('minimal', 'moderate', 'high')
# Total lesion volume (mL) per class, [lo, hi); "high" means > 25 mL, generated up to 50 mL.
LESION_CLASS_BOUNDS_ML = {'minimal': (0.0, 10.0), 'moderate': (10.0, 25.0), 'high': (25.0, 50.0)}

# FLAIR-like tissue levels as fractions of full scale (0 → -1, 1 → +1 in the output).
FLAIR_LEVELS = {'background': 0.0, 'csf': 0.06, 'wm': 0.36, 'gm': 0.5, 'lesion': 0.78}
_LESION_LEVEL_SPREAD = 0.05       # each lesion's level is lesion × U(1 - s, 1 + s)

_DEFORM_SPACING_MM = 40.0         # B-spline control point spacing of the deformation
_BIAS_SPACING_MM = 80.0           # B-spline control point spacing of the bias field
_PERIVENTRICULAR_SCALE_MM = 6.0   # decay length of the lesion centre density away from ventricles
_DEEP_WM_WEIGHT = 0.02            # density floor far from the ventricles (deep WM lesions)
_LESION_RADIUS_MM = (2.5, 6.0)    # log-uniform semi-axis range; the upper end grows with load
_LESION_RADIUS_PER_ML = 0.1       # mm added to the upper semi-axis per mL of target volume
_MAX_LESIONS = 20000              # guard against an allowed region too small for the target

_FORMAT_VERSION = 1
_MAP_KEYS = ('t1', 'gm', 'wm', 'csf')
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
    ventricle_mask: bool [D, H, W]; lateral ventricles.
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
  ventricles = (_resample(tpl['ventricles'].astype(np.float32), src, affine, shape) > 0.4) & brain
  wm_mask = (maps['wm'] > 0.5) & brain & ~ventricles
  voxel_mm = fov_mm / max(shape)
  return _frozen_reference(shape=shape, affine=affine, voxel_ml=voxel_mm**3 / 1000.0,
                           brain_mask=brain, wm_mask=wm_mask, ventricle_mask=ventricles, **maps)


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
  """Reads a Reference written by :func:`save_reference`; DataError (naming `path`) if unusable."""
  path = os.fspath(path)
  try:
    with np.load(path, allow_pickle=False) as data:
      contents = {k: data[k] for k in data.files}
  except FileNotFoundError as e:
    raise errors.DataError(f'reference file {path!r} does not exist') from e
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise errors.DataError(f'reference file {path!r} is not a readable .npz: {e}') from e
  needed = ('format_version', 'shape', 'affine', 'voxel_ml') + _MAP_KEYS + _MASK_KEYS
  missing = [k for k in needed if k not in contents]
  if missing:
    raise errors.DataError(f'reference file {path!r} lacks the arrays {missing}')
  if int(contents['format_version']) != _FORMAT_VERSION:
    raise errors.DataError(f'reference file {path!r} has format version '
                           f'{int(contents["format_version"])}, expected {_FORMAT_VERSION}')
  shape = tuple(int(s) for s in contents['shape'])
  bad = [k for k in _MAP_KEYS + _MASK_KEYS if contents[k].shape != shape]
  if len(shape) != 3 or bad or contents['affine'].shape != (4, 4):
    raise errors.DataError(f'reference file {path!r} is inconsistent: grid {shape}, '
                           f'arrays of another shape: {bad}')
  return _frozen_reference(shape=shape, affine=contents['affine'],
                           voxel_ml=float(contents['voxel_ml']),
                           **{k: contents[k] for k in _MAP_KEYS + _MASK_KEYS})


# ------------------------------------------------------------------------------------------------
# Smooth random fields.


def _bspline_matrix(n: int, spacing_vox: float) -> np.ndarray:
  """[n, m] cubic B-spline weights from m control points (every `spacing_vox`) to n voxels."""
  spacing_vox = max(float(spacing_vox), 1.0)
  m = int(np.ceil((n - 1) / spacing_vox)) + 3
  u = np.arange(n)[:, None] / spacing_vox - (np.arange(m)[None, :] - 1)
  a = np.abs(u)
  return np.where(a < 1, 2 / 3 - a**2 + a**3 / 2, np.where(a < 2, (2 - a)**3 / 6, 0.0))


def _smooth_fields(rng: np.random.Generator, shape: tuple[int, int, int], spacing_vox: float,
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


def _bias_field(rng: np.random.Generator, brain: np.ndarray, spacing_vox: float,
                strength: float) -> np.ndarray:
  """float32 [D, H, W] multiplicative field `1 + strength · f`, mean(f) = 0, max|f| = 1 in brain."""
  f = _smooth_fields(rng, brain.shape, spacing_vox, 1)[0]
  if brain.any():
    f = f - f[brain].mean()
    f = f / max(float(np.abs(f[brain]).max()), 1e-6)
  return (1.0 + strength * f).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Lesions.


def _check_class(lesion_class: str) -> tuple[float, float]:
  """The class bounds (mL) or a ValueError naming the class and the allowed ones."""
  if lesion_class not in LESION_CLASS_BOUNDS_ML:
    raise ValueError(f'unknown lesion class {lesion_class!r}; allowed: {", ".join(MS_CLASSES)}')
  return LESION_CLASS_BOUNDS_ML[lesion_class]


def _target_voxels(rng: np.random.Generator, bounds: tuple[float, float], voxel_ml: float,
                   lesion_class: str) -> int:
  """Number of lesion voxels n with lo ≤ n · voxel_ml < hi, for a volume drawn in U(lo, hi)."""
  lo, hi = bounds
  n_min = int(np.ceil(lo / voxel_ml - 1e-9))
  n_max = int(np.ceil(hi / voxel_ml - 1e-9)) - 1
  if n_max < n_min:
    raise ValueError(f'voxels of {voxel_ml:.3g} mL are too coarse for the lesion class '
                     f'{lesion_class!r} ({lo}–{hi} mL); use a finer grid')
  n = int(np.floor(rng.uniform(lo, hi) / voxel_ml))
  return int(np.clip(n, n_min, n_max))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
  """A uniformly random [3, 3] rotation matrix."""
  q, r = np.linalg.qr(rng.standard_normal((3, 3)))
  q = q * np.sign(np.diag(r))
  if np.linalg.det(q) < 0:
    q[:, 0] = -q[:, 0]
  return q


def _ellipsoid(rng: np.random.Generator, centre: np.ndarray, radius_range_vox: tuple[float, float],
               shape: tuple[int, int, int]) -> tuple[tuple[slice, ...], np.ndarray]:
  """A random ellipsoid at a voxel centre: (bounding-box slices, q [box]) with q ≤ 1 inside.

  Semi-axes (voxels): the largest log-uniform in `radius_range_vox`, the others 0.4–1 of it,
  all at least 0.5 voxel; random orientation. The centre voxel has q = 0.
  """
  lo, hi = radius_range_vox
  r_major = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
  axes = np.maximum(r_major * np.array([1.0, rng.uniform(0.4, 1.0), rng.uniform(0.4, 1.0)]), 0.5)
  rot = _random_rotation(rng)
  ext = int(np.ceil(axes.max()))
  box = tuple(slice(max(c - ext, 0), min(c + ext + 1, n)) for c, n in zip(centre, shape))
  offsets = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) - c for s, c in zip(box, centre)],
                                 indexing='ij'), axis=-1).astype(np.float32)
  local = offsets @ rot / axes  # coordinates along the ellipsoid's axes, in semi-axis units
  return box, np.sum(local**2, axis=-1)


def _place_lesions(rng: np.random.Generator, allowed: np.ndarray, weights: np.ndarray,
                   n_target: int, radius_range_vox: tuple[float, float]) -> tuple[np.ndarray, list]:
  """Adds ellipsoids until exactly `n_target` voxels of `allowed` are lesion.

  Args:
    allowed: bool [D, H, W] region lesions may occupy.
    weights: float [D, H, W] unnormalised density of lesion centres (used inside `allowed`).
    n_target: number of lesion voxels wanted.
    radius_range_vox: log-uniform range of the largest semi-axis, in voxels.

  Returns:
    (bool mask [D, H, W] with exactly n_target voxels, list of (box, bool [box]) per lesion).
  """
  shape = allowed.shape
  mask = np.zeros(shape, bool)
  if n_target == 0:
    return mask, []
  flat = np.flatnonzero(allowed)
  if flat.size < n_target:
    raise ValueError(f'the white matter holds {flat.size} voxels, fewer than the {n_target} '
                     'lesion voxels wanted; use a finer grid')
  cdf = np.cumsum(weights.ravel()[flat].astype(np.float64))
  cdf /= cdf[-1]
  count, lesions = 0, []
  for _ in range(_MAX_LESIONS):
    centre = np.unravel_index(flat[min(np.searchsorted(cdf, rng.random()), flat.size - 1)], shape)
    box, q = _ellipsoid(rng, np.asarray(centre), radius_range_vox, shape)
    new = (q <= 1.0) & allowed[box] & ~mask[box]
    n_new = int(new.sum())
    if n_new == 0:
      continue
    if count + n_new > n_target:  # trim the last lesion to its innermost voxels
      order = np.argsort(np.where(new, q, np.inf), axis=None, kind='stable')
      new = np.zeros(new.size, bool)
      new[order[:n_target - count]] = True
      new = new.reshape(q.shape)
      n_new = n_target - count
    mask[box] |= new
    lesions.append((box, new))
    count += n_new
    if count == n_target:
      return mask, lesions
  raise ValueError(f'could not place {n_target} lesion voxels in {_MAX_LESIONS} lesions; '
                   'the white matter is too small for this grid')


# ------------------------------------------------------------------------------------------------
# Subjects.


def make_ms_subject(reference: Reference, lesion_class: str, rng: np.random.Generator, *,
                    deform_mm: float = 3.0, bias_strength: float = 0.15,
                    noise_std: float = 0.03,
                    lesion_radius_mm: tuple[float, float] = _LESION_RADIUS_MM) -> dict:
  """Draws one synthetic MS FLAIR subject on the reference grid.

  Args:
    reference: grid and template maps from :func:`make_reference` / :func:`load_reference`.
    lesion_class: one of :data:`MS_CLASSES`; the lesion volume is drawn uniformly in its bounds.
    rng: the only source of randomness; the same seed gives the same subject.
    deform_mm: RMS length (mm) of the displacement vectors of the smooth random deformation.
    bias_strength: maximum relative deviation of the multiplicative bias field in the brain.
    noise_std: Rician noise standard deviation, as a fraction of full scale (0.03 → 0.06 in the
      [-1, 1] output).
    lesion_radius_mm: (lo, hi) log-uniform range of a lesion's largest semi-axis in mm; hi grows
      by 0.1 mm per mL of target volume. Larger lesions (e.g. (6, 12)) suit coarse grids.

  Returns:
    {'volume': float32 [D, H, W] in [-1, 1], background -1;
     'lesion_mask': uint8 [D, H, W] (1 = lesion), inside `reference.wm_mask`;
     'lesion_volume_ml': float, mask voxels × voxel_ml, lo ≤ value < hi for the class bounds;
     'label': lesion_class}.
  """
  bounds = _check_class(lesion_class)
  if not 0 < lesion_radius_mm[0] <= lesion_radius_mm[1]:
    raise ValueError(f'lesion_radius_mm must be (lo, hi) with 0 < lo <= hi; got {lesion_radius_mm!r}')
  if not (deform_mm >= 0 and 0 <= bias_strength < 1 and noise_std >= 0):
    raise ValueError('need deform_mm ≥ 0, 0 ≤ bias_strength < 1, noise_std ≥ 0; got '
                     f'{deform_mm!r}, {bias_strength!r}, {noise_std!r}')
  shape = reference.shape
  voxel_mm = reference.voxel_mm
  n_target = _target_voxels(rng, bounds, reference.voxel_ml, lesion_class)

  # Smooth random deformation of the template maps.
  displacement = _smooth_fields(rng, shape, _DEFORM_SPACING_MM / voxel_mm, 3)
  displacement *= deform_mm / np.sqrt(3) / voxel_mm
  gm, wm, csf, brain_p, vent_p = _warp(
      [reference.gm, reference.wm, reference.csf, reference.brain_mask.astype(np.float32),
       reference.ventricle_mask.astype(np.float32)], displacement)
  brain = brain_p > 0.5
  ventricles = (vent_p > 0.5) & brain

  # Lesions: periventricular-weighted ellipsoids in the deformed ∩ template white matter.
  allowed = (wm > 0.5) & reference.wm_mask & brain & ~ventricles
  if ventricles.any():
    dist_mm = ndimage.distance_transform_edt(~ventricles, sampling=voxel_mm)
    weights = np.exp(-dist_mm / _PERIVENTRICULAR_SCALE_MM) + _DEEP_WM_WEIGHT
  else:
    weights = np.ones(shape)
  lesion_ml = n_target * reference.voxel_ml
  radius_mm = (lesion_radius_mm[0], lesion_radius_mm[1] + _LESION_RADIUS_PER_ML * lesion_ml)
  mask, lesions = _place_lesions(rng, allowed, weights, n_target,
                                 (radius_mm[0] / voxel_mm, radius_mm[1] / voxel_mm))

  # FLAIR-like contrast, partial volume from the deformed tissue probabilities.
  total = gm + wm + csf
  levels = FLAIR_LEVELS
  tissue = (gm * levels['gm'] + wm * levels['wm'] + csf * levels['csf']) / np.maximum(total, 1e-3)
  intensity = np.where(brain, tissue, levels['background']).astype(np.float32)
  for box, new in lesions:
    level = levels['lesion'] * rng.uniform(1 - _LESION_LEVEL_SPREAD, 1 + _LESION_LEVEL_SPREAD)
    intensity[box][new] = level

  # Bias field, Rician noise, mapping to [-1, 1].
  intensity *= _bias_field(rng, brain, _BIAS_SPACING_MM / voxel_mm, bias_strength)
  noise = rng.standard_normal((2,) + shape, dtype=np.float32) * np.float32(noise_std)
  intensity = np.sqrt((intensity + noise[0])**2 + noise[1]**2)
  volume = np.clip(2.0 * intensity - 1.0, -1.0, 1.0).astype(np.float32)
  volume[~brain] = -1.0
  return {
      'volume': volume,
      'lesion_mask': mask.astype(np.uint8),
      'lesion_volume_ml': float(mask.sum() * reference.voxel_ml),
      'label': lesion_class,
  }

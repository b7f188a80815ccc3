"""Synthetic brain MRI phantoms with known ground truth, built from the MNI152 templates.

Two diseases share one reference grid and one acquisition model:

* MS (:func:`make_ms_subject`): FLAIR contrast, white-matter lesions of known volume.
* AD (:func:`make_ad_subject`): T1 contrast, atrophy of known severity (enlarged lateral
  ventricles of known volume, cortical and hippocampal-region grey-matter loss).

Steps:

1. :func:`make_reference` resamples the MNI152 templates that nilearn ships offline (T1, GM, WM,
   brain mask; 1 mm, loaded once per process) onto a fixed output grid: an isotropic grid of
   `shape` voxels whose longest axis spans `fov_mm`, centred on the brain's bounding box, voxel
   axes in RAS order (axis 0 runs left → right, axis 1 posterior → anterior, axis 2 inferior →
   superior, as after `nibabel.as_closest_canonical`); world coordinates stay MNI mm. The CSF map
   is the brain mask minus GM and WM. The lateral ventricles are derived on the 1 mm template
   (:func:`_lateral_ventricles`): dark CSF (`csf > 0.5`, `t1 < 0.35`) split into connected
   components, keeping those of ≥ 2 mL whose centroid lies 5–30 mm off the midline, −40…10 mm
   anterior and 0–30 mm superior (about 11.5 mL in all); resampled, this gives
   `ventricle_fraction` (the part of each voxel that is ventricle, summing to ≈ 11.5 mL on every
   grid) and `ventricle_mask = fraction > 0.4` (empty on grids as coarse as 12 mm). The WM mask
   is `wm > 0.5` inside the brain, outside the ventricles.
2. A subject draws everything from one `numpy.random.Generator`:

   * a smooth random deformation (cubic B-spline displacement field with control points every
     `_DEFORM_SPACING_MM`, RMS displacement length `deform_mm`) warps the template maps
     (`scipy.ndimage.map_coordinates`, linear);
   * the disease (below), then a contrast on a fixed scale (fractions of full scale), mixed by
     the deformed tissue probabilities (partial volume);
   * a smooth multiplicative bias field `1 + bias_strength · f` (f a smooth random field with
     mean 0 and maximum |f| = 1 in the brain) and Rician noise of standard deviation `noise_std`
     (fraction of full scale);
   * the mapping of full scale [0, 1] to [-1, 1] (clipped), with the background (outside the
     deformed brain mask) set to exactly -1.

   The intensity scale is fixed rather than per-volume min-max, so that tissue intensities do
   not depend on the disease load; the measurement rule in :mod:`cf3d_jax.metrics.lesion`
   relies on it.

MS lesions: ellipsoids whose centres are drawn inside the allowed region (the deformed WM,
intersected with the template WM mask and outside the deformed ventricles) with probability
∝ `exp(-d / _PERIVENTRICULAR_SCALE_MM) + _DEEP_WM_WEIGHT` (d = distance to the deformed
ventricles, mm), added until the target volume, drawn uniformly in the class bounds, is reached;
the last ellipsoid is trimmed to its innermost voxels so that the mask holds exactly the target
number of voxels. FLAIR levels (:data:`FLAIR_LEVELS`): CSF dark, WM < GM < lesion; each lesion
gets its own level within ±5 % of the lesion level. Ground truth:
`lesion_volume_ml = lesion_mask.sum() · voxel_ml`, always with `lo ≤ lesion_volume_ml < hi` for
the class bounds `(lo, hi)` of :data:`LESION_CLASS_BOUNDS_ML`.

AD atrophy, with three severities drawn uniformly per subject in the class ranges
(:data:`VENTRICLE_ENLARGEMENT`, :data:`CORTICAL_THINNING_MM`, :data:`HIPPOCAMPAL_GM_LOSS`):

* cortical thinning: the outer surface of the tissue (GM + WM) moves inward by
  `t(x) = thinning · (1 + 0.3 f(x))` (f smooth, max |f| = 1): tissue is resampled at
  `x − t(x) · n(x)`, n the inward unit normal (gradient of the smoothed tissue map), which
  handles sub-voxel thickness changes through partial volume; the tissue lost is taken from GM
  first and becomes CSF. Thinning fades out near the ventricles (off within 5 mm, full beyond
  15 mm) so that the ventricle walls do not move twice;
* hippocampal-region GM loss: inside the medial temporal region of :func:`hippocampal_region`
  (a capsule of radius 6 mm around the hippocampal long axis, MNI (±26, −10, −20) → (±26, −38,
  −4) mm; partial-volume weight w), GM is replaced by CSF: `gm ← gm · (1 − loss · w)`;
* ventricle enlargement: the baseline ventricles are the `round(Σ fraction)` voxels of highest
  deformed ventricle fraction (so their volume does not depend on the grid); the enlarged
  ventricles are the `round(enlargement · baseline)` voxels of smallest
  `distance to the baseline (mm) / (1 + 0.5 g(x))` (g smooth, max |g| = 1: a smooth, uneven
  radial growth), all set to pure CSF. Ground truth:
  `ventricle_volume_ml = ventricle_mask.sum() · voxel_ml`.

T1 levels (:data:`T1_LEVELS`): CSF dark < GM < WM. The severities are drawn before anything
else and each class draws the same number of random numbers, so one seed gives the same
anatomy, bias and noise for every class: only the atrophy differs, and the ventricle mask of a
milder class is contained in that of a more severe one (same seed).
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

AD_CLASSES = ('CN', 'MCI', 'AD')
# Per-class severity ranges [lo, hi); each subject draws its value uniformly in them.
# Lateral ventricle volume as a multiple of the subject's baseline (the deformed MNI152
# ventricles, ≈ 11.5 mL: a young-adult template, so the factors, not the mL, carry the disease).
VENTRICLE_ENLARGEMENT = {'CN': (1.0, 1.3), 'MCI': (1.5, 2.0), 'AD': (2.2, 3.0)}
# Mean inward displacement (mm) of the outer cortical surface (exaggerated for visibility).
CORTICAL_THINNING_MM = {'CN': (0.0, 0.2), 'MCI': (0.3, 0.6), 'AD': (0.6, 1.0)}
# Fraction of the grey matter of the hippocampal region replaced by CSF.
HIPPOCAMPAL_GM_LOSS = {'CN': (0.0, 0.05), 'MCI': (0.10, 0.20), 'AD': (0.20, 0.35)}

# T1-like tissue levels as fractions of full scale (0 → -1, 1 → +1 in the output).
T1_LEVELS = {'background': 0.0, 'csf': 0.12, 'gm': 0.48, 'wm': 0.78}

_ATROPHY_SPACING_MM = 40.0        # B-spline control point spacing of the atrophy variation fields
_THINNING_VARIATION = 0.3         # local cortical thinning: thinning · (1 + this · f), max|f| = 1
_THINNING_SPARED_MM = (5.0, 15.0)  # thinning off within lo mm of the ventricles, full beyond hi
_VENTRICLE_GROWTH_VARIATION = 0.5  # local growth speed of the ventricles: 1 + this · g, max|g| = 1
# Hippocampal region: a capsule around the segment head → tail (right hemisphere, MNI mm; the
# left one is its mirror image in x), radius _HIPPOCAMPUS_RADIUS_MM.
_HIPPOCAMPUS_AXIS_MM = ((26.0, -10.0, -20.0), (26.0, -38.0, -4.0))
_HIPPOCAMPUS_RADIUS_MM = 6.0

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


def _unit_fields(rng: np.random.Generator, brain: np.ndarray, spacing_vox: float,
                 count: int) -> np.ndarray:
  """float32 [count, D, H, W] smooth random fields f with mean(f) = 0, max|f| = 1 in `brain`."""
  out = []
  for f in _smooth_fields(rng, brain.shape, spacing_vox, count):
    if brain.any():
      f = f - f[brain].mean()
      f = f / max(float(np.abs(f[brain]).max()), 1e-6)
    out.append(f)
  return np.stack(out).astype(np.float32)


def _bias_field(rng: np.random.Generator, brain: np.ndarray, spacing_vox: float,
                strength: float) -> np.ndarray:
  """float32 [D, H, W] multiplicative field `1 + strength · f`, mean(f) = 0, max|f| = 1 in brain."""
  f = _unit_fields(rng, brain, spacing_vox, 1)[0]
  return (1.0 + strength * f).astype(np.float32)


def _check_acquisition(deform_mm: float, bias_strength: float, noise_std: float) -> None:
  """ValueError unless deform_mm ≥ 0, 0 ≤ bias_strength < 1 and noise_std ≥ 0."""
  if not (deform_mm >= 0 and 0 <= bias_strength < 1 and noise_std >= 0):
    raise ValueError('need deform_mm ≥ 0, 0 ≤ bias_strength < 1, noise_std ≥ 0; got '
                     f'{deform_mm!r}, {bias_strength!r}, {noise_std!r}')


def _deformed_maps(rng: np.random.Generator, reference: Reference, deform_mm: float,
                   maps: list[np.ndarray]) -> list[np.ndarray]:
  """Draws one smooth random deformation (RMS `deform_mm`) and warps each [D, H, W] map with it."""
  voxel_mm = reference.voxel_mm
  displacement = _smooth_fields(rng, reference.shape, _DEFORM_SPACING_MM / voxel_mm, 3)
  displacement *= deform_mm / np.sqrt(3) / voxel_mm
  return _warp(maps, displacement)


def _tissue_intensity(gm: np.ndarray, wm: np.ndarray, csf: np.ndarray, brain: np.ndarray,
                      levels: dict[str, float]) -> np.ndarray:
  """float32 [D, H, W]: tissue levels mixed by the tissue fractions; background outside `brain`."""
  total = gm + wm + csf
  tissue = (gm * levels['gm'] + wm * levels['wm'] + csf * levels['csf']) / np.maximum(total, 1e-3)
  return np.where(brain, tissue, levels['background']).astype(np.float32)


def _acquire(rng: np.random.Generator, intensity: np.ndarray, brain: np.ndarray, voxel_mm: float,
             bias_strength: float, noise_std: float) -> np.ndarray:
  """Bias field, Rician noise, full scale [0, 1] → [-1, 1] (clipped), background -1; float32."""
  shape = intensity.shape
  intensity = intensity * _bias_field(rng, brain, _BIAS_SPACING_MM / voxel_mm, bias_strength)
  noise = rng.standard_normal((2,) + shape, dtype=np.float32) * np.float32(noise_std)
  intensity = np.sqrt((intensity + noise[0])**2 + noise[1]**2)
  volume = np.clip(2.0 * intensity - 1.0, -1.0, 1.0).astype(np.float32)
  volume[~brain] = -1.0
  return volume


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
  _check_acquisition(deform_mm, bias_strength, noise_std)
  shape = reference.shape
  voxel_mm = reference.voxel_mm
  n_target = _target_voxels(rng, bounds, reference.voxel_ml, lesion_class)

  # Smooth random deformation of the template maps.
  gm, wm, csf, brain_p, vent_p = _deformed_maps(
      rng, reference, deform_mm,
      [reference.gm, reference.wm, reference.csf, reference.brain_mask.astype(np.float32),
       reference.ventricle_mask.astype(np.float32)])
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
  intensity = _tissue_intensity(gm, wm, csf, brain, FLAIR_LEVELS)
  for box, new in lesions:
    level = FLAIR_LEVELS['lesion'] * rng.uniform(1 - _LESION_LEVEL_SPREAD,
                                                 1 + _LESION_LEVEL_SPREAD)
    intensity[box][new] = level

  volume = _acquire(rng, intensity, brain, voxel_mm, bias_strength, noise_std)
  return {
      'volume': volume,
      'lesion_mask': mask.astype(np.uint8),
      'lesion_volume_ml': float(mask.sum() * reference.voxel_ml),
      'label': lesion_class,
  }


# ------------------------------------------------------------------------------------------------
# Alzheimer's disease: atrophy.


def _check_ad_class(diagnosis: str) -> None:
  """ValueError naming `diagnosis` and the allowed classes unless it is one of AD_CLASSES."""
  if diagnosis not in AD_CLASSES:
    raise ValueError(f'unknown AD class {diagnosis!r}; allowed: {", ".join(AD_CLASSES)}')


def _world_mm(reference: Reference) -> np.ndarray:
  """float32 [D, H, W, 3] world (MNI mm) coordinates of the voxel centres."""
  idx = np.indices(reference.shape, dtype=np.float32)
  affine = reference.affine.astype(np.float32)
  return np.einsum('ij,jdhw->dhwi', affine[:3, :3], idx) + affine[:3, 3]


def hippocampal_region(reference: Reference) -> np.ndarray:
  """float32 [D, H, W] in [0, 1]: partial-volume weight of the hippocampal region, both sides.

  The region is a capsule of radius `_HIPPOCAMPUS_RADIUS_MM` (6 mm) around the segment
  MNI (26, −10, −20) → (26, −38, −4) mm (head → tail) and its mirror image in x; about 4.5 mL per
  side, three quarters of it template GM (hippocampus and adjacent parahippocampal cortex).
  The weight of a voxel is `clip((radius − distance) / voxel_mm + 0.5, 0, 1)`.
  """
  world = _world_mm(reference)
  world[..., 0] = np.abs(world[..., 0])
  head, tail = (np.asarray(p, np.float32) for p in _HIPPOCAMPUS_AXIS_MM)
  axis = tail - head
  s = np.clip((world - head) @ axis / float(axis @ axis), 0.0, 1.0)
  dist = np.linalg.norm(world - (head + s[..., None] * axis), axis=-1)
  weight = (_HIPPOCAMPUS_RADIUS_MM - dist) / reference.voxel_mm + 0.5
  return np.clip(weight, 0.0, 1.0).astype(np.float32)


def _baseline_ventricles(fraction: np.ndarray, brain: np.ndarray) -> np.ndarray:
  """bool [D, H, W]: the round(Σ fraction) brain voxels of highest ventricle fraction."""
  n_base = int(round(float(fraction[brain].sum())))
  if n_base < 1:
    raise ValueError(f'the ventricles fill {float(fraction[brain].sum()):.2f} voxels of this '
                     'grid, less than one; use a finer grid for AD phantoms')
  key = np.where(brain, fraction, -1.0).ravel()
  mask = np.zeros(fraction.size, bool)
  mask[np.argsort(-key, kind='stable')[:n_base]] = True
  return mask.reshape(fraction.shape)


def _thin_cortex(gm: np.ndarray, wm: np.ndarray, csf: np.ndarray,
                 thinning_vox: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Moves the outer tissue surface inward by `thinning_vox` ([D, H, W], voxels); returns gm, wm, csf.

  tissue = gm + wm is resampled at `x − t(x) · n(x)` (n: inward unit normal, the gradient of the
  tissue map smoothed with σ = 1 voxel); the loss, never negative, leaves GM first, then WM,
  and becomes CSF.
  """
  tissue = gm + wm
  grad = np.stack(np.gradient(ndimage.gaussian_filter(tissue, 1.0)))
  norm = np.sqrt(np.sum(grad**2, axis=0))
  inward = np.where(norm > 1e-4, grad / np.maximum(norm, 1e-4), 0.0)
  coords = np.indices(tissue.shape, dtype=np.float32) - thinning_vox * inward
  shrunk = ndimage.map_coordinates(tissue, coords, order=1, mode='nearest')
  loss = np.clip(tissue - shrunk, 0.0, None)
  gm_loss = np.minimum(loss, gm)
  wm_loss = np.minimum(loss - gm_loss, wm)
  return gm - gm_loss, wm - wm_loss, csf + gm_loss + wm_loss


def make_ad_subject(reference: Reference, diagnosis: str, rng: np.random.Generator, *,
                    deform_mm: float = 3.0, bias_strength: float = 0.15,
                    noise_std: float = 0.03) -> dict:
  """Draws one synthetic T1 subject with Alzheimer's-type atrophy on the reference grid.

  Args:
    reference: grid and template maps from :func:`make_reference` / :func:`load_reference`.
    diagnosis: one of :data:`AD_CLASSES` ('CN', 'MCI', 'AD'); sets the severity ranges of
      :data:`VENTRICLE_ENLARGEMENT`, :data:`CORTICAL_THINNING_MM`, :data:`HIPPOCAMPAL_GM_LOSS`.
    rng: the only source of randomness; the same seed gives the same subject, and the same
      anatomy, bias and noise under every diagnosis.
    deform_mm: RMS length (mm) of the displacement vectors of the smooth random deformation.
    bias_strength: maximum relative deviation of the multiplicative bias field in the brain.
    noise_std: Rician noise standard deviation, as a fraction of full scale.

  Returns:
    {'volume': float32 [D, H, W] in [-1, 1], background -1 (T1: CSF < GM < WM);
     'ventricle_mask': uint8 [D, H, W] (1 = lateral ventricle, pure CSF), inside the brain;
     'ventricle_volume_ml': float, mask voxels × voxel_ml (the ground truth);
     'baseline_ventricle_volume_ml': float, the subject's ventricles before enlargement;
     'ventricle_enlargement': float, the drawn factor (volume ≈ factor × baseline);
     'cortical_thinning_mm': float, the drawn mean cortical thinning;
     'hippocampal_gm_loss': float, the drawn GM fraction lost in the hippocampal region;
     'hippocampal_gm_ml': float, GM left in the (deformed) hippocampal region, weighted;
     'label': diagnosis}.

  Raises:
    ValueError: unknown diagnosis, invalid parameters, or a grid too coarse to hold a voxel of
      ventricle.
  """
  _check_ad_class(diagnosis)
  _check_acquisition(deform_mm, bias_strength, noise_std)
  shape = reference.shape
  voxel_mm = reference.voxel_mm
  # Severities first, one draw each, so the rest of the stream does not depend on the class.
  enlargement = float(rng.uniform(*VENTRICLE_ENLARGEMENT[diagnosis]))
  thinning_mm = float(rng.uniform(*CORTICAL_THINNING_MM[diagnosis]))
  hippocampal_loss = float(rng.uniform(*HIPPOCAMPAL_GM_LOSS[diagnosis]))

  gm, wm, csf, brain_p, fraction, hippocampus = _deformed_maps(
      rng, reference, deform_mm,
      [reference.gm, reference.wm, reference.csf, reference.brain_mask.astype(np.float32),
       reference.ventricle_fraction, hippocampal_region(reference)])
  brain = brain_p > 0.5
  thinning_field, growth_field = _unit_fields(rng, brain, _ATROPHY_SPACING_MM / voxel_mm, 2)
  baseline = _baseline_ventricles(fraction, brain)
  dist_mm = ndimage.distance_transform_edt(~baseline, sampling=voxel_mm).astype(np.float32)

  # Cortical thinning, spared near the ventricles.
  lo, hi = _THINNING_SPARED_MM
  spared = np.clip((dist_mm - lo) / (hi - lo), 0.0, 1.0)
  thinning_vox = (thinning_mm / voxel_mm) * (1.0 + _THINNING_VARIATION * thinning_field) * spared
  gm, wm, csf = _thin_cortex(gm, wm, csf, thinning_vox)

  # Hippocampal-region GM → CSF.
  lost = gm * (hippocampal_loss * hippocampus)
  gm, csf = gm - lost, csf + lost

  # Ventricle enlargement: the n_target voxels nearest the baseline, distance over local speed.
  n_base = int(baseline.sum())
  n_target = int(round(enlargement * n_base))
  if n_target > int(brain.sum()):
    raise ValueError(f'{n_target} ventricle voxels do not fit in the brain of this grid')
  speed = 1.0 + _VENTRICLE_GROWTH_VARIATION * growth_field
  key = np.where(baseline, -1.0, dist_mm / speed)
  key = np.where(brain, key, np.inf)
  order = np.lexsort((-fraction.ravel(), key.ravel()))  # by key; ties: higher fraction first
  ventricles = np.zeros(fraction.size, bool)
  ventricles[order[:n_target]] = True
  ventricles = ventricles.reshape(shape)
  csf = np.where(ventricles, gm + wm + csf, csf)
  gm = np.where(ventricles, 0.0, gm)
  wm = np.where(ventricles, 0.0, wm)

  intensity = _tissue_intensity(gm, wm, csf, brain, T1_LEVELS)
  volume = _acquire(rng, intensity, brain, voxel_mm, bias_strength, noise_std)
  return {
      'volume': volume,
      'ventricle_mask': ventricles.astype(np.uint8),
      'ventricle_volume_ml': float(n_target * reference.voxel_ml),
      'baseline_ventricle_volume_ml': float(n_base * reference.voxel_ml),
      'ventricle_enlargement': enlargement,
      'cortical_thinning_mm': thinning_mm,
      'hippocampal_gm_loss': hippocampal_loss,
      'hippocampal_gm_ml': float(np.sum(gm * hippocampus) * reference.voxel_ml),
      'label': diagnosis,
  }

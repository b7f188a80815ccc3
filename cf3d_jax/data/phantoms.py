"""Synthetic brain MRI phantoms with known ground truth, built from the MNI152 templates.

Two diseases share one reference grid and one acquisition model:

* MS (:func:`make_ms_subject`): FLAIR contrast, white-matter lesions of known volume.
* AD (:func:`make_ad_subject`): T1 contrast, atrophy of known severity (enlarged lateral
  ventricles of known volume, cortical and hippocampal-region grey-matter loss).

Steps:

1. :func:`phantom_reference.make_reference` resamples the MNI152 templates that nilearn ships
   offline (T1, GM, WM, brain mask; 1 mm, loaded once per process) onto a fixed output grid: an
   isotropic grid of `shape` voxels whose longest axis spans `fov_mm`, centred on the brain's
   bounding box, voxel axes in RAS order (axis 0 runs left → right, axis 1 posterior → anterior,
   axis 2 inferior → superior, as after `nibabel.as_closest_canonical`); world coordinates stay MNI
   mm. The CSF map is the brain mask minus GM and WM. The lateral ventricles are derived on the 1
   mm template (`phantom_reference`): dark CSF (`csf > 0.5`, `t1 < 0.35`) split into connected
   components, keeping those of ≥ 2 mL whose centroid lies 5–30 mm off the midline, −40…10 mm
   anterior and 0–30 mm superior (about 11.5 mL in all); resampled, this gives `ventricle_fraction`
   (the part of each voxel that is ventricle, summing to ≈ 11.5 mL on every grid) and
   `ventricle_mask = fraction > 0.4` (empty on grids as coarse as 12 mm). The WM mask is `wm > 0.5`
   inside the brain, outside the ventricles.
2. A subject draws everything from one `numpy.random.Generator`:

   * a smooth random deformation (cubic B-spline displacement field with control points every
     `phantom_fields.DEFORM_SPACING_MM`, RMS displacement length `deform_mm`) warps the template
     maps (`scipy.ndimage.map_coordinates`, linear);
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

import numpy as np
from scipy import ndimage

from cf3d_jax.data import phantom_fields
from cf3d_jax.data.phantom_reference import Reference

MS_CLASSES = ('minimal', 'moderate', 'high')
# Total lesion volume (mL) per class, [lo, hi); "high" means > 25 mL, generated up to 50 mL.
LESION_CLASS_BOUNDS_ML = {'minimal': (0.0, 10.0), 'moderate': (10.0, 25.0), 'high': (25.0, 50.0)}

# FLAIR-like tissue levels as fractions of full scale (0 → -1, 1 → +1 in the output).
FLAIR_LEVELS = {'background': 0.0, 'csf': 0.06, 'wm': 0.36, 'gm': 0.5, 'lesion': 0.78}
_LESION_LEVEL_SPREAD = 0.05       # each lesion's level is lesion × U(1 - s, 1 + s)

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
  phantom_fields.check_acquisition(deform_mm, bias_strength, noise_std)
  shape = reference.shape
  voxel_mm = reference.voxel_mm
  n_target = _target_voxels(rng, bounds, reference.voxel_ml, lesion_class)

  # Smooth random deformation of the template maps.
  gm, wm, csf, brain_p, vent_p = phantom_fields.deformed_maps(
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
  intensity = phantom_fields.tissue_intensity(gm, wm, csf, brain, FLAIR_LEVELS)
  for box, new in lesions:
    level = FLAIR_LEVELS['lesion'] * rng.uniform(1 - _LESION_LEVEL_SPREAD,
                                                 1 + _LESION_LEVEL_SPREAD)
    intensity[box][new] = level

  volume = phantom_fields.acquire(rng, intensity, brain, voxel_mm, bias_strength, noise_std)
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
  phantom_fields.check_acquisition(deform_mm, bias_strength, noise_std)
  shape = reference.shape
  voxel_mm = reference.voxel_mm
  # Severities first, one draw each, so the rest of the stream does not depend on the class.
  enlargement = float(rng.uniform(*VENTRICLE_ENLARGEMENT[diagnosis]))
  thinning_mm = float(rng.uniform(*CORTICAL_THINNING_MM[diagnosis]))
  hippocampal_loss = float(rng.uniform(*HIPPOCAMPAL_GM_LOSS[diagnosis]))

  gm, wm, csf, brain_p, fraction, hippocampus = phantom_fields.deformed_maps(
      rng, reference, deform_mm,
      [reference.gm, reference.wm, reference.csf, reference.brain_mask.astype(np.float32),
       reference.ventricle_fraction, hippocampal_region(reference)])
  brain = brain_p > 0.5
  thinning_field, growth_field = phantom_fields.unit_fields(rng, brain, _ATROPHY_SPACING_MM / voxel_mm, 2)
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

  intensity = phantom_fields.tissue_intensity(gm, wm, csf, brain, T1_LEVELS)
  volume = phantom_fields.acquire(rng, intensity, brain, voxel_mm, bias_strength, noise_std)
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

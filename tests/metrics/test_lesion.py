"""Tests for cf3d_jax.metrics.lesion: the lesion-volume measurement rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from cf3d_jax.data import phantom_reference, phantoms
from cf3d_jax.metrics import lesion

SEEDS_PER_CLASS = 3
# Largest |measured − ground truth| seen with the default threshold over 12 phantoms per class:
# 0 mL at 32³, 0.027 mL at 64³ (0.044 mL at 128³); the bounds below leave room for other seeds:
# two voxels at 32³ (0.43 mL), 0.25 mL (9 voxels) at 64³.
MAX_ABS_ERROR_ML = {32: 0.44, 64: 0.25}
MAX_REL_ERROR = 0.02  # relative to the ground truth, for volumes of 5 mL and more


@pytest.fixture(scope='module', params=[32, 64], ids=['32', '64'])
def measured(request):
  """(grid size, reference, ground truths [N], measured [N], labels [N]) over all classes."""
  n = request.param
  reference = phantom_reference.make_reference((n, n, n))
  truth, meas, labels = [], [], []
  for i, c in enumerate(phantoms.MS_CLASSES):
    for s in range(SEEDS_PER_CLASS):
      subject = phantoms.make_ms_subject(reference, c, np.random.default_rng(5000 + 100 * i + s))
      truth.append(subject['lesion_volume_ml'])
      meas.append(lesion.lesion_volume_ml(subject['volume'], reference.wm_mask,
                                          reference.voxel_ml))
      labels.append(c)
  return n, reference, np.array(truth), np.array(meas), np.array(labels)


def test_tracks_ground_truth(measured):
  n, _, truth, meas, labels = measured
  rho = stats.spearmanr(truth, meas)[0]
  assert rho >= 0.9, rho
  means = {c: meas[labels == c].mean() for c in phantoms.MS_CLASSES}
  assert means['high'] > means['moderate'] > means['minimal'], means
  err = np.abs(meas - truth)
  print(f'{n}^3: max |error| {err.max():.3f} mL, mean |error| {err.mean():.4f} mL')
  assert err.max() <= MAX_ABS_ERROR_ML[n], err
  big = truth >= 5
  assert np.all(err[big] / truth[big] <= MAX_REL_ERROR)


def test_measured_class_agrees_with_label(measured):
  _, _, _, meas, labels = measured
  for m, c in zip(meas, labels):
    lo, hi = phantoms.LESION_CLASS_BOUNDS_ML[c]
    assert lo - 0.5 <= m <= hi + 0.5, (m, c)


def test_rule_counts_only_wm_voxels_above_threshold():
  wm = np.zeros((4, 4, 4), bool)
  wm[1:3, 1:3, 1:3] = True
  volume = np.full((4, 4, 4), -1.0, np.float32)
  volume[0, 0, 0] = 1.0       # bright but outside WM: not counted
  volume[1, 1, 1] = 0.9       # counted
  volume[1, 1, 2] = 0.5       # counted
  volume[1, 2, 1] = 0.5       # counted
  volume[2, 2, 2] = 0.3       # equal to the threshold: not counted
  mask = lesion.lesion_mask_from_intensity(volume, wm, 0.3)
  assert mask.dtype == bool and mask.shape == (4, 4, 4)
  assert mask.sum() == 3 and not mask[0, 0, 0] and not mask[2, 2, 2]
  ml = lesion.lesion_volume_ml(volume, wm, voxel_ml=0.5, threshold=0.3)
  assert isinstance(ml, float) and ml == 1.5


def test_batch_and_channel_axes():
  rng = np.random.default_rng(0)
  wm = rng.random((6, 6, 6)) > 0.5
  batch = rng.uniform(-1, 1, (2, 3, 6, 6, 6)).astype(np.float32)
  out = lesion.lesion_volume_ml(batch, wm, 0.1)
  assert out.shape == (2, 3)
  expected = [[((batch[i, j] > lesion.DEFAULT_LESION_THRESHOLD) & wm).sum() * 0.1
               for j in range(3)] for i in range(2)]
  np.testing.assert_allclose(out, expected)
  np.testing.assert_allclose(lesion.lesion_volume_ml(batch[..., None], wm, 0.1), out)


def test_jax_arrays_and_jit():
  rng = np.random.default_rng(1)
  wm = rng.random((6, 6, 6)) > 0.5
  batch = rng.uniform(-1, 1, (2, 6, 6, 6, 1)).astype(np.float32)
  expected = lesion.lesion_volume_ml(batch, wm, 0.25)
  got = jax.jit(lambda v: lesion.lesion_volume_ml(v, wm, 0.25))(jnp.asarray(batch))
  assert isinstance(got, jax.Array) and got.shape == (2,)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)


def test_shape_mismatch():
  with pytest.raises(ValueError, match='does not end in the wm_mask grid'):
    lesion.lesion_volume_ml(np.zeros((5, 5, 5)), np.zeros((4, 4, 4), bool), 1.0)
  with pytest.raises(ValueError, match='3D'):
    lesion.lesion_volume_ml(np.zeros((4, 4)), np.zeros((4, 4), bool), 1.0)

"""The ventricle rule on AD phantoms: ordered by class and tracking the ground truth."""

import numpy as np
import pytest

from cf3d_jax.data import phantom_reference, phantoms
from cf3d_jax.metrics import ventricles


@pytest.fixture(scope="module")
def reference():
  return phantom_reference.make_reference((32, 32, 32), 192.0)


def test_rule_orders_classes_and_tracks_ground_truth(reference):
  region = ventricles.central_region(reference.ventricle_fraction, reference.brain_mask,
                                     reference.voxel_ml)
  truth, measured = [], []
  for cls in phantoms.AD_CLASSES:
    for seed in range(3):
      s = phantoms.make_ad_subject(reference, cls, np.random.default_rng([seed, 5]))
      truth.append(s["ventricle_volume_ml"])
      measured.append(ventricles.ventricle_volume_ml(s["volume"], region, reference.voxel_ml))
  truth, measured = np.asarray(truth), np.asarray(measured)
  means = measured.reshape(3, 3).mean(axis=1)
  assert means[0] < means[1] < means[2], means
  # Same seed, more atrophy → more measured volume, and the growth matches the ground truth's.
  for seed in range(3):
    m, t = measured.reshape(3, 3)[:, seed], truth.reshape(3, 3)[:, seed]
    assert np.all(np.diff(m) > 0)
    np.testing.assert_allclose(m[2] - m[0], t[2] - t[0], rtol=0.5)
  assert np.corrcoef(truth, measured)[0, 1] > 0.9


def test_shape_mismatch_and_empty_template_are_errors(reference):
  region = np.zeros((4, 4, 4), bool)
  with pytest.raises(ValueError, match="does not match"):
    ventricles.ventricle_volume_ml(np.zeros((5, 4, 4)), region, 1.0)
  with pytest.raises(ValueError, match="empty"):
    ventricles.central_region(np.zeros((4, 4, 4)), region, 1.0)

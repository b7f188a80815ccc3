"""Tests for cf3d_jax.data.phantoms: synthetic MS FLAIR phantoms with known lesion volume."""

import time

import numpy as np
import pytest
from scipy import ndimage

from cf3d_jax import errors
from cf3d_jax.data import phantoms

SEEDS_PER_CLASS = 3


@pytest.fixture(scope='module', params=[32, 64], ids=['32', '64'])
def reference(request):
  return phantoms.make_reference((request.param,) * 3)


@pytest.fixture(scope='module')
def reference32():
  return phantoms.make_reference((32, 32, 32))


@pytest.fixture(scope='module')
def subjects(reference):
  """SEEDS_PER_CLASS subjects per class on `reference`."""
  return [phantoms.make_ms_subject(reference, c, np.random.default_rng(100 * i + s))
          for i, c in enumerate(phantoms.MS_CLASSES) for s in range(SEEDS_PER_CLASS)]


def test_reference_grid(reference):
  n = reference.shape[0]
  assert reference.shape == (n, n, n)
  assert reference.affine.shape == (4, 4)
  voxel_mm = 192.0 / n
  np.testing.assert_allclose(np.diag(reference.affine)[:3], voxel_mm)
  assert reference.voxel_ml == pytest.approx(voxel_mm**3 / 1000)
  for name in ('t1', 'gm', 'wm', 'csf'):
    arr = getattr(reference, name)
    assert arr.shape == reference.shape and arr.dtype == np.float32
    assert arr.min() >= 0 and arr.max() <= 1
  for name in ('brain_mask', 'wm_mask', 'ventricle_mask'):
    assert getattr(reference, name).dtype == bool
  brain_ml = reference.brain_mask.sum() * reference.voxel_ml
  wm_ml = reference.wm_mask.sum() * reference.voxel_ml
  assert 1500 < brain_ml < 2200 and 400 < wm_ml < 800
  assert reference.ventricle_mask.any()
  assert not (reference.wm_mask & reference.ventricle_mask).any()
  assert not (reference.wm_mask & ~reference.brain_mask).any()
  # The FOV is centred on the brain: the brain touches no face of the grid but the inferior one.
  assert not reference.brain_mask[[0, -1]].any() and not reference.brain_mask[:, [0, -1]].any()


def test_subject_shapes_range_background(reference, subjects):
  margin = int(np.ceil(15.0 / reference.voxel_mm))
  far_outside = ~ndimage.binary_dilation(reference.brain_mask, iterations=margin)
  for subject in subjects:
    volume = subject['volume']
    assert volume.shape == reference.shape and volume.dtype == np.float32
    assert subject['lesion_mask'].shape == reference.shape
    assert subject['lesion_mask'].dtype == np.uint8
    assert set(np.unique(subject['lesion_mask'])) <= {0, 1}
    assert volume.min() >= -1 and volume.max() <= 1
    assert np.all(volume[far_outside] == -1)
    assert np.all(volume[0, 0, 0] == -1)
    assert np.mean(volume[reference.brain_mask] > -1) > 0.9


def test_ground_truth_inside_class_bounds(reference, subjects):
  for subject in subjects:
    lo, hi = phantoms.LESION_CLASS_BOUNDS_ML[subject['label']]
    measured = subject['lesion_mask'].sum() * reference.voxel_ml
    assert subject['lesion_volume_ml'] == pytest.approx(measured)
    assert lo <= subject['lesion_volume_ml'] < hi, subject['label']


def test_lesions_inside_white_matter(reference, subjects):
  for subject in subjects:
    mask = subject['lesion_mask'].astype(bool)
    assert not (mask & ~reference.wm_mask).any()


def test_periventricular_preference(reference, subjects):
  dist = ndimage.distance_transform_edt(~reference.ventricle_mask, sampling=reference.voxel_mm)
  lesion = np.concatenate([dist[s['lesion_mask'].astype(bool)] for s in subjects])
  rng = np.random.default_rng(0)
  wm = rng.choice(dist[reference.wm_mask], size=5000)
  assert lesion.size > 0
  assert lesion.mean() < 0.7 * wm.mean(), (lesion.mean(), wm.mean())


def test_contrast_ordering(reference, subjects):
  for subject in subjects:
    volume = subject['volume']
    lesion = subject['lesion_mask'].astype(bool)
    if lesion.sum() < 3:
      continue
    brain = volume > -1
    means = {
        'lesion': volume[lesion].mean(),
        'gm': volume[(reference.gm > 0.5) & brain & ~lesion].mean(),
        'wm': volume[reference.wm_mask & ~lesion].mean(),
        'csf': volume[(reference.csf > 0.5) & brain].mean(),
    }
    assert means['lesion'] > means['gm'] + 0.3, means
    assert means['gm'] > means['wm'] > means['csf'], means


def test_same_seed_same_subject(reference32):
  a = phantoms.make_ms_subject(reference32, 'moderate', np.random.default_rng(7))
  b = phantoms.make_ms_subject(reference32, 'moderate', np.random.default_rng(7))
  c = phantoms.make_ms_subject(reference32, 'moderate', np.random.default_rng(8))
  np.testing.assert_array_equal(a['volume'], b['volume'])
  np.testing.assert_array_equal(a['lesion_mask'], b['lesion_mask'])
  assert a['lesion_volume_ml'] == b['lesion_volume_ml'] and a['label'] == b['label'] == 'moderate'
  assert not np.array_equal(a['volume'], c['volume'])
  assert not np.array_equal(a['lesion_mask'], c['lesion_mask'])


def test_no_global_numpy_rng(reference32):
  np.random.seed(0)
  before = np.random.get_state()[1].copy()
  phantoms.make_ms_subject(reference32, 'high', np.random.default_rng(1))
  np.testing.assert_array_equal(np.random.get_state()[1], before)


def test_speed_32(reference32):
  times = []
  for seed in range(3):
    start = time.perf_counter()
    phantoms.make_ms_subject(reference32, 'high', np.random.default_rng(seed))
    times.append(time.perf_counter() - start)
  assert min(times) < 0.3, times


def test_save_load_round_trip(reference32, tmp_path):
  path = tmp_path / 'sub' / 'reference.npz'
  phantoms.save_reference(reference32, path)
  loaded = phantoms.load_reference(path)
  assert loaded.shape == reference32.shape
  assert loaded.voxel_ml == reference32.voxel_ml
  np.testing.assert_array_equal(loaded.affine, reference32.affine)
  for name in ('t1', 'gm', 'wm', 'csf', 'brain_mask', 'wm_mask', 'ventricle_mask'):
    a, b = getattr(loaded, name), getattr(reference32, name)
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  assert [p.name for p in path.parent.iterdir()] == ['reference.npz']  # no temporary left
  one = phantoms.make_ms_subject(loaded, 'minimal', np.random.default_rng(3))
  two = phantoms.make_ms_subject(reference32, 'minimal', np.random.default_rng(3))
  np.testing.assert_array_equal(one['volume'], two['volume'])


def test_load_missing_file(tmp_path):
  path = tmp_path / 'nope.npz'
  with pytest.raises(errors.DataError, match='nope.npz'):
    phantoms.load_reference(path)


def test_load_corrupt_file(tmp_path):
  path = tmp_path / 'corrupt.npz'
  path.write_bytes(b'this is not a zip file')
  with pytest.raises(errors.DataError, match='corrupt.npz'):
    phantoms.load_reference(path)


def test_load_incomplete_file(tmp_path):
  path = tmp_path / 'partial.npz'
  np.savez(path, shape=np.array([4, 4, 4]))
  with pytest.raises(errors.DataError, match='partial.npz'):
    phantoms.load_reference(path)


def test_unknown_class(reference32):
  with pytest.raises(ValueError, match="'severe'.*minimal, moderate, high"):
    phantoms.make_ms_subject(reference32, 'severe', np.random.default_rng(0))


@pytest.mark.parametrize('shape', [(32, 32), (32, 32, 0), (32, -1, 32), (32.5, 32, 32), 'abc',
                                   None, (32, 32, 32, 1)])
def test_bad_shape(shape):
  with pytest.raises(ValueError, match='3 positive ints'):
    phantoms.make_reference(shape)


def test_grid_too_coarse_for_class():
  reference = phantoms.make_reference((6, 6, 6))  # 32 mm voxels: 33 mL each
  with pytest.raises(ValueError, match='too coarse'):
    phantoms.make_ms_subject(reference, 'moderate', np.random.default_rng(0))

"""Tests for cf3d_jax.data.phantoms: MS FLAIR phantoms with known lesion volume and AD T1
phantoms with known atrophy."""

import time

import numpy as np
import pytest
from scipy import ndimage

from cf3d_jax import errors
from cf3d_jax.data import phantom_reference, phantoms
from cf3d_jax.text import prompts as prompt_lib

SEEDS_PER_CLASS = 3


@pytest.fixture(scope='module', params=[32, 64], ids=['32', '64'])
def reference(request):
  return phantom_reference.make_reference((request.param,) * 3)


@pytest.fixture(scope='module')
def reference32():
  return phantom_reference.make_reference((32, 32, 32))


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
  for name in ('t1', 'gm', 'wm', 'csf', 'ventricle_fraction'):
    arr = getattr(reference, name)
    assert arr.shape == reference.shape and arr.dtype == np.float32
    assert arr.min() >= 0 and arr.max() <= 1
  for name in ('brain_mask', 'wm_mask', 'ventricle_mask'):
    assert getattr(reference, name).dtype == bool
  brain_ml = reference.brain_mask.sum() * reference.voxel_ml
  wm_ml = reference.wm_mask.sum() * reference.voxel_ml
  assert 1500 < brain_ml < 2200 and 400 < wm_ml < 800
  assert reference.ventricle_mask.any()
  np.testing.assert_array_equal(reference.ventricle_mask,
                                (reference.ventricle_fraction > 0.4) & reference.brain_mask)
  # The fraction keeps the template's ≈ 11.5 mL of lateral ventricles on any grid.
  assert reference.ventricle_fraction.sum() * reference.voxel_ml == pytest.approx(11.5, abs=0.3)
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
  phantom_reference.save_reference(reference32, path)
  loaded = phantom_reference.load_reference(path)
  assert loaded.shape == reference32.shape
  assert loaded.voxel_ml == reference32.voxel_ml
  np.testing.assert_array_equal(loaded.affine, reference32.affine)
  for name in ('t1', 'gm', 'wm', 'csf', 'brain_mask', 'wm_mask', 'ventricle_mask',
               'ventricle_fraction'):
    a, b = getattr(loaded, name), getattr(reference32, name)
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  assert [p.name for p in path.parent.iterdir()] == ['reference.npz']  # no temporary left
  one = phantoms.make_ms_subject(loaded, 'minimal', np.random.default_rng(3))
  two = phantoms.make_ms_subject(reference32, 'minimal', np.random.default_rng(3))
  np.testing.assert_array_equal(one['volume'], two['volume'])
  one = phantoms.make_ad_subject(loaded, 'AD', np.random.default_rng(3))
  two = phantoms.make_ad_subject(reference32, 'AD', np.random.default_rng(3))
  np.testing.assert_array_equal(one['volume'], two['volume'])


def test_load_version_1_file(reference32, tmp_path):
  """Files written before `ventricle_fraction` existed still load, with the same fraction."""
  path = tmp_path / 'v1.npz'
  np.savez_compressed(path, format_version=np.int64(1), shape=np.asarray(reference32.shape),
                      affine=reference32.affine, voxel_ml=np.float64(reference32.voxel_ml),
                      **{k: getattr(reference32, k) for k in ('t1', 'gm', 'wm', 'csf', 'brain_mask',
                                                              'wm_mask', 'ventricle_mask')})
  loaded = phantom_reference.load_reference(path)
  np.testing.assert_array_equal(loaded.ventricle_fraction, reference32.ventricle_fraction)
  np.testing.assert_array_equal(loaded.ventricle_mask, reference32.ventricle_mask)
  one = phantoms.make_ad_subject(loaded, 'MCI', np.random.default_rng(4))
  two = phantoms.make_ad_subject(reference32, 'MCI', np.random.default_rng(4))
  np.testing.assert_array_equal(one['volume'], two['volume'])


def test_load_unknown_version_and_missing_fraction(reference32, tmp_path):
  path = tmp_path / 'future.npz'
  phantom_reference.save_reference(reference32, path)
  with np.load(path) as data:
    arrays = {k: data[k] for k in data.files}
  np.savez(path, **dict(arrays, format_version=np.int64(99)))
  with pytest.raises(errors.DataError, match='future.npz.*version 99'):
    phantom_reference.load_reference(path)
  path = tmp_path / 'v2_without_fraction.npz'
  np.savez(path, **{k: v for k, v in arrays.items() if k != 'ventricle_fraction'})
  with pytest.raises(errors.DataError, match='v2_without_fraction.npz.*ventricle_fraction'):
    phantom_reference.load_reference(path)


def test_load_missing_file(tmp_path):
  path = tmp_path / 'nope.npz'
  with pytest.raises(errors.DataError, match='nope.npz'):
    phantom_reference.load_reference(path)


def test_load_corrupt_file(tmp_path):
  path = tmp_path / 'corrupt.npz'
  path.write_bytes(b'this is not a zip file')
  with pytest.raises(errors.DataError, match='corrupt.npz'):
    phantom_reference.load_reference(path)


def test_load_incomplete_file(tmp_path):
  path = tmp_path / 'partial.npz'
  np.savez(path, shape=np.array([4, 4, 4]))
  with pytest.raises(errors.DataError, match='partial.npz'):
    phantom_reference.load_reference(path)


def test_unknown_class(reference32):
  with pytest.raises(ValueError, match="'severe'.*minimal, moderate, high"):
    phantoms.make_ms_subject(reference32, 'severe', np.random.default_rng(0))


@pytest.mark.parametrize('shape', [(32, 32), (32, 32, 0), (32, -1, 32), (32.5, 32, 32), 'abc',
                                   None, (32, 32, 32, 1)])
def test_bad_shape(shape):
  with pytest.raises(ValueError, match='3 positive ints'):
    phantom_reference.make_reference(shape)


def test_grid_too_coarse_for_class():
  reference = phantom_reference.make_reference((6, 6, 6))  # 32 mm voxels: 33 mL each
  with pytest.raises(ValueError, match='too coarse'):
    phantoms.make_ms_subject(reference, 'moderate', np.random.default_rng(0))


# ------------------------------------------------------------------------------------------------
# AD T1 phantoms.


@pytest.fixture(scope='module', params=[32, 48], ids=['32', '48'])
def ad_reference(request):
  return phantom_reference.make_reference((request.param,) * 3)


@pytest.fixture(scope='module')
def ad_subjects(ad_reference):
  """{class: SEEDS_PER_CLASS subjects}; seed s is shared by the classes."""
  return {c: [phantoms.make_ad_subject(ad_reference, c, np.random.default_rng(s))
              for s in range(SEEDS_PER_CLASS)] for c in phantoms.AD_CLASSES}


def _all(ad_subjects):
  return [s for subjects in ad_subjects.values() for s in subjects]


def test_ad_classes_are_the_prompt_classes():
  assert phantoms.AD_CLASSES == prompt_lib.ADNI_CLASSES
  for table in (phantoms.VENTRICLE_ENLARGEMENT, phantoms.CORTICAL_THINNING_MM,
                phantoms.HIPPOCAMPAL_GM_LOSS):
    assert tuple(table) == phantoms.AD_CLASSES
    bounds = [table[c] for c in phantoms.AD_CLASSES]
    assert all(lo <= hi for lo, hi in bounds)
    assert bounds[0][1] <= bounds[1][0] and bounds[1][1] <= bounds[2][0]  # ordered, disjoint


def test_ad_subject_shapes_range_background(ad_reference, ad_subjects):
  margin = int(np.ceil(15.0 / ad_reference.voxel_mm))
  far_outside = ~ndimage.binary_dilation(ad_reference.brain_mask, iterations=margin)
  for subject in _all(ad_subjects):
    volume = subject['volume']
    assert volume.shape == ad_reference.shape and volume.dtype == np.float32
    assert subject['ventricle_mask'].shape == ad_reference.shape
    assert subject['ventricle_mask'].dtype == np.uint8
    assert set(np.unique(subject['ventricle_mask'])) <= {0, 1}
    assert volume.min() >= -1 and volume.max() <= 1
    assert np.all(volume[far_outside] == -1)
    assert np.mean(volume[ad_reference.brain_mask] > -1) > 0.9


def test_ad_ground_truth(ad_reference, ad_subjects):
  voxel_ml = ad_reference.voxel_ml
  near_template = ndimage.distance_transform_edt(
      ~ad_reference.ventricle_mask, sampling=ad_reference.voxel_mm) < 20.0
  for cls, subjects in ad_subjects.items():
    for subject in subjects:
      mask = subject['ventricle_mask'].astype(bool)
      assert subject['label'] == cls
      assert subject['ventricle_volume_ml'] == pytest.approx(mask.sum() * voxel_ml)
      n_base = round(subject['baseline_ventricle_volume_ml'] / voxel_ml)
      assert mask.sum() == round(subject['ventricle_enlargement'] * n_base)
      # The baseline is the deformed template's ≈ 11.5 mL (the deformation changes it a little).
      assert 8.0 < subject['baseline_ventricle_volume_ml'] < 15.0
      for key, table in (('ventricle_enlargement', phantoms.VENTRICLE_ENLARGEMENT),
                         ('cortical_thinning_mm', phantoms.CORTICAL_THINNING_MM),
                         ('hippocampal_gm_loss', phantoms.HIPPOCAMPAL_GM_LOSS)):
        lo, hi = table[cls]
        assert lo <= subject[key] < hi, (cls, key, subject[key])
      assert not (mask & ~ad_reference.brain_mask).any()  # inside the brain
      assert not (mask & ~near_template).any()            # grown from the template ventricles
      assert mask[~ad_reference.ventricle_mask].any() or cls == 'CN'


def test_ad_class_ordering(ad_reference, ad_subjects):
  def mean(key):
    return [np.mean([s[key] for s in ad_subjects[c]]) for c in phantoms.AD_CLASSES]

  cn, mci, ad = mean('ventricle_volume_ml')
  assert cn < mci < ad, (cn, mci, ad)
  assert ad > 1.8 * cn
  cn, mci, ad = mean('hippocampal_gm_ml')
  assert cn > mci > ad, (cn, mci, ad)
  # The image shows it: dark (below the CSF/GM midpoint) voxels near the template ventricles.
  central = ndimage.distance_transform_edt(~ad_reference.ventricle_mask,
                                           sampling=ad_reference.voxel_mm) < 15.0
  dark = 2 * (phantoms.T1_LEVELS['csf'] + phantoms.T1_LEVELS['gm']) / 2 - 1
  counts = [np.mean([np.sum(s['volume'][central] < dark) for s in ad_subjects[c]])
            for c in phantoms.AD_CLASSES]
  assert counts[0] < counts[1] < counts[2], counts


def test_ad_contrast_ordering(ad_reference, ad_subjects):
  """T1: WM > GM > CSF, and the ground-truth ventricles are CSF-dark."""
  csf_level = 2 * phantoms.T1_LEVELS['csf'] - 1
  for subject in _all(ad_subjects):
    volume = subject['volume']
    ventricles = subject['ventricle_mask'].astype(bool)
    brain = volume > -1
    means = {
        'gm': volume[(ad_reference.gm > 0.5) & brain & ~ventricles].mean(),
        'wm': volume[ad_reference.wm_mask & ~ventricles].mean(),
        'csf': volume[(ad_reference.csf > 0.5) & brain].mean(),
        'ventricles': volume[ventricles].mean(),
    }
    assert means['wm'] > means['gm'] + 0.2 > means['csf'] + 0.4, means
    assert abs(means['ventricles'] - csf_level) < 0.2, means


def test_ad_same_seed_is_a_counterfactual(ad_reference, ad_subjects):
  """One seed: same baseline anatomy under every class; masks nested; new ventricle is darker."""
  for s in range(SEEDS_PER_CLASS):
    cn, mci, ad = (ad_subjects[c][s] for c in phantoms.AD_CLASSES)
    assert cn['baseline_ventricle_volume_ml'] == ad['baseline_ventricle_volume_ml']
    masks = [x['ventricle_mask'].astype(bool) for x in (cn, mci, ad)]
    assert not (masks[0] & ~masks[1]).any() and not (masks[1] & ~masks[2]).any()
    grown = masks[2] & ~masks[0]
    assert grown.sum() > 0
    assert ad['volume'][grown].mean() < cn['volume'][grown].mean() - 0.3
    # Far from the atrophy (pure tissue > 20 mm from the ventricles) almost nothing changes.
    dist = ndimage.distance_transform_edt(~masks[2], sampling=ad_reference.voxel_mm)
    pure = ndimage.minimum_filter(ad_reference.gm + ad_reference.wm, size=3) > 0.97
    deep = pure & ad_reference.brain_mask & (dist > 20.0)
    assert deep.sum() > 0
    assert np.abs(ad['volume'][deep] - cn['volume'][deep]).mean() < 0.01
    np.testing.assert_array_equal(ad['volume'] == -1, cn['volume'] == -1)  # same brain outline


def test_hippocampal_region(ad_reference):
  region = phantoms.hippocampal_region(ad_reference)
  assert region.shape == ad_reference.shape and region.dtype == np.float32
  assert region.min() >= 0 and region.max() <= 1
  assert 6.0 < region.sum() * ad_reference.voxel_ml < 14.0  # ≈ 2 × 4.5 mL
  assert not (region > 0)[~ad_reference.brain_mask].any()
  assert (region * ad_reference.gm).sum() / region.sum() > 0.5  # mostly grey matter
  half = ad_reference.shape[0] // 2  # mirror images about the midline x = 0
  left, right = region[:half].sum(), region[half:].sum()
  assert left == pytest.approx(right, rel=0.15)


def test_ad_same_seed_same_subject(reference32):
  a = phantoms.make_ad_subject(reference32, 'MCI', np.random.default_rng(7))
  b = phantoms.make_ad_subject(reference32, 'MCI', np.random.default_rng(7))
  c = phantoms.make_ad_subject(reference32, 'MCI', np.random.default_rng(8))
  np.testing.assert_array_equal(a['volume'], b['volume'])
  np.testing.assert_array_equal(a['ventricle_mask'], b['ventricle_mask'])
  assert a['ventricle_volume_ml'] == b['ventricle_volume_ml'] and a['label'] == b['label'] == 'MCI'
  assert not np.array_equal(a['volume'], c['volume'])
  assert not np.array_equal(a['ventricle_mask'], c['ventricle_mask'])


def test_ad_no_global_numpy_rng(reference32):
  np.random.seed(0)
  before = np.random.get_state()[1].copy()
  phantoms.make_ad_subject(reference32, 'AD', np.random.default_rng(1))
  np.testing.assert_array_equal(np.random.get_state()[1], before)


def test_ad_speed_32(reference32):
  times = []
  for seed in range(3):
    start = time.perf_counter()
    phantoms.make_ad_subject(reference32, 'AD', np.random.default_rng(seed))
    times.append(time.perf_counter() - start)
  assert min(times) < 0.3, times


def test_ad_unknown_class_and_bad_parameters(reference32):
  with pytest.raises(ValueError, match="'Dementia'.*CN, MCI, AD"):
    phantoms.make_ad_subject(reference32, 'Dementia', np.random.default_rng(0))
  with pytest.raises(ValueError, match='bias_strength'):
    phantoms.make_ad_subject(reference32, 'AD', np.random.default_rng(0), bias_strength=1.5)


def test_ad_grid_too_coarse():
  reference = phantom_reference.make_reference((6, 6, 6))  # 32 mm voxels: the ventricles fill 0.35 voxel
  with pytest.raises(ValueError, match='finer grid'):
    phantoms.make_ad_subject(reference, 'CN', np.random.default_rng(0))

"""NIfTI loading errors (each names the file), conforming, atomic writing."""

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from cf3d_jax.data import nifti
from cf3d_jax.errors import DataError


def _save(path, data, affine=None):
  nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.eye(4) if affine is None else affine),
           str(path))
  return str(path)


def test_bad_files_give_clear_errors(tmp_path):
  good = _save(tmp_path / "good.nii.gz", np.random.default_rng(0).random((8, 8, 8)))
  cases = {"missing": (str(tmp_path / "nope.nii.gz"), "file not found"),
           "empty": (str(tmp_path / "empty.nii.gz"), "empty")}
  open(cases["empty"][0], "wb").close()
  raw = open(good, "rb").read()
  trunc = str(tmp_path / "trunc.nii.gz")
  with open(trunc, "wb") as f:
    f.write(raw[: len(raw) // 2])
  cases["truncated"] = (trunc, "not a readable NIfTI")
  garbage = str(tmp_path / "garbage.nii.gz")
  with gzip.open(garbage, "wb") as f:
    f.write(b"this is not nifti" * 10)
  cases["garbage"] = (garbage, "not a readable NIfTI")
  cases["2d"] = (_save(tmp_path / "flat.nii.gz", np.ones((8, 8))), "expected a 3D volume")
  cases["4d"] = (_save(tmp_path / "multi.nii.gz", np.ones((4, 4, 4, 3))), "expected a 3D volume")
  nan = np.ones((4, 4, 4))
  nan[1, 1, 1] = np.nan
  nan[2, 2, 2] = np.inf
  cases["nan"] = (_save(tmp_path / "nan.nii.gz", nan), "2 NaN/Inf voxels")
  for name, (path, message) in cases.items():
    with pytest.raises(DataError, match=message) as info:
      nifti.load_volume(path)
    assert path in str(info.value), name


def test_single_frame_4d_accepted_and_canonical(tmp_path):
  flipped = np.diag([-2.0, 2.0, 2.0, 1.0])
  data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6, 1)
  out, affine = nifti.load_volume(_save(tmp_path / "a.nii.gz", data, flipped))
  assert out.shape == (4, 5, 6)
  assert affine[0, 0] > 0   # RAS+ after reorientation
  np.testing.assert_array_equal(out, data[::-1, :, :, 0])


def test_conform_grid_and_range():
  rng = np.random.default_rng(0)
  data = np.zeros((40, 50, 30), np.float32)
  data[10:30, 10:40, 5:25] = rng.uniform(100, 200, (20, 30, 20))
  vol, affine = nifti.conform(data, np.diag([2.0, 2.0, 2.0, 1.0]), (16, 16, 16), 96.0, (0.5, 99.5))
  assert vol.shape == (16, 16, 16) and vol.dtype == np.float32
  assert vol.min() >= -1 and vol.max() <= 1 and vol.max() > 0.5
  np.testing.assert_allclose(np.diag(affine)[:3], 6.0)
  with pytest.raises(DataError, match="constant"):
    nifti.conform(np.ones((8, 8, 8), np.float32), np.eye(4), (4, 4, 4), 8.0, (1, 99))


def test_save_volume_is_atomic_and_readable(tmp_path):
  path = str(tmp_path / "out.nii.gz")
  nifti.save_volume(path, np.ones((4, 4, 4)), np.diag([3.0, 3.0, 3.0, 1.0]))
  assert sorted(os.listdir(tmp_path)) == ["out.nii.gz"]
  img = nib.load(path)
  assert img.shape == (4, 4, 4) and img.affine[0, 0] == 3.0


def test_crop_is_centred_on_the_brain_not_on_bright_or_separate_objects():
  data = np.zeros((60, 60, 60), np.float32)
  data[10:40, 15:45, 20:50] = 100.0            # the brain: bounding-box centre (24.5, 29.5, 34.5)
  data[12:24, 17:43, 22:48] = 400.0            # a large bright region on one side of it
  data[55:59, 2:6, 2:6] = 400.0                # a separate marker far away
  rng = np.random.default_rng(0)
  data += rng.uniform(0, 1, data.shape).astype(np.float32)   # background noise specks
  lo, hi = np.percentile(data, (0.5, 99.5))
  np.testing.assert_allclose(nifti.foreground_center(data, lo, hi), (24.5, 29.5, 34.5))
  # The old centre of mass of everything above the lower percentile is pulled off the brain.
  from scipy import ndimage
  assert np.abs(np.asarray(ndimage.center_of_mass(data > lo)) - (24.5, 29.5, 34.5)).max() > 3
  vol, affine = nifti.conform(data, np.eye(4), (32, 32, 32), 64.0, (0.5, 99.5))
  np.testing.assert_allclose((affine @ [15.5, 15.5, 15.5, 1.0])[:3], (24.5, 29.5, 34.5))
  brain = np.argwhere(vol[:26, 8:, 8:] > -0.9) + (0, 8, 8)   # (the marker lies near a corner)
  np.testing.assert_allclose((brain.min(0) + brain.max(0)) / 2.0, 15.5, atol=0.5)
  assert nifti.foreground_center(np.zeros((4, 6, 8)), 0.0, 1.0).tolist() == [1.5, 2.5, 3.5]

"""Exporting a prepared split as NIfTI + a source CSV for real-subject counterfactuals."""

import csv
import os

import numpy as np

from cf3d_jax.data import nifti, records
from cf3d_jax.data.export import export_split
from cf3d_jax.data.pipeline import split_subjects
from cf3d_jax.invert import resolve_sources


def test_export_test_split_round_trips(prepared_data, tmp_path):
  data_dir = os.path.join(prepared_data, "data", "records")
  index = records.load_index(data_dir)
  path = export_split(data_dir, "test", str(tmp_path), seed=0)
  rows = list(csv.DictReader(open(path)))
  test = split_subjects([r["subject_id"] for r in index["records"]], (0.7, 0.15, 0.15), 0)["test"]
  assert sorted(r["subject_id"] for r in rows) == sorted(test)
  by_id = {r["subject_id"]: r for r in index["records"]}
  for row in rows:
    data, _ = nifti.load_volume(os.path.join(tmp_path, row["path"]))
    assert data.shape == tuple(index["meta"]["shape"]) and data.min() >= -1 and data.max() <= 1
    assert abs(float(row["lesion_volume_ml"]) - by_id[row["subject_id"]]["clinical_value"]) < 1e-3
  sources = resolve_sources(path, "ms")
  assert [s["path"] for s in sources] == [os.path.join(str(tmp_path), r["path"]) for r in rows]
  assert all(s["prompt"].startswith("Subject has") for s in sources)
  limited = export_split(data_dir, "train", str(tmp_path / "two"), seed=0, limit=2)
  assert len(list(csv.DictReader(open(limited)))) == 2


def test_on_grid_sources_are_taken_as_is_and_others_conformed(prepared_data, tmp_path):
  from cf3d_jax.config_base import load_config_file
  from cf3d_jax.invert import load_source
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  config = load_config_file(os.path.join(root, "configs", "demo.py"), "smoke")
  data_dir = os.path.join(prepared_data, "data", "records")
  index = records.load_index(data_dir)
  grid = np.asarray(index["meta"]["affine"])
  path = export_split(data_dir, "val", str(tmp_path), seed=0, limit=1)
  scan = os.path.join(str(tmp_path), next(csv.DictReader(open(path)))["path"])
  data, _ = nifti.load_volume(scan)
  np.testing.assert_array_equal(load_source(scan, config, grid), data)
  # The same voxels as a raw scan (intensities 0–1000, other affine) are conformed: [-1, 1].
  raw = tmp_path / "raw.nii.gz"
  nifti.save_volume(str(raw), (data + 1) * 500, np.diag([2.0, 2.0, 2.0, 1.0]))
  conformed = load_source(str(raw), config, grid)
  assert conformed.shape == data.shape and conformed.min() >= -1 and conformed.max() <= 1
  assert not np.allclose(conformed, data)

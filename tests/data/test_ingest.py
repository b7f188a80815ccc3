"""`prepare` from a manifest: conforming, worker-count invariance, resuming, bad input per row."""

import gzip
import json
import os
import re

import nibabel as nib
import numpy as np
import pytest

from cf3d_jax import config_base
from cf3d_jax.data import ingest, records
from cf3d_jax.data.prepare import data_paths, prepare
from cf3d_jax.errors import DataError


def _head(path, seed=0, shape=(20, 22, 18), affine=None, data=None):
  """A bright ellipsoid 'head' with texture, saved as NIfTI; returns the path."""
  if data is None:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    inside = (grid ** 2).sum(0) < 0.6
    data = np.where(inside, rng.uniform(50, 150, shape), rng.uniform(0, 2, shape))
  if affine is None:
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
  nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), str(path))
  return str(path)


def _config(manifest, smoke_config, records_per_shard=2):
  c = smoke_config
  c.data.source = "manifest"
  c.data.manifest = str(manifest)
  c.data.records_per_shard = records_per_shard
  c.data.prepare_workers = 0
  c.data.fov_mm = 48.0          # 3 mm voxels: the 40 mm test heads fill most of the 16³ grid
  config_base.validate(c)
  return c


def _manifest(tmp_path, rows, name="scans.csv", column="lesion_volume_ml"):
  path = tmp_path / name
  path.write_text("\n".join([f"path,subject_id,{column}"] + [",".join(r) for r in rows]) + "\n")
  return path


def _good_rows(tmp_path, n):
  flip = np.diag([-2.0, 2.0, 2.0, 1.0])   # LAS on disk: reoriented to RAS on load
  return [(_head(tmp_path / f"s{i}.nii.gz", seed=i, affine=flip if i % 2 else None),
           f"sub{i}", str(7.0 * i)) for i in range(n)]


def _read_all(folder):
  index = records.load_index(folder)
  import grain  # pylint: disable=import-outside-toplevel
  src = grain.sources.ArrayRecordDataSource(records.shard_paths(folder, index))
  return index, [records.decode_record(src[i]) for i in range(len(src))]


def test_manifest_records_are_conformed_and_independent_of_worker_count(tmp_path, smoke_config):
  manifest = _manifest(tmp_path, _good_rows(tmp_path, 5))
  config = _config(manifest, smoke_config)
  prepare(config, str(tmp_path / "w0"))
  folder0 = data_paths(str(tmp_path / "w0"))["records"]
  index0, recs0 = _read_all(folder0)
  assert [r["subject_id"] for r in index0["records"]] == [f"sub{i}" for i in range(5)]
  assert [r["position"] for r in index0["records"]] == list(range(5))
  assert [r["label"] for r in index0["records"]] == [0, 0, 1, 1, 2]
  assert index0["shards"] == [records.shard_name(k) for k in range(3)]
  assert index0["summary"]["rows"] == 5 and index0["summary"]["skipped"] == 0
  assert not os.path.exists(folder0 + ingest.STAGING_SUFFIX)
  for rec in recs0:
    vol = rec["volume"]
    assert vol.shape == (16, 16, 16, 1) and vol.dtype == np.float32
    assert vol.min() >= -1 and vol.max() <= 1 and vol.max() > 0.5
    np.testing.assert_allclose(np.diag(rec["affine"])[:3], 3.0)
    # Brain-centred: the head sits in the middle of the grid (equal margins left and right).
    fg = np.argwhere(vol[..., 0] > -0.5)
    assert np.all(np.abs(fg.min(0) + fg.max(0) - 15) <= 1)
  config.data.prepare_workers = 2
  prepare(config, str(tmp_path / "w2"))
  folder2 = data_paths(str(tmp_path / "w2"))["records"]
  index2, recs2 = _read_all(folder2)
  assert index2["summary"]["workers"] == 2
  assert index2["records"] == index0["records"]
  for a, b in zip(recs0, recs2):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_crashed_prepare_resumes_without_redoing_finished_shards(tmp_path, smoke_config,
                                                                 monkeypatch):
  rows = _good_rows(tmp_path, 5)
  broken = str(tmp_path / "broken.nii.gz")
  open(broken, "wb").close()
  rows[4] = (broken, "sub4", "20")
  config = _config(_manifest(tmp_path, rows), smoke_config)
  workdir = str(tmp_path / "w")
  folder = data_paths(workdir)["records"]
  with pytest.raises(DataError, match=r"scans.csv row 6: .*broken.nii.gz: file is empty"):
    prepare(config, workdir)
  staging = folder + ingest.STAGING_SUFFIX
  assert not os.path.exists(folder)             # no dataset.json, nothing visible as complete
  assert sorted(os.listdir(staging)) == ["shard-00000.array_record", "shard-00000.json",
                                         "shard-00001.array_record", "shard-00001.json",
                                         "staging.json"]
  _head(broken, seed=4)                          # the scan is fixed; the manifest is unchanged
  calls = []
  real = ingest.conform_scan
  monkeypatch.setattr(ingest, "conform_scan", lambda path, *a: calls.append(path) or real(path, *a))
  prepare(config, workdir)
  assert calls == [broken]                       # only the unfinished shard was redone
  index, recs = _read_all(folder)
  assert index["summary"]["reused_shards"] == 2 and len(recs) == 5
  monkeypatch.undo()
  prepare(config, str(tmp_path / "fresh"))
  fresh = records.load_index(data_paths(str(tmp_path / "fresh"))["records"])
  assert fresh["records"] == index["records"]


def test_changed_manifest_discards_the_staging_with_a_message(tmp_path, smoke_config, capsys):
  rows = _good_rows(tmp_path, 3)
  rows.append((str(tmp_path / "missing.nii.gz"), "sub3", "1"))
  manifest = _manifest(tmp_path, rows)
  config = _config(manifest, smoke_config)
  workdir = str(tmp_path / "w")
  with pytest.raises(DataError, match="row 5: .*missing.nii.gz: file not found"):
    prepare(config, workdir)
  capsys.readouterr()
  _manifest(tmp_path, rows[:3] + [(rows[0][0], "sub3", "40")])   # the manifest changed
  prepare(config, workdir)
  out = capsys.readouterr().out
  assert "different manifest or data config" in out and "discarding its 1 finished shard" in out
  index = records.load_index(data_paths(workdir)["records"])
  assert index["summary"]["reused_shards"] == 0
  assert [r["label"] for r in index["records"]] == [0, 0, 1, 2]


def _bad_scans(tmp_path):
  """(file, expected message) for every kind of bad scan."""
  good = _head(tmp_path / "ok.nii.gz")
  raw = open(good, "rb").read()
  trunc = tmp_path / "truncated.nii.gz"
  trunc.write_bytes(raw[: len(raw) // 2])
  empty = tmp_path / "zero.nii.gz"
  empty.write_bytes(b"")
  garbage = tmp_path / "garbage.nii.gz"
  with gzip.open(garbage, "wb") as f:
    f.write(b"not a nifti header" * 30)
  nan = np.random.default_rng(0).uniform(0, 1, (12, 12, 12))
  nan[2, 2, 2], nan[3, 3, 3] = np.nan, np.inf
  return [
      (str(trunc), "not a readable NIfTI"),
      (str(empty), "file is empty"),
      (str(garbage), "not a readable NIfTI"),
      (_head(tmp_path / "flat.nii.gz", data=np.ones((12, 12))), r"expected a 3D volume"),
      (_head(tmp_path / "frames.nii.gz", data=np.ones((8, 8, 8, 3))), r"expected a 3D volume"),
      (_head(tmp_path / "nan.nii.gz", data=nan), "2 NaN/Inf voxels"),
      (_head(tmp_path / "constant.nii.gz", data=np.full((8, 8, 8), 7.0)), "image is constant"),
      (str(tmp_path / "absent.nii.gz"), "file not found"),
  ]


def test_each_bad_scan_fails_naming_row_and_file_or_is_skipped(tmp_path, smoke_config, capsys):
  good = _good_rows(tmp_path, 2)
  bad = _bad_scans(tmp_path)
  value_rows = [(good[0][0], "v1", "-3", "lesion volume '-3"),      # negative lesion volume
                (good[0][0], "v2", "lots", "'lots' is not a number"),
                (good[0][0], "", "1", "empty path or subject_id")]
  for i, (path, message) in enumerate(bad):
    config = _config(_manifest(tmp_path, [good[0], (path, "b", "1")]),
                     smoke_config.copy_and_resolve_references(), 4)
    workdir = tmp_path / f"fail{i}"
    with pytest.raises(DataError) as info:
      prepare(config, str(workdir))
    assert "scans.csv row 3: " in str(info.value) and path in str(info.value)
    assert re.search(message, str(info.value)), (message, str(info.value))
    assert not os.path.exists(workdir / "data" / "records")
    staged = workdir / "data" / "records.staging"
    assert sorted(os.listdir(staged)) == ["staging.json"]   # the failed shard left nothing
  for path, subject, value, message in value_rows:
    config = _config(_manifest(tmp_path, [good[0], (path, subject, value)]),
                     smoke_config.copy_and_resolve_references(), 4)
    with pytest.raises(DataError, match="scans.csv row 3: ") as info:
      prepare(config, str(tmp_path / "value"))
    assert message in str(info.value)
    assert not os.path.exists(tmp_path / "value" / "data" / "records")
  # One manifest with all of them: --on_error=skip keeps the good rows and lists the rest.
  rows = ([good[0]] + [(p, f"b{i}", "1") for i, (p, _) in enumerate(bad)]
          + [r[:3] for r in value_rows] + [good[1]])
  config = _config(_manifest(tmp_path, rows), smoke_config, 3)
  capsys.readouterr()
  prepare(config, str(tmp_path / "skip"), on_error="skip")
  index = json.load(open(tmp_path / "skip" / "data" / "records" / "dataset.json"))
  assert [r["subject_id"] for r in index["records"]] == ["sub0", "sub1"]
  assert [r["row"] for r in index["records"]] == [2, len(rows) + 1]
  assert [s["row"] for s in index["skipped"]] == list(range(3, len(rows) + 1))
  for item, (path, message) in zip(index["skipped"], bad):
    assert item["path"] == path and "scans.csv row" in item["error"]
    assert re.search(message, item["error"]), (message, item["error"])
  assert index["summary"]["skipped"] == len(bad) + len(value_rows)
  out = capsys.readouterr().out
  assert f"2 records from {len(rows)} manifest rows; {len(bad) + 3} skipped" in out
  assert f"scans.csv row 3: {bad[0][0]}" in out


def test_unknown_diagnosis_and_non_utf8_manifest(tmp_path, smoke_config):
  config = config_base.apply_dataset(smoke_config, "adni")
  good = _head(tmp_path / "a.nii.gz")
  manifest = _manifest(tmp_path, [(good, "a", "AD"), (good, "b", "Dementia-ish")],
                       column="diagnosis")
  config = _config(manifest, config)
  with pytest.raises(DataError, match=r"scans.csv row 3: unknown diagnosis 'Dementia-ish'"):
    prepare(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "data" / "records")
  prepare(config, str(tmp_path / "w"), on_error="skip")
  index = records.load_index(str(tmp_path / "w" / "data" / "records"))
  assert [r["subject_id"] for r in index["records"]] == ["a"] and index["records"][0]["label"] == 2
  assert index["skipped"][0]["row"] == 3 and "Dementia-ish" in index["skipped"][0]["error"]
  latin = tmp_path / "latin1.csv"
  latin.write_bytes(f"path,subject_id,diagnosis\n{good},Jos\xe9,CN\n".encode("latin-1"))
  config.data.manifest = str(latin)
  for on_error in ("fail", "skip"):   # a whole-file problem: no row can be trusted
    with pytest.raises(DataError, match=r"latin1.csv: manifest is not UTF-8"):
      prepare(config, str(tmp_path / "w8"), on_error=on_error)
  assert not os.path.exists(tmp_path / "w8" / "data" / "records")


def test_every_row_skipped_is_an_error_and_writes_nothing(tmp_path, smoke_config):
  config = _config(_manifest(tmp_path, [(str(tmp_path / "x.nii.gz"), "a", "1")]), smoke_config)
  with pytest.raises(DataError, match="every manifest row was skipped"):
    prepare(config, str(tmp_path / "w"), on_error="skip")
  assert not os.path.exists(tmp_path / "w" / "data" / "records" / "dataset.json")

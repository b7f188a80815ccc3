"""Record serialization and the shard folder: round trip, atomicity, index errors."""

import json
import os

import numpy as np
import pytest

from cf3d_jax.data import records
from cf3d_jax.errors import DataError


def _rec(i):
  return {"volume": np.full((2, 2, 2, 1), i, np.float32), "subject_id": f"s{i}", "label": i % 3,
          "clinical_value": float(i), "affine": np.eye(4)}


def test_encode_decode_round_trip():
  rec = _rec(5)
  out = records.decode_record(records.encode_record(rec))
  np.testing.assert_array_equal(out["volume"], rec["volume"])
  assert out["subject_id"].item() == "s5" and int(out["label"]) == 2


def test_write_dataset_and_read_back_with_grain(tmp_path):
  import grain
  folder = str(tmp_path / "records")
  index = records.write_dataset(folder, (_rec(i) for i in range(7)), 3, {"shape": [2, 2, 2]})
  assert len(index["shards"]) == 3 and len(index["records"]) == 7
  loaded = records.load_index(folder)
  src = grain.sources.ArrayRecordDataSource(records.shard_paths(folder, loaded))
  assert len(src) == 7
  for i in range(7):
    assert records.decode_record(src[i])["subject_id"].item() == f"s{i}"
  np.testing.assert_array_equal(records.positions(loaded, {"s1", "s4"}), [1, 4])


def test_failure_midway_leaves_nothing(tmp_path):
  folder = str(tmp_path / "records")

  def broken():
    yield _rec(0)
    raise DataError("scan 1 is bad")

  with pytest.raises(DataError, match="scan 1 is bad"):
    records.write_dataset(folder, broken(), 2, {})
  assert not os.path.exists(folder)
  assert os.listdir(tmp_path) == []


def test_index_errors_name_the_file(tmp_path):
  with pytest.raises(DataError, match="run --mode=prepare"):
    records.load_index(str(tmp_path))
  (tmp_path / "dataset.json").write_text("{not json")
  with pytest.raises(DataError, match="dataset.json"):
    records.load_index(str(tmp_path))
  (tmp_path / "dataset.json").write_text(json.dumps({"meta": {}, "records": [],
                                                     "shards": ["shard-00000.array_record"]}))
  with pytest.raises(DataError, match="shard-00000.array_record"):
    records.load_index(str(tmp_path))


def test_decode_is_zero_copy_for_stored_members_and_reads_compressed_ones():
  import io
  rec = {"volume": np.arange(60, dtype=np.float32).reshape(3, 4, 5, 1), "subject_id": "sub-ü",
         "label": 2, "clinical_value": 1.5, "mask": np.eye(3, dtype=np.uint8),
         "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3))}
  data = records.encode_record(rec)
  out = records.decode_record(data)
  assert set(out) == set(rec)
  for k, v in rec.items():
    np.testing.assert_array_equal(out[k], np.asarray(v))
    assert out[k].dtype == np.asarray(v).dtype and out[k].shape == np.asarray(v).shape
  assert not out["volume"].flags.writeable and not out["volume"].flags.owndata  # a view of data
  buf = io.BytesIO()
  np.savez_compressed(buf, **{k: np.asarray(v) for k, v in rec.items()})
  packed = records.decode_record(buf.getvalue())
  for k, v in rec.items():
    np.testing.assert_array_equal(packed[k], np.asarray(v))

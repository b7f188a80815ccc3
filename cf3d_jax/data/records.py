"""Record shards: one serialized subject per record, ArrayRecord files that grain reads.

A record is a flat dict of NumPy arrays (strings as 0-d unicode arrays) serialized with
`np.savez` (no pickle). Fields written by `prepare`:
  volume `[D, H, W, 1]` float32 in [-1, 1]; affine `[4, 4]` float64 (RAS, of the processed grid);
  subject_id str; label int (class index); clinical_value float (lesion mL or diagnosis code);
  lesion_mask `[D, H, W]` uint8 (phantoms only).
A dataset folder holds `shard-XXXXX.array_record` files and `dataset.json`, which lists every
record (subject_id, label, clinical_value, shard, position), the grid metadata and what was skipped.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from cf3d_jax.errors import DataError
from cf3d_jax.files import atomic_dir, write_text

INDEX_NAME = "dataset.json"


def encode_record(record: Mapping[str, Any]) -> bytes:
  """Serializes a dict of arrays/scalars/strings to bytes (npz, no pickle)."""
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in record.items()})
  return buf.getvalue()


def decode_record(data: bytes) -> dict[str, np.ndarray]:
  """Inverse of `encode_record`; 0-d arrays stay 0-d (use `.item()` for scalars)."""
  with np.load(io.BytesIO(data), allow_pickle=False) as npz:
    return {k: npz[k] for k in npz.files}


def shard_name(i: int) -> str:
  return f"shard-{i:05d}.array_record"


def write_dataset(folder: str, records: Iterable[Mapping[str, Any]], records_per_shard: int,
                  meta: Mapping[str, Any], skipped: list | None = None) -> dict:
  """Writes records into ArrayRecord shards plus `dataset.json`, atomically as a whole folder.

  `records` yields dicts with at least subject_id, label, clinical_value; `skipped` (filled by
  the producer while it is consumed) is stored in the index. Returns the index.
  """
  entries = []
  with atomic_dir(folder) as tmp:
    writer = None
    for i, rec in enumerate(records):
      if i % records_per_shard == 0:
        if writer is not None:
          writer.close()
        writer = ArrayRecordWriter(os.path.join(tmp, shard_name(i // records_per_shard)),
                                   "group_size:1")
      writer.write(encode_record(rec))
      entries.append({"subject_id": str(rec["subject_id"]), "label": int(rec["label"]),
                      "clinical_value": float(rec["clinical_value"]),
                      "shard": shard_name(i // records_per_shard), "position": i})
    if writer is not None:
      writer.close()
    if not entries:
      raise DataError(f"{folder}: no records to write (every input was skipped or none given)")
    num_shards = -(-len(entries) // records_per_shard)
    index = {"meta": dict(meta), "records": entries,
             "shards": [shard_name(s) for s in range(num_shards)], "skipped": skipped or []}
    write_text(os.path.join(tmp, INDEX_NAME), json.dumps(index, indent=1))
  return index


def load_index(folder: str) -> dict:
  """Reads `dataset.json`; DataError naming the file if it is missing or malformed."""
  path = os.path.join(folder, INDEX_NAME)
  if not os.path.exists(path):
    raise DataError(f"{path}: no prepared dataset here; run --mode=prepare first")
  try:
    with open(path, encoding="utf-8") as f:
      index = json.load(f)
    missing = {"meta", "records", "shards"} - set(index)
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: not a readable dataset index ({e})") from e
  if missing:
    raise DataError(f"{path}: dataset index lacks keys {sorted(missing)}")
  for shard in index["shards"]:
    if not os.path.exists(os.path.join(folder, shard)):
      raise DataError(f"{path}: shard {shard} listed but missing from {folder}")
  return index


def shard_paths(folder: str, index: Mapping[str, Any]) -> list[str]:
  """Absolute shard paths in record order (record position = global index over shards)."""
  return [os.path.join(folder, s) for s in index["shards"]]


def positions(index: Mapping[str, Any], subjects: Sequence[str] | set[str]) -> np.ndarray:
  """Global record positions `[n]` of the records whose subject is in `subjects`."""
  keep = set(subjects)
  return np.asarray([r["position"] for r in index["records"] if r["subject_id"] in keep],
                    np.int64)

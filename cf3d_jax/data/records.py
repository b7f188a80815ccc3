"""Record shards: one serialized subject per record, ArrayRecord files that grain reads.

A record is a flat dict of NumPy arrays (strings as 0-d unicode arrays) serialized with
`np.savez` (no pickle). Fields written by `prepare`:
  volume `[D, H, W, 1]` float32 in [-1, 1]; affine `[4, 4]` float64 (RAS, of the processed grid);
  subject_id str; label int (class index); clinical_value float (lesion mL or diagnosis code);
  lesion_mask `[D, H, W]` uint8 (phantoms only).
Latent datasets (`prepare_latents`, `data/latents/`) keep the same fields but `volume` holds the
VAE latent `[D/f, H/f, W/f, C_lat]` float32 (unscaled; the scale factor is in the meta).
A dataset folder holds `shard-XXXXX.array_record` files and `dataset.json`, which lists every
record (subject_id, label, clinical_value, shard, position), the grid metadata and what was skipped.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from cf3d_jax.errors import DataError
from cf3d_jax.files import atomic_dir, write_text

INDEX_NAME = "dataset.json"
# One record per chunk (random access) compressed with snappy: on brain volumes (half background)
# it reads 1.6× faster than ArrayRecord's default zstd:3 for ~15% more disk (3.3 vs 2.8 MiB per
# 128³ record; docs/benchmarks.md, "Input pipeline"). Readers detect the compression themselves.
WRITER_OPTIONS = "group_size:1,snappy"


def encode_record(record: Mapping[str, Any]) -> bytes:
  """Serializes a dict of arrays/scalars/strings to bytes (npz, no pickle)."""
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in record.items()})
  return buf.getvalue()


def decode_record(data: bytes) -> dict[str, np.ndarray]:
  """Inverse of `encode_record`; 0-d arrays stay 0-d (use `.item()` for scalars).

  Zero-copy: each array is a read-only view into `data` (np.savez stores members uncompressed),
  which saves several copies per volume (a 256³ volume decodes in microseconds, not ~0.2 s).
  Falls back to `np.load` for anything else (compressed members, string arrays).
  """
  view = memoryview(data)
  out = {}
  with zipfile.ZipFile(io.BytesIO(data)) as zf:
    for info in zf.infolist():
      name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
      array = _stored_npy(view, info) if info.compress_type == zipfile.ZIP_STORED else None
      if array is None:
        with zf.open(info) as f:
          array = np.lib.format.read_array(f, allow_pickle=False)
      out[name] = array
  return out


def _stored_npy(view: memoryview, info: zipfile.ZipInfo) -> np.ndarray | None:
  """The .npy member `info` of a stored (uncompressed) zip as a read-only view, or None."""
  offset = info.header_offset
  name_len, extra_len = struct.unpack("<HH", view[offset + 26:offset + 30])
  start = offset + 30 + name_len + extra_len
  member = view[start:start + info.file_size]
  header = io.BytesIO(member[:min(len(member), 65536 + 16)].tobytes())
  version = np.lib.format.read_magic(header)
  if version == (1, 0):
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(header)
  elif version in ((2, 0), (3, 0)):
    shape, fortran, dtype = np.lib.format.read_array_header_2_0(header)
  else:
    return None
  if dtype.hasobject or fortran:
    return None
  count = int(np.prod(shape, dtype=np.int64))
  return np.frombuffer(member, dtype, count, offset=header.tell()).reshape(shape)


def shard_name(i: int) -> str:
  return f"shard-{i:05d}.array_record"


def write_dataset(folder: str, records: Iterable[Mapping[str, Any]], records_per_shard: int,
                  meta: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
                  skipped: list | None = None) -> dict:
  """Writes records into ArrayRecord shards plus `dataset.json`, atomically as a whole folder.

  `records` yields dicts with at least subject_id, label, clinical_value; `skipped` (filled by
  the producer while it is consumed) is stored in the index. `meta` may be a function, called
  once every record is written (for statistics gathered while writing). Returns the index.
  """
  entries = []
  with atomic_dir(folder) as tmp:
    writer = None
    for i, rec in enumerate(records):
      if i % records_per_shard == 0:
        if writer is not None:
          writer.close()
        writer = ArrayRecordWriter(os.path.join(tmp, shard_name(i // records_per_shard)),
                                   WRITER_OPTIONS)
      writer.write(encode_record(rec))
      entries.append({"subject_id": str(rec["subject_id"]), "label": int(rec["label"]),
                      "clinical_value": float(rec["clinical_value"]),
                      "shard": shard_name(i // records_per_shard), "position": i})
    if writer is not None:
      writer.close()
    if not entries:
      raise DataError(f"{folder}: no records to write (every input was skipped or none given)")
    num_shards = -(-len(entries) // records_per_shard)
    meta = meta() if callable(meta) else meta
    index = {"meta": dict(meta), "records": entries,
             "shards": [shard_name(s) for s in range(num_shards)], "skipped": skipped or []}
    write_text(os.path.join(tmp, INDEX_NAME), json.dumps(index, indent=1))
  return index


def entry(rec: Mapping[str, Any]) -> dict:
  """The dataset.json entry of a record (without shard and position)."""
  return {"subject_id": str(rec["subject_id"]), "label": int(rec["label"]),
          "clinical_value": float(rec["clinical_value"])}


class ShardWriter:
  """Writes one ArrayRecord shard under a temporary name; `commit()` renames it into place.

  Use as a context manager: leaving the block without `commit()` (an exception) removes the
  temporary file, so a shard is either complete under its name or absent.
  """

  def __init__(self, path: str):
    self.path = path
    folder, base = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    self._tmp = os.path.join(folder, f".tmp-{os.getpid()}-{base}")
    self._writer = ArrayRecordWriter(self._tmp, WRITER_OPTIONS)
    self.count = 0

  def write(self, rec: Mapping[str, Any]) -> None:
    self._writer.write(encode_record(rec))
    self.count += 1

  def commit(self) -> None:
    self._writer.close()
    self._writer = None
    os.replace(self._tmp, self.path)

  def __enter__(self) -> "ShardWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    if os.path.exists(self._tmp):
      os.remove(self._tmp)


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

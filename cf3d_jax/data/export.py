"""Export prepared subjects of one split as NIfTI files plus a source CSV.

Use: the held-out phantoms become "real" scans with known ground truth, ready for real-subject
counterfactuals (`--mode=sample --config.sample.source=OUT/sources.csv`):

  python -m cf3d_jax.data.export --workdir=runs/demo --split=test --limit=4 --out=runs/demo/test_scans

Writes `OUT/{subject_id}.nii.gz` (the prepared volume, in [-1, 1], with the grid's affine) and
`OUT/sources.csv` with columns path, subject_id, label and `lesion_volume_ml` (MS) or
`diagnosis` (ADNI), so each scan's factual prompt follows from its class. The split is the one
training uses (`pipeline.split_subjects` with the run's seed and fractions).
"""

from __future__ import annotations

import csv
import io
import os

from absl import app, flags

from cf3d_jax.data import nifti, records
from cf3d_jax.data.pipeline import split_subjects
from cf3d_jax.errors import Cf3dError, ConfigError
from cf3d_jax.files import write_text
from cf3d_jax.text import prompts as prompt_lib

SPLITS = ("train", "val", "test")


def export_split(data_dir: str, split: str, out_dir: str, *, seed: int = 0,
                 fractions=(0.7, 0.15, 0.15), limit: int = 0) -> str:
  """Writes the split's records under out_dir; returns the CSV path. limit 0 = all."""
  from array_record.python.array_record_module import ArrayRecordReader
  if split not in SPLITS:
    raise ConfigError(f"split {split!r}: expected one of {SPLITS}")
  index = records.load_index(data_dir)
  dataset = index["meta"].get("dataset", "ms")
  subjects = split_subjects([r["subject_id"] for r in index["records"]], fractions, seed)[split]
  wanted = [r for r in index["records"] if r["subject_id"] in set(subjects)]
  wanted.sort(key=lambda r: r["subject_id"])
  if limit:
    wanted = wanted[:limit]
  os.makedirs(out_dir, exist_ok=True)
  rows = []
  for r in wanted:
    reader = ArrayRecordReader(os.path.join(data_dir, r["shard"]))
    first = min(e["position"] for e in index["records"] if e["shard"] == r["shard"])
    rec = records.decode_record(reader.read([r["position"] - first])[0])
    reader.close()
    name = f"{r['subject_id']}.nii.gz"
    nifti.save_volume(os.path.join(out_dir, name), rec["volume"][..., 0], rec["affine"])
    row = {"path": name, "subject_id": r["subject_id"], "label": r["label"]}
    if dataset == "ms":
      row["lesion_volume_ml"] = f"{r['clinical_value']:.4f}"
    else:
      row["diagnosis"] = prompt_lib.ADNI_CLASSES[r["label"]]
    rows.append(row)
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["path"])
  writer.writeheader()
  writer.writerows(rows)
  path = os.path.join(out_dir, "sources.csv")
  write_text(path, buf.getvalue())
  return path


_WORKDIR = flags.DEFINE_string("workdir", None, "run folder holding data/records")
_SPLIT = flags.DEFINE_enum("split", "test", list(SPLITS), "which split to export")
_OUT = flags.DEFINE_string("out", None, "output folder")
_LIMIT = flags.DEFINE_integer("limit", 0, "at most this many subjects (0 = all)")
_SEED = flags.DEFINE_integer("seed", 0, "the run's config.seed (fixes the split)")


def main(argv):
  del argv
  try:
    path = export_split(os.path.join(_WORKDIR.value, "data", "records"), _SPLIT.value,
                        _OUT.value, seed=_SEED.value, limit=_LIMIT.value)
  except Cf3dError as e:
    raise SystemExit(f"error: {e}") from None
  print(path)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)

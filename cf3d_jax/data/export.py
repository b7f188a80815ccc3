"""Export prepared subjects of one split as NIfTI files plus a source CSV.

Use: the held-out phantoms become "real" scans with known ground truth, ready for real-subject
counterfactuals (`--mode=sample --config.sample.source=OUT/sources.csv`):

  python -m cf3d_jax.data.export --workdir=runs/demo --split=test --limit=4 --out=runs/demo/test_scans

Writes `OUT/{slug(subject_id)}.nii.gz` (the prepared volume, in [-1, 1], with the grid's affine) and
`OUT/sources.csv` with columns path, subject_id, label and `lesion_volume_ml` (MS) or
`diagnosis` (ADNI), so each scan's factual prompt follows from its class. The split is the one
training uses (`pipeline.split_subjects` with the run's seed and fractions). File names are the
slug of the id (`files.slug`: lower-case letters, digits, '-'), with '-2', '-3', … for a second
record of one subject, and every file is checked to lie inside OUT.
"""

from __future__ import annotations

import csv
import io
import os

from absl import app, flags

from cf3d_jax.data import nifti, records
from cf3d_jax.data.pipeline import split_subjects
from cf3d_jax.errors import Cf3dError, ConfigError
from cf3d_jax.files import check_inside, unique_slug, write_text
from cf3d_jax.text import prompts as prompt_lib
from cf3d_jax.workdir import Workdir

SPLITS = ("train", "val", "test")


def split_entries(index: dict, split: str, seed: int, fractions) -> list[dict]:
  """The dataset.json entries of `split` (the training split rule), sorted by subject id."""
  if split not in SPLITS:
    raise ConfigError(f"split {split!r}: expected one of {SPLITS}")
  subjects = set(split_subjects([r["subject_id"] for r in index["records"]], fractions,
                                seed)[split])
  return sorted((r for r in index["records"] if r["subject_id"] in subjects),
                key=lambda r: r["subject_id"])


def read_records(data_dir: str, index: dict, entries: list[dict]) -> list[dict]:
  """Decoded records (see `records`) of the given dataset.json entries, in their order."""
  from array_record.python.array_record_module import ArrayRecordReader
  first = {}
  for e in index["records"]:
    first[e["shard"]] = min(first.get(e["shard"], e["position"]), e["position"])
  out = []
  for shard in sorted({e["shard"] for e in entries}):
    reader = ArrayRecordReader(os.path.join(data_dir, shard))
    mine = [e for e in entries if e["shard"] == shard]
    for e, data in zip(mine, reader.read([e["position"] - first[shard] for e in mine])):
      out.append((e["position"], records.decode_record(data)))
    reader.close()
  order = {e["position"]: i for i, e in enumerate(entries)}
  return [rec for _, rec in sorted(out, key=lambda pr: order[pr[0]])]


def export_split(data_dir: str, split: str, out_dir: str, *, seed: int = 0,
                 fractions=(0.7, 0.15, 0.15), limit: int = 0) -> str:
  """Writes the split's records under out_dir; returns the CSV path. limit 0 = all."""
  index = records.load_index(data_dir)
  dataset = index["meta"].get("dataset", "ms")
  wanted = split_entries(index, split, seed, fractions)
  if limit:
    wanted = wanted[:limit]
  os.makedirs(out_dir, exist_ok=True)
  rows, used = [], set()
  for r, rec in zip(wanted, read_records(data_dir, index, wanted)):
    # Named by the slug of the id, made unique: an id is never a path, and two records of one
    # subject get two files.
    name = unique_slug(str(r["subject_id"]), used) + ".nii.gz"
    path = check_inside(os.path.join(out_dir, name), out_dir)
    nifti.save_volume(path, rec["volume"][..., 0], rec["affine"])
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


def main(argv):
  del argv
  f = flags.FLAGS
  try:
    path = export_split(Workdir(f.workdir).records, f.split, f.out,
                        seed=f.seed, limit=f.limit)
  except Cf3dError as e:
    raise SystemExit(f"error: {e}") from None
  print(path)


if __name__ == "__main__":
  # Flags are defined only when run as a program: evaluate/classifier import this module.
  flags.DEFINE_string("workdir", None, "run folder holding data/records")
  flags.DEFINE_enum("split", "test", list(SPLITS), "which split to export")
  flags.DEFINE_string("out", None, "output folder")
  flags.DEFINE_integer("limit", 0, "at most this many subjects (0 = all)")
  flags.DEFINE_integer("seed", 0, "the run's config.seed (fixes the split)")
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)

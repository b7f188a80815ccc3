"""`--mode=prepare`: write the record shards and the embedding table into `WORKDIR/data/`.

Layout: `data/records/` (shards + dataset.json, see `records`), `data/text_table.npz`,
`data/reference.npz` (phantoms: the grid and template maps the lesion rule needs).
Each piece is written atomically and skipped when already complete, so an interrupted prepare
re-runs cleanly. Sources: `phantom` (synthetic MS FLAIR or, for dataset 'adni', AD T1; ground
truth stored per subject) and `manifest` (a CSV of NIfTI scans; see `read_manifest`).
"""

from __future__ import annotations

import csv
import os
from typing import Iterator

import numpy as np
from absl import logging

from cf3d_jax.data import nifti, phantoms, records
from cf3d_jax.errors import ConfigError, DataError
from cf3d_jax.text import prompts as prompt_lib
from cf3d_jax.text.table import EmbeddingTable, builtin_table_path, load_table

MANIFEST_COLUMNS = {"ms": "lesion_volume_ml", "adni": "diagnosis"}


def data_paths(workdir: str) -> dict[str, str]:
  data = os.path.join(workdir, "data")
  return {"data": data, "records": os.path.join(data, "records"),
          "table": os.path.join(data, "text_table.npz"),
          "reference": os.path.join(data, "reference.npz")}


def phantom_classes(num_subjects: int, fractions, seed: int, dataset: str = "ms") -> list[str]:
  """Class of each phantom subject of `dataset` ('ms' | 'adni'): counts ∝ fractions (≥ 1 each),
  order shuffled by seed."""
  classes = prompt_lib.CLASSES[dataset]
  if len(fractions) != len(classes):
    raise ConfigError(f"config.data.class_fractions={tuple(fractions)!r}: expected one fraction "
                      f"per {dataset} class {list(classes)}")
  counts = np.maximum(1, np.floor(np.asarray(fractions) * num_subjects).astype(int))
  counts[0] += num_subjects - counts.sum()
  labels = np.repeat(np.arange(len(classes)), counts)
  np.random.default_rng([seed, 11]).shuffle(labels)
  return [classes[i] for i in labels]


def _phantom_records(config, reference: phantoms.Reference) -> Iterator[dict]:
  """Synthetic subjects: MS FLAIR (label: lesion class, clinical_value: lesion mL, lesion_mask)
  or, for dataset 'adni', AD T1 (label: CN/MCI/AD, clinical_value: lateral ventricle mL,
  ventricle_mask)."""
  from tqdm import tqdm
  dataset = config.data.dataset
  classes = phantom_classes(config.data.num_subjects, config.data.class_fractions, config.seed,
                            dataset)
  p = config.data.phantom
  for i, cls in enumerate(tqdm(classes, desc="phantoms", unit="subject")):
    rng = np.random.default_rng([config.seed, 13, i])
    if dataset == "adni":
      subj = phantoms.make_ad_subject(reference, cls, rng, deform_mm=p.deform_mm,
                                      bias_strength=p.bias_strength, noise_std=p.noise_std)
      extra = {"clinical_value": subj["ventricle_volume_ml"],
               "ventricle_mask": subj["ventricle_mask"]}
    else:
      subj = phantoms.make_ms_subject(reference, cls, rng, deform_mm=p.deform_mm,
                                      bias_strength=p.bias_strength, noise_std=p.noise_std,
                                      lesion_radius_mm=tuple(p.lesion_radius_mm))
      extra = {"clinical_value": subj["lesion_volume_ml"], "lesion_mask": subj["lesion_mask"]}
    yield {"volume": subj["volume"][..., None], "affine": reference.affine,
           "subject_id": f"phantom-{i:05d}", "label": prompt_lib.CLASSES[dataset].index(cls),
           **extra}


def read_manifest(path: str, dataset: str) -> list[dict]:
  """Rows of the manifest CSV with `label` and `clinical_value` added.

  Required columns: path, subject_id, and lesion_volume_ml (ms) or diagnosis (adni). Relative
  paths are relative to the CSV's folder. Errors name the file and the row (1-based, header = 1).
  """
  if not os.path.exists(path):
    raise DataError(f"{path}: manifest not found")
  try:
    with open(path, newline="", encoding="utf-8") as f:
      rows = list(csv.DictReader(f))
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: manifest is not UTF-8 text ({e})") from e
  needed = {"path", "subject_id", MANIFEST_COLUMNS[dataset]}
  if not rows:
    raise DataError(f"{path}: manifest has no rows")
  missing = needed - set(rows[0])
  if missing:
    raise DataError(f"{path}: manifest lacks column(s) {sorted(missing)}; has {sorted(rows[0])}")
  base = os.path.dirname(os.path.abspath(path))
  out = []
  for n, row in enumerate(rows, start=2):
    where = f"{path} row {n}"
    try:
      if dataset == "ms":
        value = float(row["lesion_volume_ml"])
        cls = prompt_lib.lesion_class(value)
        label = prompt_lib.MS_CLASSES.index(cls)
      else:
        cls = prompt_lib.diagnosis_class(row["diagnosis"])
        label = prompt_lib.ADNI_CLASSES.index(cls)
        value = float(label)
    except (ValueError, DataError) as e:
      raise DataError(f"{where}: {e}") from e
    scan = row["path"] if os.path.isabs(row["path"]) else os.path.join(base, row["path"])
    out.append({"path": scan, "subject_id": row["subject_id"], "label": label,
                "clinical_value": value, "row": n})
  return out


def _manifest_records(config, rows: list[dict], on_error: str, skipped: list) -> Iterator[dict]:
  """Loads and conforms each scan; with on_error='skip' bad scans are recorded and passed over."""
  from tqdm import tqdm
  for row in tqdm(rows, desc="scans", unit="scan"):
    try:
      data, affine = nifti.load_volume(row["path"])
      try:
        volume, grid = nifti.conform(data, affine, config.data.shape, config.data.fov_mm,
                                     config.data.intensity_percentiles)
      except DataError as e:
        raise DataError(f"{row['path']}: {e}") from e
    except DataError as e:
      if on_error != "skip":
        raise DataError(f"{config.data.manifest} row {row['row']}: {e}") from e
      logging.warning("skipping manifest row %d: %s", row["row"], e)
      skipped.append({"row": row["row"], "path": row["path"], "error": str(e)})
      continue
    yield {"volume": volume[..., None], "affine": grid, "subject_id": row["subject_id"],
           "label": row["label"], "clinical_value": row["clinical_value"]}


def table_source(config) -> str:
  """The .npz path that `config.text.table` names ('builtin:NAME' or a path)."""
  src = config.text.table
  if src.startswith("builtin:"):
    return builtin_table_path(src[len("builtin:"):])
  if not src:
    raise ConfigError("config.text.table is empty: embed the prompts first with "
                      "`python -m cf3d_jax.text.embed` and point config.text.table at the .npz")
  return src


def prepare_table(config, path: str) -> EmbeddingTable:
  """Copies `config.text.table` into the workdir after checking it covers every prompt needed."""
  table = load_table(table_source(config))
  for p in list(prompt_lib.prompts_for(config.data.dataset)) + list(config.sample.prompts):
    table.index(p)  # PromptError naming the table and the prompt.
  if not os.path.exists(path):
    table.save(path)
  return load_table(path)


def prepare(config, workdir: str, on_error: str = "fail") -> None:
  """Writes whatever of data/ is missing (records, reference, text table).

  on_error: 'fail' stops at the first bad scan with nothing half-written; 'skip' records it
  under `skipped` in dataset.json and goes on.
  """
  paths = data_paths(workdir)
  os.makedirs(paths["data"], exist_ok=True)
  prepare_table(config, paths["table"])
  if config.data.source == "phantom" and not os.path.exists(paths["reference"]):
    reference = phantoms.make_reference(tuple(config.data.shape), config.data.fov_mm)
    phantoms.save_reference(reference, paths["reference"])
  if os.path.exists(os.path.join(paths["records"], records.INDEX_NAME)):
    logging.info("records already prepared in %s", paths["records"])
    return
  meta = {"source": config.data.source, "dataset": config.data.dataset,
          "shape": list(config.data.shape), "fov_mm": config.data.fov_mm,
          "classes": list(prompt_lib.CLASSES[config.data.dataset])}
  skipped: list = []
  if config.data.source == "phantom":
    reference = phantoms.load_reference(paths["reference"])
    meta["affine"] = reference.affine.tolist()
    recs = _phantom_records(config, reference)
  else:
    rows = read_manifest(config.data.manifest, config.data.dataset)
    recs = _manifest_records(config, rows, on_error, skipped)
  index = records.write_dataset(paths["records"], recs, config.data.records_per_shard, meta,
                                skipped)
  logging.info("wrote %d records to %s (%d skipped)", len(index["records"]), paths["records"],
               len(skipped))

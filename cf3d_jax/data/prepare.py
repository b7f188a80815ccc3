"""`--mode=prepare`: write the record shards and the embedding table into `WORKDIR/data/`.

Layout: `data/records/` (shards + dataset.json, see `records`), `data/text_table.npz`,
`data/reference.npz` (phantoms: the grid and template maps the lesion rule needs).
Each piece is written atomically and skipped when already complete, so an interrupted prepare
re-runs cleanly. Sources: `phantom` (synthetic MS FLAIR or, for dataset 'adni', AD T1; ground
truth stored per subject) and `manifest` (a CSV of NIfTI scans, conformed in parallel and
resumably by `ingest.ingest_manifest`; see `ingest.read_manifest` for the columns).
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
from absl import logging

from cf3d_jax import fingerprint
from cf3d_jax.data import ingest, phantom_reference, phantoms, records
from cf3d_jax.errors import ConfigError
from cf3d_jax.text import prompts as prompt_lib
from cf3d_jax.text.table import EmbeddingTable, builtin_table_path, load_table
from cf3d_jax.workdir import Workdir


MANIFEST_COLUMNS = ingest.MANIFEST_COLUMNS   # kept here for callers of the earlier API
read_manifest = ingest.read_manifest


def data_paths(workdir: str) -> dict[str, str]:
  """{data, records, table, reference} paths of `workdir`; kept for callers of the earlier API
  (use `Workdir(workdir)`)."""
  wd = Workdir(workdir)
  return {"data": wd.data, "records": wd.records, "table": wd.table, "reference": wd.reference}


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


def _phantom_records(config, reference: phantom_reference.Reference) -> Iterator[dict]:
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

  Records already prepared with other data keys (`fingerprint`, recorded in dataset.json) are a
  ConfigError listing them, unless `config.train.allow_config_change` allows each.

  on_error: 'fail' stops at the first bad manifest row or scan with no dataset.json written
  (finished shards stay staged for a resumed run); 'skip' records the row under `skipped` in
  dataset.json (and prints it in the closing summary) and goes on.
  """
  wd = Workdir(workdir)
  index_path = os.path.join(wd.records, records.INDEX_NAME)
  if os.path.exists(index_path):
    stored = records.load_index(wd.records)["meta"].get("config")
    fingerprint.check(stored, config, ("data",), wd.records)
    changed = stored is not None and stored.get("text.table") != config.text.table
    if changed and os.path.exists(wd.table):
      os.remove(wd.table)       # text.table change allowed: copy the new table below
  os.makedirs(wd.data, exist_ok=True)
  prepare_table(config, wd.table)
  if config.data.source == "phantom" and not os.path.exists(wd.reference):
    reference = phantom_reference.make_reference(tuple(config.data.shape), config.data.fov_mm)
    phantom_reference.save_reference(reference, wd.reference)
  if os.path.exists(os.path.join(wd.records, records.INDEX_NAME)):
    logging.info("records already prepared in %s", wd.records)
    return
  meta = {"source": config.data.source, "dataset": config.data.dataset,
          "shape": list(config.data.shape), "fov_mm": config.data.fov_mm,
          "classes": list(prompt_lib.CLASSES[config.data.dataset]),
          "config": fingerprint.record(config, "data")}
  if config.data.source == "phantom":
    reference = phantom_reference.load_reference(wd.reference)
    meta["affine"] = reference.affine.tolist()
    index = records.write_dataset(wd.records, _phantom_records(config, reference),
                                  config.data.records_per_shard, meta)
  else:
    meta["intensity_percentiles"] = list(config.data.intensity_percentiles)
    index = ingest.ingest_manifest(config.data, wd.records, on_error, meta)
  logging.info("wrote %d records to %s (%d skipped)", len(index["records"]), wd.records,
               len(index["skipped"]))

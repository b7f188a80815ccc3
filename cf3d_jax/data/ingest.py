"""Manifest ingestion for `--mode=prepare` with `data.source='manifest'`: parallel, resumable.

The manifest's data rows are cut, in order, into chunks of `data.records_per_shard` rows; chunk k
becomes shard k. Scans are loaded and conformed (`nifti.load_volume`, `nifti.conform`) by a pool
of `data.prepare_workers` processes; the main process writes each shard in manifest order, so
the records and their order do not depend on the worker count. Progress: one bar over scans.

Resuming: shards are written into `records.staging/` next to the final folder, each atomically
(`shard-KKKKK.array_record`, then `shard-KKKKK.json` with its entries and skipped rows — the json
marks the shard complete). `staging.json` holds a fingerprint of the parsed manifest rows and of
the config keys that shape a record; a re-run with the same fingerprint keeps the complete shards
and does only the rest; a different fingerprint discards the staging with a warning saying why.
Once every shard is complete the final folder (shards + dataset.json) is assembled atomically
and the staging removed. A replaced scan file under an unchanged manifest is not detected:
delete `records.staging/` to redo it.

on_error='fail' stops at the first bad row in manifest order (DataError naming the CSV, the row
and the file): no dataset.json, only complete shards in the staging. 'skip' records each bad row
(row, path, error) in the shard's json and in dataset.json's `skipped`, and goes on.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import csv
import hashlib
import json
import multiprocessing
import os
import shutil
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from absl import logging

from cf3d_jax.data import nifti, records
from cf3d_jax.errors import DataError, PromptError
from cf3d_jax.files import atomic_dir, write_text
from cf3d_jax.text import prompts as prompt_lib

MANIFEST_COLUMNS = {"ms": "lesion_volume_ml", "adni": "diagnosis"}
STAGING_SUFFIX = ".staging"
STAGING_NAME = "staging.json"
FORMAT_VERSION = 1          # bump when the record content changes: invalidates old staging
MAX_AUTO_WORKERS = 16       # data.prepare_workers = -1 → min(os.cpu_count(), this)


def check_subject_id(subject_id: str) -> str:
  """`subject_id` if it can never act as a path (it names exported files): DataError for '/',
  '\\', '..', '.' alone, a leading '~', NUL or other control characters."""
  bad = ("/" in subject_id or "\\" in subject_id or ".." in subject_id or subject_id == "."
         or subject_id.startswith("~") or any(ord(ch) < 32 for ch in subject_id))
  if bad:
    raise DataError(f"subject_id {subject_id!r}: must not contain '/', '\\', '..', a leading "
                    "'~' or control characters (NUL included); use letters, digits, '-', '_'")
  return subject_id


def read_manifest(path: str, dataset: str, collect_errors: bool = False) -> list[dict]:
  """Rows of the manifest CSV with `label` and `clinical_value` added.

  Required columns: path, subject_id, and lesion_volume_ml (ms) or diagnosis (adni). Relative
  paths are relative to the CSV's folder. Problems with the whole file (missing, not UTF-8, no
  rows, a missing column) always raise DataError naming the file. A bad row (empty path or
  subject, a subject_id that could act as a path (`check_subject_id`), lesion volume not a number ≥ 0, unknown diagnosis) raises DataError naming the file
  and the row (1-based, header = 1), or with `collect_errors` is returned with an `error` key.
  """
  if not os.path.exists(path):
    raise DataError(f"{path}: manifest not found")
  try:
    with open(path, newline="", encoding="utf-8") as f:
      rows = list(csv.DictReader(f))
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: manifest is not UTF-8 text ({e}); re-save it as UTF-8") from e
  except csv.Error as e:
    raise DataError(f"{path}: not a readable CSV ({e})") from e
  needed = {"path", "subject_id", MANIFEST_COLUMNS[dataset]}
  if not rows:
    raise DataError(f"{path}: manifest has no rows")
  missing = needed - set(rows[0])
  if missing:
    raise DataError(f"{path}: manifest lacks column(s) {sorted(missing)}; has {sorted(rows[0])}")
  base = os.path.dirname(os.path.abspath(path))
  out = []
  for n, row in enumerate(rows, start=2):
    scan = (row.get("path") or "").strip()
    scan = scan if not scan or os.path.isabs(scan) else os.path.join(base, scan)
    item = {"path": scan, "subject_id": (row.get("subject_id") or "").strip(), "row": n,
            "label": -1, "clinical_value": float("nan")}
    try:
      if not scan or not item["subject_id"]:
        raise DataError("empty path or subject_id")
      check_subject_id(item["subject_id"])
      if dataset == "ms":
        cls = prompt_lib.lesion_class((row["lesion_volume_ml"] or "").strip())
        value = float(row["lesion_volume_ml"])
        label = prompt_lib.MS_CLASSES.index(cls)
      else:
        cls = prompt_lib.diagnosis_class(row["diagnosis"])
        label = prompt_lib.ADNI_CLASSES.index(cls)
        value = float(label)
    except (ValueError, TypeError, PromptError, DataError) as e:
      if not collect_errors:
        raise DataError(f"{path} row {n}: {e}") from e
      item["error"] = f"{path} row {n}: {e}"
    else:
      item.update(label=label, clinical_value=value)
    out.append(item)
  return out


def fingerprint(rows: Sequence[Mapping[str, Any]], data_config) -> str:
  """SHA-256 of what determines the records: the parsed rows and the grid/intensity keys."""
  payload = {"format": FORMAT_VERSION, "dataset": data_config.dataset,
             "shape": [int(s) for s in data_config.shape], "fov_mm": float(data_config.fov_mm),
             "percentiles": [float(p) for p in data_config.intensity_percentiles],
             "records_per_shard": int(data_config.records_per_shard),
             "max_scan_gb": float(data_config.max_scan_gb),
             "rows": [[r["row"], r["path"], r["subject_id"], r["label"],
                       repr(r["clinical_value"]), r.get("error", "")] for r in rows]}
  return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def resolve_workers(requested: int) -> int:
  """data.prepare_workers → process count: -1 = min(os.cpu_count(), MAX_AUTO_WORKERS)."""
  if requested < 0:
    return max(1, min(os.cpu_count() or 1, MAX_AUTO_WORKERS))
  return requested


def conform_scan(path: str, shape: Sequence[int], fov_mm: float, percentiles: Sequence[float],
                 max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Load + conform one scan (runs in a worker): (volume `[D, H, W, 1]` float32, affine `[4, 4]`).

  DataError messages name the file; `max_bytes` caps the size the header may claim."""
  data, affine = nifti.load_volume(path, max_bytes)
  try:
    volume, grid = nifti.conform(data, affine, shape, fov_mm, percentiles)
  except DataError as e:
    raise DataError(f"{path}: {e}") from e
  return volume[..., None], grid


def _shard_json(staging: str, k: int) -> str:
  return os.path.join(staging, records.shard_name(k).replace(".array_record", ".json"))


def _open_staging(staging: str, fp: str, manifest: str) -> None:
  """Creates `staging` for fingerprint `fp`, discarding (with a warning) one made for another."""
  meta_path = os.path.join(staging, STAGING_NAME)
  if os.path.isdir(staging):
    try:
      with open(meta_path, encoding="utf-8") as f:
        old = json.load(f).get("fingerprint")
    except (OSError, ValueError):
      old = None
    if old != fp:
      done = len([n for n in os.listdir(staging) if n.endswith(".json") and n != STAGING_NAME])
      message = (f"{staging}: partial prepare from a different manifest or data config "
                 f"(fingerprint {str(old)[:12]} ≠ {fp[:12]}: {manifest} or data.shape/fov_mm/"
                 f"intensity_percentiles/records_per_shard changed); discarding its {done} "
                 "finished shard(s) and starting over")
      logging.warning(message)
      print(f"warning: {message}", flush=True)
      shutil.rmtree(staging)
  os.makedirs(staging, exist_ok=True)
  if not os.path.exists(meta_path):
    write_text(meta_path, json.dumps({"fingerprint": fp, "manifest": manifest}, indent=1))


def _load_done(staging: str, k: int, fp: str, on_error: str) -> dict | None:
  """The staged shard k's json if complete for `fp` (in fail mode: only if it skipped nothing)."""
  path = _shard_json(staging, k)
  if not os.path.exists(path) or not os.path.exists(os.path.join(staging, records.shard_name(k))):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      done = json.load(f)
  except (OSError, ValueError):
    return None
  if done.get("fingerprint") != fp or (on_error == "fail" and done["skipped"]):
    return None
  return done


class _Pool:
  """Ordered results of `conform_scan` over rows: in-process, or a process pool reading ahead
  at most 2 × workers scans (bounded memory; results consumed in submission order)."""

  def __init__(self, workers: int, args: tuple, fn: Callable | None = None):
    self.args = args
    self.fn = fn or _try_conform   # a picklable (module-level) function: row, *args → result
    self.workers = workers
    self.executor = None
    if workers > 1:
      self.executor = concurrent.futures.ProcessPoolExecutor(
          workers, mp_context=multiprocessing.get_context("spawn"))
    self.window = 2 * max(workers, 1)

  def results(self, rows: Sequence[dict]):
    """Yields (row, (volume, affine) | DataError) in order."""
    if self.executor is None:
      for row in rows:
        yield row, self.fn(row, *self.args)
      return
    pending: list = []
    it = iter(rows)
    for row in it:
      pending.append((row, self._submit(row)))
      if len(pending) >= self.window:
        break
    while pending:
      row, future = pending.pop(0)
      nxt = next(it, None)
      if nxt is not None:
        pending.append((nxt, self._submit(nxt)))
      try:
        if future is None:
          raise concurrent.futures.process.BrokenProcessPool("submitted to a broken pool")
        result = future.result()
      except concurrent.futures.process.BrokenProcessPool:
        # A worker died (e.g. killed for memory) and took every future in flight with it. The
        # pool restarts and this row runs alone in it, twice at most: dying alone twice is its
        # own death and fails only this row. Then the rows in flight are submitted again.
        result = self._run_alone(row)
        pending = [(r, self._submit(r)) for r, _ in pending]
      yield row, result

  def _submit(self, row: dict):
    """The row's future, or None when the pool is broken (handled when the row is next)."""
    try:
      return self.executor.submit(self.fn, row, *self.args)
    except concurrent.futures.process.BrokenProcessPool:
      return None

  def _run_alone(self, row: dict):
    """Runs one row in a fresh pool (two tries); a DataError if its worker dies both times."""
    error = None
    for _ in range(2):
      self._restart()
      try:
        return self.executor.submit(self.fn, row, *self.args).result()
      except concurrent.futures.process.BrokenProcessPool as e:
        error = e
    self._restart()
    return DataError(f"{row['path']}: the worker process died while conforming it "
                     f"(out of memory?): {error}")

  def _restart(self) -> None:
    logging.warning("prepare worker pool broke; restarting it")
    self.executor.shutdown(wait=False, cancel_futures=True)
    self.executor = concurrent.futures.ProcessPoolExecutor(
        self.workers, mp_context=multiprocessing.get_context("spawn"))

  def close(self) -> None:
    if self.executor is not None:
      self.executor.shutdown(wait=True, cancel_futures=True)


def _try_conform(row: dict, shape, fov_mm, percentiles, max_bytes=None):
  """conform_scan, with a row's CSV error or any failure (DataError, MemoryError, a library's
  exception) returned as a DataError naming the file (not raised), so skip mode records it."""
  if "error" in row:
    return DataError(row["error"])
  try:
    return conform_scan(row["path"], shape, fov_mm, percentiles, max_bytes)
  except DataError as e:
    return e
  except Exception as e:  # MemoryError included: one bad scan must not end the prepare
    return DataError(f"{row['path']}: {type(e).__name__} while conforming: {e}")


def ingest_manifest(data_config, folder: str, on_error: str, meta: Mapping[str, Any],
                    workers: int | None = None) -> dict:
  """Writes `folder` (shards + dataset.json) from `data_config.manifest`; returns the index.

  `workers` defaults to `resolve_workers(data_config.prepare_workers)`; 0 or 1 = in-process.
  dataset.json gains `skipped` (row, path, error per skipped row) and `summary`.
  """
  from tqdm import tqdm
  manifest = data_config.manifest
  rows = read_manifest(manifest, data_config.dataset, collect_errors=on_error == "skip")
  rps = int(data_config.records_per_shard)
  chunks = [rows[i:i + rps] for i in range(0, len(rows), rps)]
  fp = fingerprint(rows, data_config)
  staging = folder.rstrip("/") + STAGING_SUFFIX
  _open_staging(staging, fp, manifest)
  done = {k: d for k in range(len(chunks))
          if (d := _load_done(staging, k, fp, on_error)) is not None}
  todo = [k for k in range(len(chunks)) if k not in done]
  workers = resolve_workers(data_config.prepare_workers) if workers is None else workers
  workers = min(workers, sum(len(chunks[k]) for k in todo))
  if done:
    logging.info("resuming: %d of %d shards already staged in %s", len(done), len(chunks),
                 staging)
  max_bytes = int(float(data_config.max_scan_gb) * 1e9) or None
  pool = _Pool(workers, (tuple(data_config.shape), float(data_config.fov_mm),
                         tuple(data_config.intensity_percentiles), max_bytes))
  bar = tqdm(total=len(rows), initial=sum(len(chunks[k]) for k in done), desc="scans",
             unit="scan")
  try:
    results = pool.results([row for k in todo for row in chunks[k]])
    for k in todo:
      done[k] = _write_staged_shard(staging, k, chunks[k], results, fp, on_error, bar,
                                     manifest)
  finally:
    bar.close()
    pool.close()
  summary = {"manifest": manifest, "rows": len(rows), "workers": workers,
             "reused_shards": len(chunks) - len(todo)}
  index = _assemble(folder, staging, [done[k] for k in range(len(chunks))], meta, summary)
  shutil.rmtree(staging)
  print_summary(index)
  return index


def _write_staged_shard(staging: str, k: int, rows: Sequence[dict], results, fp: str,
                        on_error: str, bar, manifest: str) -> dict:
  """Consumes len(rows) results; writes shard k and then its json (the completion mark)."""
  entries, skipped = [], []
  if os.path.exists(_shard_json(staging, k)):
    os.remove(_shard_json(staging, k))   # stale (fail mode redoing a shard that skipped rows)
  with records.ShardWriter(os.path.join(staging, records.shard_name(k))) as writer:
    for row in rows:
      got_row, result = next(results)
      assert got_row is row
      bar.update(1)
      if isinstance(result, Exception):
        message = str(result) if "error" in row else f"{manifest} row {row['row']}: {result}"
        if on_error != "skip":
          raise DataError(message) from result
        logging.warning("skipping %s", message)
        skipped.append({"row": row["row"], "path": row["path"], "error": message})
        continue
      volume, affine = result
      rec = {"volume": volume, "affine": affine, "subject_id": row["subject_id"],
             "label": row["label"], "clinical_value": row["clinical_value"]}
      writer.write(rec)
      entries.append({**records.entry(rec), "row": row["row"], "path": row["path"]})
    writer.commit()
  done = {"fingerprint": fp, "shard": records.shard_name(k), "entries": entries,
          "skipped": skipped}
  write_text(_shard_json(staging, k), json.dumps(done, indent=1))
  return done


def _assemble(folder: str, staging: str, shards: Sequence[dict], meta: Mapping[str, Any],
              summary: Mapping[str, Any]) -> dict:
  """Links the staged non-empty shards into `folder` (atomically) with dataset.json."""
  entries, names, skipped = [], [], []
  for shard in shards:
    skipped += shard["skipped"]
    if not shard["entries"]:
      continue
    names.append(shard["shard"])
    for e in shard["entries"]:
      entries.append({**e, "shard": shard["shard"], "position": len(entries)})
  if not entries:
    raise DataError(f"{folder}: no records to write (every manifest row was skipped); "
                    f"see the skipped rows: {[s['error'] for s in skipped][:5]}")
  index = {"meta": dict(meta), "records": entries, "shards": names, "skipped": skipped,
           "summary": {**summary, "records": len(entries), "skipped": len(skipped)}}
  with atomic_dir(folder) as tmp:
    for name in names:
      try:
        os.link(os.path.join(staging, name), os.path.join(tmp, name))
      except OSError:
        shutil.copy2(os.path.join(staging, name), os.path.join(tmp, name))
    write_text(os.path.join(tmp, records.INDEX_NAME), json.dumps(index, indent=1))
  return index


def print_summary(index: Mapping[str, Any]) -> None:
  """Prints what prepare wrote and every skipped row."""
  s = index["summary"]
  print(f"prepare: {s['records']} records from {s.get('rows', s['records'])} manifest rows; "
        f"{s['skipped']} skipped", flush=True)
  for item in index["skipped"]:
    print(f"  skipped {item['error']}", flush=True)

"""What a sampling run records besides its volumes, shared by `cf3d_jax.sample` (synthetic
subjects) and `cf3d_jax.invert` (given scans).

  `phantom_rule`, `ground_truth_stats`   the phantom measurement per volume (MS lesion volume,
                                         AD ventricle volume) and the PSNR outside the template
                                         white matter to the volume it should preserve;
  `summarise`, `report`                  per guidance scale `phantom.prompt_effect` under
                                         index.json's `prompt_effect`, and its log table;
  `guidance_record`                      index.json's `guidance` (formula, negative, interval);
  `prompt_file_names`, `output_folder`   unique file names per prompt; the folder a run writes
                                         into, renamed onto its place when complete.
"""

from __future__ import annotations

import contextlib
import os
from typing import Sequence

import numpy as np
from absl import logging

from cf3d_jax import parallel
from cf3d_jax.background import background_record
from cf3d_jax.files import atomic_dir, unique_slug
from cf3d_jax.metrics import phantom as phantom_lib


def phantom_rule(reference, config) -> phantom_lib.PhantomRule | None:
  """The dataset's ground-truth rule on the reference grid, or None without a reference."""
  if reference is None or tuple(reference.wm_mask.shape) != tuple(config.data.shape):
    return None
  return phantom_lib.PhantomRule.build(config.data.dataset, reference,
                                       config.eval.lesion_threshold)


def real_comparison(config, workdir: str, factual: str) -> dict | None:
  """The montages' comparison row: the first held-out (test split) real volume of the factual
  prompt's class (of any class for a prompt outside the class vocabulary). Returns
  `{"title", "volume" [D, H, W] float32, "subject_id", "class", "split"}`, or None where the
  workdir holds no prepared dataset on the sampling grid (a model copied without its data) or
  the test split is empty."""
  from cf3d_jax.data import records
  from cf3d_jax.data.export import read_records, split_entries
  from cf3d_jax.text import prompts as prompt_lib
  from cf3d_jax.workdir import Workdir
  folder = Workdir(workdir).records
  if not os.path.exists(os.path.join(folder, records.INDEX_NAME)):
    return None
  index = records.load_index(folder)
  if tuple(index["meta"]["shape"]) != tuple(config.data.shape):
    return None
  entries = split_entries(index, "test", config.seed, tuple(config.data.split))
  cls = prompt_lib.prompt_class(config.data.dataset, factual)
  chosen = [e for e in entries if e["label"] == cls] or entries
  if not chosen:
    return None
  entry = chosen[0]
  volume = read_records(folder, index, [entry])[0]["volume"][..., 0]
  names = index["meta"].get("classes") or []
  label = names[entry["label"]] if 0 <= entry["label"] < len(names) else f"class {entry['label']}"
  return {"title": f"real test scan ({label})", "volume": np.asarray(volume, np.float32),
          "subject_id": entry["subject_id"], "class": label, "split": "test"}


def ground_truth_stats(entry: dict, volume: np.ndarray, rule, reference_volume=None) -> None:
  """Adds the phantom rule's measurement to `entry` in place (MS lesion volume and mean WM
  intensity; AD ventricle volume) and, given the volume it should preserve
  (`reference_volume`: the factual sample or the input scan), the PSNR to it outside the
  template white matter."""
  if rule is None:
    return
  entry[rule.stat] = rule.measure(volume)
  if rule.dataset == "ms":
    entry["wm_mean_intensity"] = rule.wm_mean_intensity(volume)
  if reference_volume is not None:
    value = phantom_lib.masked_psnr(volume, reference_volume, ~rule.reference.wm_mask, 2.0)
    entry["psnr_outside_wm_db"] = value if np.isfinite(value) else None   # None: identical


def summarise(result: dict, entries: list[dict], prompts: list[str], scales, rule
               ) -> dict[str, dict]:
  """Adds the measurement rule and, per guidance scale (key `g{w}`) and per named set of the
  entries (`set_key`, e.g. 'calibrated', which also lists each prompt's scale),
  `phantom.prompt_effect` of the `[subjects, prompts]` measurements (means, change vs the first
  prompt, class-hit rates, ordering) under `result['prompt_effect']`; returns that dict."""
  if rule is None or not any(rule.stat in e for e in entries):
    return {}
  result["rule"] = rule.description
  effects = {}
  keys = [f"g{g:g}" for g in scales]
  keys += sorted({e["set"] for e in entries if e.get("set")})
  for key in keys:
    rows = {}
    members = [e for e in entries if set_key(e) == key]
    for e in members:
      rows.setdefault(e["subject"], {})[e["prompt"]] = e[rule.stat]
    values = np.asarray([[row[p] for p in prompts] for _, row in sorted(rows.items())])
    eff = phantom_lib.prompt_effect(values, prompts, rule.dataset)
    if any(e.get("set") for e in members):   # a named set: each prompt at its own scale
      scales_of = {}
      for e in members:
        scales_of.setdefault(e["prompt"], set()).add(e["guidance_scale"])
      eff["guidance_scale"] = {p: (min(ws) if len(ws) == 1 else sorted(ws))
                               for p, ws in scales_of.items()}   # several: per factual class
    psnrs = [e["psnr_outside_wm_db"] for e in members if "psnr_outside_wm_db" in e]
    if psnrs:   # None where nothing changed outside the WM (blended edits): counted apart
      finite = [v for v in psnrs if v is not None]
      eff["fraction_unchanged_outside_wm"] = 1.0 - len(finite) / len(psnrs)
      if finite:
        eff["mean_psnr_outside_wm_db"] = float(np.mean(finite))
    effects[key] = eff
  result["prompt_effect"] = effects
  return effects


def set_key(entry: dict) -> str:
  """The guidance set an index item belongs to: its named set (e.g. 'calibrated', each prompt
  at its own scale), else `g{scale}`."""
  return entry.get("set") or f"g{entry['guidance_scale']:g}"


def table_cell(v, fmt: str) -> str:
  """A markdown table cell: '—' for None, minus signs as '−' (the seeds and curve tables)."""
  return "—" if v is None else format(v, fmt).replace("-", "−")


def set_label(key: str) -> str:
  """A `prompt_effect` key as a table cell: 'g6' → '6', a named set as itself."""
  return key[1:] if key.startswith("g") and key[1:].replace(".", "", 1).isdigit() else key


def guidance_record(config, factual: str) -> dict:
  """What index.json says about guidance: the formula, the negative text and the interval (and
  the background regularization the volumes went through, `background.background_record`)."""
  contrastive = config.sample.guidance_negative == "factual"
  return {"negative": config.sample.guidance_negative,
          "formula": ("out = out_factual + w (out_prompt − out_factual), factual = "
                      f"{factual} (the factual itself: the conditional model at every w)"
                      if contrastive else
                      "out = out_null + w (out_prompt − out_null) (classifier-free guidance)"),
          "interval": [float(v) for v in config.sample.guidance_interval],
          "rescale": float(config.sample.guidance_rescale),
          "background": background_record(config),
          "edit_mask": config.sample.edit_mask or None}


def prompt_file_names(prompts: Sequence[str]) -> list[str]:
  """One file name per prompt (`{slug}.nii.gz`), unique even when two prompts differ only in
  case or punctuation ('High load.' and 'high load' → 'high-load', 'high-load-2')."""
  used: set[str] = {"input"}   # samples_source/ keeps the conformed scan as input.nii.gz
  return [unique_slug(p, used) + ".nii.gz" for p in prompts]


@contextlib.contextmanager
def output_folder(path: str):
  """The folder a run writes into: on the writing process a fresh temporary folder that
  replaces `path` when the block completes (`files.atomic_dir`); on other processes None."""
  if parallel.is_writer():
    with atomic_dir(path) as tmp:
      yield tmp
  else:
    yield None


def report(effects: dict[str, dict], prompts: list[str], out_dir: str) -> None:
  """Logs the per-prompt table (means, class-hit rates, ordering) and where it came from."""
  if effects:
    logging.info("measured in the generated volumes (%s; class-hit rate in brackets):\n%s",
                 next(iter(effects.values()))["stat"],
                 phantom_lib.format_table(effects, prompts))
  logging.info("wrote %s", os.path.join(out_dir, "index.json"))

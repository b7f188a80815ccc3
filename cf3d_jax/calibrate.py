"""`--mode=calibrate`: each prompt's guidance scale, chosen on held-out noises of the trained model.

How far guidance moves a prompt depends on the trained model: the same recipe under three seeds
moved "high lesion load" by +9.6 mL in one model and +40 mL in another at the same w
(docs/results.md, "Three seeds of the showcase"), so no fixed w lands every model's prompts in
their classes. Calibration picks w per model and per prompt, the way one picks any
hyperparameter on held-out data:

- decode `config.sample.calibration_noises` noises under every prompt at every scale of
  `config.sample.calibration_scales`, with the sampling settings of `--mode=sample` (guidance
  negative, interval, rescale, edit mask). The noises are their own set (noise ids from
  `CALIBRATION_NOISE_OFFSET` on): never the noises `--mode=sample` or `--mode=evaluate` report;
- measure each volume with the phantom rule (MS lesion volume: voxels > 0.2 in the template WM);
- per prompt keep the scale whose volumes land in the prompt's class range most often (ties: the
  smaller mean distance to the range, then the smaller w, which preserves the subject best).
  With `config.sample.calibration_min_psnr` > 0 only scales whose mean PSNR between factual and
  counterfactual outside the template WM reaches that floor compete (where none does, the scale
  with the highest PSNR is kept and a warning logged): the choice then trades class hits for
  subject preservation explicitly. Under contrastive guidance
  (`sample.guidance_negative='factual'`) the factual prompt is guided against itself, the
  conditional model at every w, and is given w = 1.

Writes `WORKDIR/calibration.json` (`CALIBRATION_FORMAT`): the chosen scale per prompt and every
measurement it was chosen from. With `config.sample.calibrate` set, `--mode=sample` adds the
guidance set 'calibrated' (each prompt decoded at its own scale, folder `samples/calibrated/`,
`prompt_effect['calibrated']` in index.json), and `--mode=all` calibrates before it samples.

Counterfactuals of given scans (`config.sample.source`) respond to w otherwise than samples from
noise (the inverted noise and blended editing damp the effect), so they get their own
calibration: with `config.sample.source` set, `--mode=calibrate` runs `calibrate_scans` on
phantoms of the *validation* split (never the given scans), each inverted under its own class's
prompt and decoded under every other prompt, and writes `WORKDIR/calibration_scans.json`;
`--mode=sample` with the source and `config.sample.calibrate` adds `samples_source/calibrated/`.

Needs phantom data whose prompts name class ranges (the MS lesion-load classes); the AD prompts
name an order, not ranges, and are refused with a ConfigError.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging

from cf3d_jax import sample_index
from cf3d_jax.background import background_record
from cf3d_jax.checkpoints import load_generator
from cf3d_jax.data import phantom_reference
from cf3d_jax.errors import ConfigError
from cf3d_jax.files import write_text
from cf3d_jax.generate import SAMPLE_STREAM, generate, sampler_on_mesh, sampling_kwargs
from cf3d_jax.invert import edit_masks
from cf3d_jax.metrics import phantom as phantom_lib
from cf3d_jax.text import prompts as prompt_lib
from cf3d_jax.workdir import Workdir

CALIBRATION_FORMAT = "cf3d_jax.calibration/1"
CALIBRATION_NOISE_OFFSET = 1 << 20   # calibration noise i = subject_noise(seed, OFFSET + i)
SET_NAME = "calibrated"              # the guidance set's key in index.json and its folder


def calibration_path(workdir: str, scans: bool = False) -> str:
  """`WORKDIR/calibration.json` (from noise) or, scans, `WORKDIR/calibration_scans.json`."""
  return os.path.join(Workdir(workdir).root,
                      "calibration_scans.json" if scans else "calibration.json")


def settings(config, scans: bool = False) -> dict:
  """The sampling settings a calibration holds for: `--mode=sample` refuses a calibration made
  under other ones (for given scans, the inversion's too)."""
  extra = ({"inversion_depth": float(config.sample.inversion_depth),
            "inversion_refine": int(config.sample.inversion_refine)} if scans else {})
  if scans and config.sample.inversion != "ddim":   # (absent = DDIM: older files stay valid)
    extra["inversion"] = str(config.sample.inversion)
  return {**extra, "prompts": list(config.sample.prompts),
          "guidance_negative": config.sample.guidance_negative,
          "guidance_interval": [float(v) for v in config.sample.guidance_interval],
          "guidance_rescale": float(config.sample.guidance_rescale),
          "background": background_record(config),
          "edit_mask": config.sample.edit_mask or None,
          "use_ema": bool(config.sample.use_ema),
          "num_sample_steps": int(config.objective.num_sample_steps),
          "sampler": config.objective.sampler, "eta": float(config.objective.eta)}


def prompt_classes(dataset: str, prompts) -> list[int]:
  """The class index of each prompt; ConfigError where the dataset or a prompt names no range."""
  if dataset != "ms":
    raise ConfigError(f"config.sample.calibrate: calibration needs prompts that name class "
                      f"ranges (the MS lesion-load classes); data.dataset={dataset!r} names an "
                      "order only. Set config.sample.calibrate=False")
  classes = [prompt_lib.prompt_class(dataset, p) for p in prompts]
  missing = [p for p, c in zip(prompts, classes) if c is None]
  if missing:
    raise ConfigError(f"config.sample.prompts: {missing} name no lesion-load class "
                      "(minimal / moderate / high); calibration cannot score them")
  return classes


def mean_psnr(psnr: np.ndarray) -> np.ndarray:
  """psnr `[S, K, P]` dB (inf where nothing changed) → `[S, P]`: the mean over the K noises of
  the finite values, inf where none is finite."""
  psnr = np.asarray(psnr, np.float64)
  finite = np.isfinite(psnr)
  total = np.where(finite, psnr, 0.0).sum(axis=1)
  count = finite.sum(axis=1)
  return np.where(count > 0, total / np.maximum(count, 1), np.inf)


def choose_scales(values: np.ndarray, scales, classes, factual: int | None = None,
                  psnr: np.ndarray | None = None, min_psnr: float = 0.0, margin: float = 0.0
                  ) -> tuple[list[float], dict]:
  """values `[S scales, K noises, P prompts]` (mL) → (chosen w per prompt, table: per prompt
  the hit rates, distances and means per scale; the hit rate at each chosen w).

  Per prompt: the scale with the highest class-hit rate over the K noises; ties broken by the
  smaller mean distance to the class range (mL), then by the smaller w. factual: the index of
  the prompt guided against itself (contrastive guidance: the same volume at every w), which
  gets w = 1. psnr `[S, K, P]` (dB outside the WM against the factual, inf where identical) with
  min_psnr > 0: only scales whose mean PSNR reaches min_psnr compete; where none does, the
  scale with the highest mean PSNR is kept (its prompt is listed under 'below_min_psnr').
  margin: a volume counts as a hit only inside the range shrunk by this fraction at each finite
  bound ([lo (1 + margin), hi / (1 + margin)]), so that a scale whose volumes just touch the range
  on the few calibration items is not preferred to one that lands them well inside."""
  values = np.asarray(values, np.float64)
  scales = [float(s) for s in scales]
  if values.shape[0] != len(scales) or values.shape[2] != len(classes):
    raise ValueError(f"values {values.shape}: expected [{len(scales)}, K, {len(classes)}]")
  if psnr is not None and np.shape(psnr) != values.shape:
    raise ValueError(f"psnr {np.shape(psnr)}: expected the values' shape {values.shape}")
  means = mean_psnr(psnr) if psnr is not None else None
  chosen, table, hits_at, below = [], [], [], []
  for p, c in enumerate(classes):
    lo, hi = phantom_lib.class_range_ml(c)
    v = values[:, :, p]
    hit = np.mean((v >= lo * (1 + margin)) & (v < hi / (1 + margin)), axis=1)
    dist = np.mean(np.maximum(lo - v, 0) + np.maximum(v - hi, 0), axis=1)
    candidates = list(range(len(scales)))
    if min_psnr > 0 and means is not None and p != factual:
      candidates = [i for i in candidates if means[i, p] >= min_psnr]
      if not candidates:   # no scale preserves enough: the one that preserves best
        below.append(p)
        candidates = [max(range(len(scales)), key=lambda i: (means[i, p], -scales[i]))]
    best = min(candidates, key=lambda i: (-hit[i], dist[i], scales[i]))
    chosen.append(1.0 if p == factual else scales[best])
    hits_at.append(float(hit[best]))
    row = {"class_range_ml": [lo, None if np.isinf(hi) else hi],
           "hit_rate": [float(h) for h in hit], "mean_distance_ml": [float(d) for d in dist],
           "mean_ml": [float(m) for m in v.mean(axis=1)]}
    if means is not None:
      row["mean_psnr_outside_wm_db"] = [_json_db(m) for m in means[:, p]]
    table.append(row)
  return chosen, {"per_prompt": table, "chosen_hit_rate": hits_at, "below_min_psnr": below}


def _choice(values: np.ndarray, psnr: np.ndarray, scales: list[float], classes, prompts,
            factual: int | None, config) -> dict:
  """`choose_scales` keyed by prompt: chosen_scale, chosen_hit_rate, chosen_psnr_outside_wm_db
  (None for the factual or where nothing changed), per_prompt, below_min_psnr (prompts)."""
  chosen, table = choose_scales(values, scales, classes, factual=factual, psnr=psnr,
                                min_psnr=float(config.sample.calibration_min_psnr),
                                margin=float(config.sample.calibration_margin))
  means = mean_psnr(psnr)
  at = [None if p == factual or w not in scales else _json_db(means[scales.index(w), p])
        for p, w in enumerate(chosen)]
  return {"chosen_scale": dict(zip(prompts, chosen)),
          "chosen_hit_rate": dict(zip(prompts, table["chosen_hit_rate"])),
          "chosen_psnr_outside_wm_db": dict(zip(prompts, at)),
          "below_min_psnr": [prompts[p] for p in table["below_min_psnr"]],
          "per_prompt": table["per_prompt"]}


def _json_db(value: float) -> float | None:
  """A dB value as JSON keeps it: None for inf (nothing changed)."""
  return round(float(value), 3) if np.isfinite(value) else None


def _measure(rule, x: np.ndarray, references: np.ndarray, outside: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
  """Volumes `[K, P, D, H, W]` and the volume each should preserve `[K, D, H, W]` → (the rule's
  measurement `[K, P]`, PSNR to the reference outside the WM `[K, P]`, inf where identical),
  rounded to 0.001 as the calibration file keeps them."""
  values = [[rule.measure(v) for v in row] for row in x]
  psnr = [[phantom_lib.masked_psnr(v, ref, outside, 2.0) for v in row]
          for row, ref in zip(x, references)]
  return np.round(np.asarray(values, np.float64), 3), np.round(np.asarray(psnr, np.float64), 3)


def _reference_and_rule(config, workdir: str):
  """The phantom reference and the dataset's rule on it; ConfigError without them."""
  reference = phantom_reference.find_reference(Workdir(workdir).reference)
  rule = sample_index.phantom_rule(reference, config)
  if rule is None:
    raise ConfigError(f"--mode=calibrate needs the phantom reference of the data grid "
                      f"({Workdir(workdir).reference}, made by --mode=prepare on phantom data)")
  return reference, rule


def calibrate(config, workdir: str) -> dict:
  """Decodes the calibration noises over the scale grid, measures them and writes
  `WORKDIR/calibration.json`; returns its content."""
  prompts = list(config.sample.prompts)
  classes = prompt_classes(config.data.dataset, prompts)
  reference, rule = _reference_and_rule(config, workdir)
  gen = load_generator(config, workdir)
  emb, mask = gen.table.lookup(prompts)
  scales = [float(s) for s in config.sample.calibration_scales]
  noise_ids = range(CALIBRATION_NOISE_OFFSET,
                    CALIBRATION_NOISE_OFFSET + int(config.sample.calibration_noises))
  bsz = config.sample.batch_size
  sampler_for = sampler_on_mesh(gen, bsz, "sample.batch_size", **sampling_kwargs(config))
  outside = ~reference.wm_mask
  per_scale = [_measure(rule, x[..., 0], x[:, 0, ..., 0], outside)   # against the factual
               for _, x in generate(gen, noise_ids, emb, mask, scales, noise_seed=config.seed,
                                    key=jax.random.key(config.seed + SAMPLE_STREAM),
                                    batch_size=bsz, negative=config.sample.guidance_negative,
                                    sampler_for=sampler_for, desc="calibrating",
                                    edit_masks=edit_masks(config, reference, gen.latent_shape))]
  values, psnr = (np.stack(a) for a in zip(*per_scale))   # [S, K, P] mL, dB
  choice = _choice(values, psnr, scales, classes, prompts,
                   0 if config.sample.guidance_negative == "factual" else None, config)
  lines = [_choice_line(p, choice, p) for p in prompts]
  return _write(config, workdir, gen.step, rule, scales, values, psnr, choice, lines)


def _choice_line(label: str, choice: dict, prompt: str) -> str:
  db = choice["chosen_psnr_outside_wm_db"][prompt]
  return (f"  {label}: w = {choice['chosen_scale'][prompt]:g} "
          f"({choice['chosen_hit_rate'][prompt]:.0%}"
          + ("" if db is None else f", {db:.1f} dB outside the WM") + ")")


def _write(config, workdir: str, step: int, rule, scales, values, psnr, choice: dict,
           lines: list[str], scans: dict | None = None) -> dict:
  """Writes the calibration file (`scans`: the given-scan one, with this record of the scans)
  holding `choice` and every measurement `[S, K, P]`; logs `lines` (the choice)."""
  min_psnr = float(config.sample.calibration_min_psnr)
  if choice["below_min_psnr"]:
    logging.warning("calibration: no scale keeps the mean PSNR outside the WM at %g dB for %s; "
                    "kept the scale that preserves best", min_psnr, choice["below_min_psnr"])
  result = {"format": CALIBRATION_FORMAT, "checkpoint_step": step, "seed": config.seed,
            "settings": settings(config, scans is not None), "rule": rule.description,
            "num_noises": int(values.shape[1]), "scales": scales,
            "min_psnr_outside_wm_db": min_psnr, "margin": float(config.sample.calibration_margin),
            **({"scans": scans} if scans is not None else {}), **choice,
            "lesion_volume_ml": values.tolist(),   # [S, K, P]: the choice can be redone from it
            "psnr_outside_wm_db": [[[_json_db(v) for v in row] for row in per_scale]
                                   for per_scale in psnr]}   # [S, K, P]; None = identical
  path = calibration_path(workdir, scans is not None)
  if jax.process_index() == 0:
    write_text(path, json.dumps(result, indent=1))
  logging.info("calibrated guidance on %d %s (chosen w, class-hit rate on them):\n%s",
               result["num_noises"], "given scans" if scans is not None else "noises",
               "\n".join(lines))
  logging.info("wrote %s", path)
  return result


def validation_scans(config, workdir: str, limit: int, classes: list[int]
                     ) -> tuple[np.ndarray, list[int], list[str]]:
  """Up to `limit` phantoms of the validation split whose class is one of the prompts' `classes`,
  taken round-robin over those classes (so each is represented): (volumes `[N, D, H, W, 1]` in
  [-1, 1], their class labels, their subject ids)."""
  from cf3d_jax.data import export, records
  data_dir = Workdir(workdir).records
  index = records.load_index(data_dir)
  entries = export.split_entries(index, "val", config.seed, tuple(config.data.split))
  by_class = {c: [e for e in entries if int(e["label"]) == c] for c in dict.fromkeys(classes)}
  picked = []
  while len(picked) < limit and any(by_class.values()):
    for c in by_class:
      if by_class[c] and len(picked) < limit:
        picked.append(by_class[c].pop(0))
  if len({int(e["label"]) for e in picked}) < 2:
    raise ConfigError(f"{data_dir}: the validation split holds phantoms of "
                      f"{len({int(e['label']) for e in picked})} of the prompts' classes; "
                      "calibrating counterfactuals of given scans needs two or more")
  recs = export.read_records(data_dir, index, picked)
  volumes = np.stack([np.asarray(r["volume"], np.float32) for r in recs])
  return volumes, [int(e["label"]) for e in picked], [str(e["subject_id"]) for e in picked]


def calibrate_scans(config, workdir: str) -> dict:
  """The given-scan calibration (`--mode=calibrate` with `config.sample.source` set): up to
  `config.sample.calibration_noises` validation phantoms, each inverted under its own class's
  prompt and decoded under every prompt at every scale with the settings of given-scan sampling
  (inversion depth, edit mask, guidance); per factual class and prompt, the scale that lands the
  most of that class's scans in the prompt's class (`chosen_scale[factual][prompt]`; the factual
  prompt itself: w = 1). Writes `WORKDIR/calibration_scans.json`; returns its content.
  (The given scans themselves are not used: they are what the calibration is applied to.)"""
  from cf3d_jax.invert import decode_scans, edit_masks as scan_masks, invert_scans, scan_samplers
  prompts = list(config.sample.prompts)
  classes = prompt_classes(config.data.dataset, prompts)
  reference, rule = _reference_and_rule(config, workdir)
  inputs, labels, ids = validation_scans(config, workdir, int(config.sample.calibration_noises),
                                         classes)
  gen = load_generator(config, workdir)
  emb, mask = gen.table.lookup(prompts)
  factual = [classes.index(c) for c in labels]          # each scan's own class's prompt
  f_emb, f_mask = emb[factual], mask[factual]
  masks = scan_masks(config, reference, gen.latent_shape)
  inverted = invert_scans(gen, config, inputs, f_emb, f_mask, masks)
  sampler_for = scan_samplers(gen, config, masks)
  n, num_p = len(inputs), len(prompts)
  ks, ps = np.repeat(np.arange(n), num_p), np.tile(np.arange(num_p), n)
  scales = [float(s) for s in config.sample.calibration_scales]
  outside = ~reference.wm_mask
  per_scale = []
  for w in scales:
    logging.info("calibrating given scans at w = %g", w)
    x = decode_scans(gen, config, sampler_for, w, inverted, inputs, ks, ps, emb, mask, f_emb,
                     f_mask)
    per_scale.append(_measure(rule, np.asarray(x).reshape((n, num_p) + x.shape[1:])[..., 0],
                              inputs[..., 0], outside))   # against the input scan
  values, psnr = (np.stack(a) for a in zip(*per_scale))   # [S, K, P] mL, dB
  # Per factual class: the scans of that class, each prompt's w chosen on them alone (the
  # guidance direction, prompt − factual, differs with the factual prompt).
  per, lines = {}, []
  for f in sorted(set(factual)):
    idx = [k for k in range(n) if factual[k] == f]
    c = _choice(values[:, idx], psnr[:, idx], scales, classes, prompts, f, config)
    per[prompts[f]] = dict(c, scans=idx)
    lines += [_choice_line(f"{prompts[f]} → {p}", c, p) for p in prompts if p != prompts[f]]
  choice = {key: {fp: c[key] for fp, c in per.items()}
            for key in ("chosen_scale", "chosen_hit_rate", "chosen_psnr_outside_wm_db")}
  choice["below_min_psnr"] = [f"{fp} → {p}" for fp, c in per.items() for p in c["below_min_psnr"]]
  choice["per_factual"] = {fp: {"scans": c["scans"], "per_prompt": c["per_prompt"]}
                           for fp, c in per.items()}
  scans = {"split": "val", "subject_ids": ids, "class": labels,
           "input_lesion_volume_ml": [round(rule.measure(v[..., 0]), 3) for v in inputs]}
  return _write(config, workdir, gen.step, rule, scales, values, psnr, choice, lines, scans)


def load_calibration(config, workdir: str, step: int, scans: bool = False) -> dict:
  """`WORKDIR/calibration.json` (scans: `calibration_scans.json`) if it was made for checkpoint
  `step` under this config's sampling settings; ConfigError naming the file and the mismatch
  otherwise."""
  path = calibration_path(workdir, scans)
  fix = ("run --mode=calibrate with config.sample.source set first, or set "
         "config.sample.calibrate=False" if scans else
         "run --mode=calibrate (or --mode=all) first, or set config.sample.calibrate=False")
  try:
    with open(path, encoding="utf-8") as f:
      cal = json.load(f)
  except FileNotFoundError:
    raise ConfigError(f"{path}: no calibration; {fix}") from None
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: unreadable calibration ({e}); {fix}") from None
  if cal.get("format") != CALIBRATION_FORMAT:
    raise ConfigError(f"{path}: format {cal.get('format')!r}, expected {CALIBRATION_FORMAT!r}; "
                      f"{fix}")
  if cal.get("checkpoint_step") != step:
    raise ConfigError(f"{path}: made for checkpoint step {cal.get('checkpoint_step')}, sampling "
                      f"uses step {step}; {fix}")
  for key, stored in (("calibration_min_psnr", "min_psnr_outside_wm_db"),
                      ("calibration_margin", "margin")):
    want = float(config.sample[key])
    if cal.get(stored, 0.0) != want:
      raise ConfigError(f"{path}: chosen under {key}={cal.get(stored, 0.0)!r}, the config sets "
                        f"{want!r}; {fix}")
  want = settings(config, scans)
  diff = [k for k in want if cal.get("settings", {}).get(k) != want[k]]
  if diff:
    raise ConfigError(f"{path}: made under other sampling settings ({', '.join(diff)}); {fix}")
  return cal


def scan_scale(calibration: dict, factual: str, prompt: str, workdir: str) -> float:
  """The w a given-scan calibration chose for scans whose factual prompt is `factual`, decoded
  under `prompt`; ConfigError where the validation split had no scan of that class."""
  chosen = calibration["chosen_scale"]
  if factual not in chosen:
    raise ConfigError(f"{calibration_path(workdir, scans=True)}: no calibration for scans whose "
                      f"factual prompt is {factual!r} (the validation phantoms it was made on "
                      f"are of the classes of {sorted(chosen)}); raise "
                      "config.sample.calibration_noises or set config.sample.calibrate=False")
  return float(chosen[factual][prompt])


def decode_calibrated(gen, chosen, emb: np.ndarray, mask: np.ndarray, *, num_subjects: int,
                      seed: int, batch_size: int, negative: str, sampler_for,
                      masks=None) -> np.ndarray:
  """The sample noises 0 … K−1 decoded under each prompt p at its own scale `chosen[p]`:
  volumes `[K, P, D, H, W, 1]`, as `generate` gives them at one scale (prompt 0, the factual,
  is the guidance negative of 'factual' and the followed run of `masks`, so each prompt p > 0
  is decoded together with it)."""
  emb, mask = np.asarray(emb), np.asarray(mask)
  columns = []
  for p, w in enumerate(chosen):
    rows = [0] if p == 0 else [0, p]
    (_, x), = generate(gen, range(num_subjects), emb[rows], mask[rows], [float(w)],
                       noise_seed=seed, key=jax.random.key(seed + SAMPLE_STREAM),
                       batch_size=batch_size, negative=negative, sampler_for=sampler_for,
                       desc=f"sampling calibrated, prompt {p + 1}",
                       edit_masks=masks if p else None)
    columns.append(x[:, -1])
  return np.stack(columns, axis=1)

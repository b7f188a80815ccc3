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
  Under contrastive guidance (`sample.guidance_negative='factual'`) the factual prompt is guided
  against itself, the conditional model at every w, and is given w = 1.

Writes `WORKDIR/calibration.json` (`CALIBRATION_FORMAT`): the chosen scale per prompt and every
measurement it was chosen from. With `config.sample.calibrate` set, `--mode=sample` adds the
guidance set 'calibrated' (each prompt decoded at its own scale, folder `samples/calibrated/`,
`prompt_effect['calibrated']` in index.json), and `--mode=all` calibrates before it samples.

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
from cf3d_jax.checkpoints import load_generator
from cf3d_jax.data import phantom_reference
from cf3d_jax.errors import ConfigError
from cf3d_jax.files import write_text
from cf3d_jax.generate import SAMPLE_STREAM, generate, sampler_on_mesh
from cf3d_jax.invert import edit_masks
from cf3d_jax.metrics import phantom as phantom_lib
from cf3d_jax.text import prompts as prompt_lib
from cf3d_jax.workdir import Workdir

CALIBRATION_FORMAT = "cf3d_jax.calibration/1"
CALIBRATION_NOISE_OFFSET = 1 << 20   # calibration noise i = subject_noise(seed, OFFSET + i)
SET_NAME = "calibrated"              # the guidance set's key in index.json and its folder


def calibration_path(workdir: str) -> str:
  return os.path.join(Workdir(workdir).root, "calibration.json")


def settings(config) -> dict:
  """The sampling settings a calibration holds for: `--mode=sample` refuses a calibration made
  under other ones."""
  return {"prompts": list(config.sample.prompts),
          "guidance_negative": config.sample.guidance_negative,
          "guidance_interval": [float(v) for v in config.sample.guidance_interval],
          "guidance_rescale": float(config.sample.guidance_rescale),
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


def choose_scales(values: np.ndarray, scales, classes, factual_fixed: bool = False
                  ) -> tuple[list[float], dict]:
  """values `[S scales, K noises, P prompts]` (mL) → (chosen w per prompt, table: per prompt
  the hit rates, distances and means per scale; the hit rate at each chosen w).

  Per prompt: the scale with the highest class-hit rate over the K noises; ties broken by the
  smaller mean distance to the class range (mL), then by the smaller w. factual_fixed: prompt 0
  is guided against itself (contrastive guidance), the same volume at every w: it gets w = 1."""
  values = np.asarray(values, np.float64)
  scales = [float(s) for s in scales]
  if values.shape[0] != len(scales) or values.shape[2] != len(classes):
    raise ValueError(f"values {values.shape}: expected [{len(scales)}, K, {len(classes)}]")
  chosen, table, hits_at = [], [], []
  for p, c in enumerate(classes):
    lo, hi = phantom_lib.class_range_ml(c)
    v = values[:, :, p]
    hit = np.mean((v >= lo) & (v < hi), axis=1)
    dist = np.mean(np.maximum(lo - v, 0) + np.maximum(v - hi, 0), axis=1)
    best = min(range(len(scales)), key=lambda i: (-hit[i], dist[i], scales[i]))
    chosen.append(1.0 if factual_fixed and p == 0 else scales[best])
    hits_at.append(float(hit[best]))
    table.append({"class_range_ml": [lo, None if np.isinf(hi) else hi],
                  "hit_rate": [float(h) for h in hit], "mean_distance_ml": [float(d) for d in dist],
                  "mean_ml": [float(m) for m in v.mean(axis=1)]})
  return chosen, {"per_prompt": table, "chosen_hit_rate": hits_at}


def calibrate(config, workdir: str) -> dict:
  """Decodes the calibration noises over the scale grid, measures them and writes
  `WORKDIR/calibration.json`; returns its content."""
  prompts = list(config.sample.prompts)
  classes = prompt_classes(config.data.dataset, prompts)
  reference = phantom_reference.find_reference(Workdir(workdir).reference)
  rule = sample_index.phantom_rule(reference, config)
  if rule is None:
    raise ConfigError(f"--mode=calibrate needs the phantom reference of the data grid "
                      f"({Workdir(workdir).reference}, made by --mode=prepare on phantom data)")
  gen = load_generator(config, workdir)
  emb, mask = gen.table.lookup(prompts)
  scales = [float(s) for s in config.sample.calibration_scales]
  noise_ids = range(CALIBRATION_NOISE_OFFSET,
                    CALIBRATION_NOISE_OFFSET + int(config.sample.calibration_noises))
  bsz = config.sample.batch_size
  sampler_for = sampler_on_mesh(gen, bsz, "sample.batch_size", config.sample.guidance_interval,
                                config.sample.guidance_rescale)
  values = []
  for _, x in generate(gen, noise_ids, emb, mask, scales, noise_seed=config.seed,
                       key=jax.random.key(config.seed + SAMPLE_STREAM), batch_size=bsz,
                       negative=config.sample.guidance_negative, sampler_for=sampler_for,
                       desc="calibrating", edit_masks=edit_masks(config, reference,
                                                                 gen.latent_shape)):
    values.append([[rule.measure(x[k, p]) for p in range(len(prompts))] for k in range(len(x))])
  values = np.round(np.asarray(values, np.float64), 3)   # [S, K, P] mL, as the file keeps them
  chosen, table = choose_scales(values, scales, classes,
                                factual_fixed=config.sample.guidance_negative == "factual")
  result = {"format": CALIBRATION_FORMAT, "checkpoint_step": gen.step, "seed": config.seed,
            "settings": settings(config), "rule": rule.description,
            "num_noises": int(config.sample.calibration_noises), "scales": scales,
            "chosen_scale": dict(zip(prompts, chosen)),
            "chosen_hit_rate": dict(zip(prompts, table.pop("chosen_hit_rate"))),
            "lesion_volume_ml": values.tolist(),   # [S, K, P]: the choice can be redone from it
            **table}
  if jax.process_index() == 0:
    write_text(calibration_path(workdir), json.dumps(result, indent=1))
  logging.info("calibrated guidance on %d noises (chosen w, class-hit rate on them):\n%s",
               result["num_noises"],
               "\n".join(f"  {p}: w = {w:g} ({result['chosen_hit_rate'][p]:.0%})"
                         for p, w in result["chosen_scale"].items()))
  logging.info("wrote %s", calibration_path(workdir))
  return result


def load_calibration(config, workdir: str, step: int) -> dict:
  """`WORKDIR/calibration.json` if it was made for checkpoint `step` under this config's sampling
  settings; ConfigError naming the file and the mismatch otherwise."""
  path = calibration_path(workdir)
  fix = "run --mode=calibrate (or --mode=all) first, or set config.sample.calibrate=False"
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
  want = settings(config)
  diff = [k for k in want if cal.get("settings", {}).get(k) != want[k]]
  if diff:
    raise ConfigError(f"{path}: made under other sampling settings ({', '.join(diff)}); {fix}")
  return cal


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

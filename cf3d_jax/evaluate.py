"""`--mode=evaluate`: the paper's Table 1 (quality, diversity, preservation, alignment) and Table 2
(the guidance sweep) for a trained generator, plus ground truth on the phantoms.

For every guidance scale of `config.eval.guidance_scales` (the first is Table 1's setting):
1. K = `eval.num_per_prompt` fixed noises (an evaluation stream of the seed, disjoint from
   `--mode=sample`'s) are decoded under every prompt of `config.sample.prompts`; prompt 0 is the
   factual baseline (the paper's "low" class) and the others its counterfactuals from the same noise.
2. Columns:
   - `fid`: Fréchet distance between Med3D features (`models.resnet3d`, global average of layer4)
     of all generated volumes and of the real volumes of `eval.real_split`. With `eval.med3d`
     empty the ResNet-10 is randomly initialised (seeded): the number then only ranks runs of the
     same setup against each other; convert MedicalNet's `resnet_50_23dataset.pth` with
     `python -m cf3d_jax.convert medicalnet` for the paper's feature space.
   - `ms_ssim_diversity`: mean MS-SSIM over `eval.diversity_pairs` random pairs of generated
     volumes of the same prompt (lower = more diverse).
   - `ms_ssim_preservation`, `psnr_preservation`: between each counterfactual and its factual
     baseline (same noise), averaged over counterfactual prompts and subjects.
   - `alignment`: accuracy of the text-alignment classifier (`--mode=train_classifier`) on the
     counterfactuals, the label being the prompt's class; and `alignment_all` over every volume.
   - `texture`: the generated volumes' Haar detail-subband energy over the real volumes'
     (`metrics.texture`) at 2-, 4- and 8-voxel scales: 1 = the data's texture (acquisition noise
     included), above 1 = texture the data lacks, below 1 = smoother; `total` and
     `per_subband` (finest level), `per_level`.
   - phantoms: the measurement rule of `metrics.lesion` (MS) or `metrics.ventricles` (AD) per
     volume: mean per prompt, mean change factual → counterfactual, and for MS the fraction of
     volumes whose measured lesion volume falls in the prompt's class range (the counterfactual
     "lands in its class") with the mean distance to that range in mL.
With `config.sample.calibrate` set, the same columns for the set 'calibrated' (`results.json`
key `calibrated`): the evaluation noises decoded under each prompt at the scale
`--mode=calibrate` chose for it on its own held-out noises (`calibrate.decode_calibrated`); a
missing or mismatched calibration is a ConfigError before anything is decoded.
MS-SSIM uses `eval.ms_ssim_kernel` and `eval.ms_ssim_scales` (the first scales' standard weights,
renormalised), data range 2 (images in [-1, 1]).
Outputs in `WORKDIR/eval/`: `results.json`, `results.md` (the paper's layout) and
`guidance.png` (alignment and preservation against guidance).
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cf3d_jax import config_base, parallel
from cf3d_jax.checkpoints import Generator, load_generator
from cf3d_jax.data import phantom_reference, records
from cf3d_jax.data.export import read_records, split_entries
from cf3d_jax.errors import ConfigError
from cf3d_jax.figures import pyplot, save_png
from cf3d_jax.files import write_text
from cf3d_jax.generate import SAMPLE_STREAM, generate, sampler_on_mesh, sampling_kwargs
from cf3d_jax.metrics import fid as fid_lib
from cf3d_jax.metrics import image as image_lib
from cf3d_jax.metrics import phantom as phantom_lib
from cf3d_jax.metrics import texture as texture_lib
from cf3d_jax.text import prompts as prompt_lib
from cf3d_jax.workdir import Workdir

EVAL_STREAM = 2_000_033   # evaluation noise k = generate.subject_noise(seed + EVAL_STREAM, k)


def ms_ssim_settings(config, shape) -> dict:
  """kwargs for `ms_ssim_3d`; ConfigError if the volume is too small for them."""
  kernel, scales = int(config.eval.ms_ssim_kernel), int(config.eval.ms_ssim_scales)
  if not 1 <= scales <= len(image_lib.MS_SSIM_WEIGHTS):
    raise ConfigError(f"config.eval.ms_ssim_scales={scales}: expected 1..5")
  need = image_lib.ms_ssim_min_size(kernel, scales)
  if min(shape) < need:
    raise ConfigError(f"config.eval.ms_ssim_kernel={kernel} with ms_ssim_scales={scales} needs "
                      f"volumes of at least {need} voxels per side; data.shape={tuple(shape)}")
  w = np.asarray(image_lib.MS_SSIM_WEIGHTS[:scales], np.float64)
  return {"kernel_size": kernel, "weights": tuple(float(v) for v in w / w.sum())}


def feature_extractor(config):
  """jit(x [N, D, H, W, 1]) → Med3D features `[N, F]`, and a description of the network."""
  from cf3d_jax.models import resnet3d
  if config.eval.med3d:
    from cf3d_jax import convert
    model_config, variables = convert.load_converted(config.eval.med3d)
    model = resnet3d.build_resnet3d(model_config["depth"], model_config.get("shortcut_type"))
    what = f"MedicalNet ResNet-{model_config['depth']} from {config.eval.med3d}"
  else:
    model = resnet3d.build_resnet3d(10)
    shape = (1,) + tuple(config.data.shape) + (1,)
    variables = jax.jit(model.init)(jax.random.key(config.seed + EVAL_STREAM),
                                    jnp.zeros(shape, jnp.float32))
    what = "random-init ResNet-10 (no eval.med3d given): FID comparable only between runs"
  return jax.jit(lambda x: model.apply(variables, x)), what


def _features(fn, volumes: np.ndarray, bsz: int) -> np.ndarray:
  return np.concatenate([np.asarray(fn(jnp.asarray(volumes[i:i + bsz])))
                         for i in range(0, len(volumes), bsz)]).astype(np.float64)


def _pairwise(fn, a: np.ndarray, b: np.ndarray, bsz: int) -> np.ndarray:
  """fn over aligned pairs a[i], b[i] `[n, D, H, W, 1]` in batches → `[n]`."""
  return np.concatenate([np.asarray(fn(jnp.asarray(a[i:i + bsz]), jnp.asarray(b[i:i + bsz])))
                         for i in range(0, len(a), bsz)])


def generate_volumes(gen: Generator, config, emb: np.ndarray, mask: np.ndarray,
                     sampler_for=None) -> Iterator[tuple[float, np.ndarray]]:
  """Per guidance scale of `config.eval.guidance_scales`: (scale, volumes `[K, P, D, H, W, 1]`)
  for K = `eval.num_per_prompt` evaluation noises × the P prompts (`emb [P, L, E]`,
  `mask [P, L]`), in batches of `eval.batch_size` (`generate.generate`)."""
  bsz = config.eval.batch_size
  return generate(gen, range(config.eval.num_per_prompt), emb, mask, config.eval.guidance_scales,
                  noise_seed=config.seed + EVAL_STREAM,
                  key=jax.random.key(config.seed + EVAL_STREAM + SAMPLE_STREAM), batch_size=bsz,
                  negative=config.sample.guidance_negative, desc="evaluate",
                  sampler_for=sampler_for or eval_sampler(gen, config))


def eval_sampler(gen: Generator, config):
  """`generate.sampler_on_mesh` of `gen` at `eval.batch_size` with the config's guidance
  settings."""
  return sampler_on_mesh(gen, config.eval.batch_size, "eval.batch_size", **sampling_kwargs(config))


def _ground_truth(rule: phantom_lib.PhantomRule, volumes: np.ndarray, prompts: list[str]
                  ) -> dict:
  """Phantom rule per volume `[K, P, D, H, W, 1]` → `phantom.prompt_effect` (means, change vs
  the factual prompt, class-hit rates, ordering) plus the PSNR of each counterfactual to its
  factual outside the template white matter (where nothing should change)."""
  vals = np.asarray([[rule.measure(v) for v in row] for row in volumes])
  out = phantom_lib.prompt_effect(vals, prompts, rule.dataset)
  outside = ~rule.reference.wm_mask
  out["psnr_outside_wm"] = float(np.mean([
      phantom_lib.masked_psnr(volumes[k, 0, ..., 0], volumes[k, p, ..., 0], outside, 2.0)
      for k in range(volumes.shape[0]) for p in range(1, volumes.shape[1])]))
  return out


def evaluate(config, workdir: str, out_dir: str | None = None) -> dict:
  """Runs the evaluation and writes `out_dir` (default `WORKDIR/eval/`); returns the results."""
  from cf3d_jax import calibrate as calibrate_lib
  from cf3d_jax import classifier as classifier_lib
  config_base.validate(config)
  gen = load_generator(config, workdir)
  prompts, dataset = list(config.sample.prompts), config.data.dataset
  emb, mask = gen.table.lookup(prompts)                  # PromptError for unknown prompts
  if len(prompts) < 2:
    raise ConfigError("config.sample.prompts: evaluation needs a factual prompt and at least one "
                      "counterfactual prompt")
  shape = tuple(config.data.shape)
  ms_kw = ms_ssim_settings(config, shape)
  bsz = config.eval.batch_size
  wd = Workdir(workdir)
  index = records.load_index(wd.records)
  entries = split_entries(index, config.eval.real_split, config.seed, tuple(config.data.split))
  if not entries:
    raise ConfigError(f"config.eval.real_split={config.eval.real_split!r} holds no subjects")
  real_recs = read_records(wd.records, index, entries)
  real = np.stack([rec["volume"] for rec in real_recs]).astype(np.float32)
  real_labels = np.asarray([int(rec["label"]) for rec in real_recs])
  feats, feat_what = feature_extractor(config)
  real_stats = fid_lib.feature_statistics(_features(feats, real, bsz))
  texture_levels = texture_lib.max_levels(shape)
  real_texture = texture_lib.mean_detail_energy(real, texture_levels, bsz)   # once, for every row
  # The realism floor: FID between the real train split and the real eval split (what a
  # generator that reproduced the training distribution exactly would score, at this size).
  train_entries = split_entries(index, "train", config.seed, tuple(config.data.split))
  train_real = np.stack([rec["volume"] for rec in read_records(
      wd.records, index, train_entries)]).astype(np.float32)
  fid_floor = fid_lib.frechet_distance(
      *fid_lib.feature_statistics(_features(feats, train_real, bsz)), *real_stats)
  reference = phantom_reference.find_reference(wd.reference)
  rule = (phantom_lib.PhantomRule.build(dataset, reference, config.eval.lesion_threshold)
          if reference is not None and tuple(reference.shape) == shape else None)
  ms_ssim = jax.jit(lambda a, b: image_lib.ms_ssim_3d(a, b, 2.0, **ms_kw))
  psnr = jax.jit(lambda a, b: image_lib.psnr(a, b, 2.0))
  predictor = classifier_lib.find_predictor(config, workdir)
  # Checked before anything is decoded: a calibration of this checkpoint and these settings.
  calibration = (calibrate_lib.load_calibration(config, workdir, gen.step)
                 if config.sample.calibrate else None)
  classes = [prompt_lib.prompt_class(dataset, p) for p in prompts]
  labels = np.asarray([-1 if c is None else c for c in classes])
  result = {"checkpoint_step": gen.step, "seed": config.seed, "dataset": dataset,
            "objective": config.objective.name, "prompts": prompts,
            "num_per_prompt": config.eval.num_per_prompt, "real_split": config.eval.real_split,
            "num_real": len(real), "fid_features": feat_what, "fid_floor": fid_floor,
            "num_real_train": len(train_real),
            "ms_ssim": {"kernel_size": ms_kw["kernel_size"], "weights": list(ms_kw["weights"]),
                        "data_range": 2.0}, "scales": []}
  if predictor is not None:
    result["classifier"] = {"path": predictor.path,
                            "real_accuracy": float(np.mean(
                                predictor.predict(real, bsz) == real_labels))}
  rng = np.random.default_rng([config.seed, 17])

  def measure(vols: np.ndarray) -> dict:
    """Every column of one set of volumes `[K, P, D, H, W, 1]` (module docstring)."""
    vols = np.asarray(vols, np.float32)
    k_total, n_prompts = vols.shape[:2]
    flat = vols.reshape((-1,) + vols.shape[2:])
    row = {}
    gen_stats = fid_lib.feature_statistics(_features(feats, flat, bsz))
    row["fid"] = fid_lib.frechet_distance(*gen_stats, *real_stats)
    div = []
    for p in range(n_prompts):
      i, j = image_lib.sample_pairs(k_total, config.eval.diversity_pairs or None,
                                    seed=int(rng.integers(1 << 30)))
      if len(i):
        div.append(_pairwise(ms_ssim, vols[i, p], vols[j, p], bsz))
    row["ms_ssim_diversity"] = float(np.mean(np.concatenate(div))) if div else float("nan")
    fact = np.repeat(vols[:, :1], n_prompts - 1, axis=1).reshape((-1,) + vols.shape[2:])
    cf = vols[:, 1:].reshape((-1,) + vols.shape[2:])
    row["ms_ssim_preservation"] = float(np.mean(_pairwise(ms_ssim, fact, cf, bsz)))
    row["psnr_preservation"] = float(np.mean(_pairwise(psnr, fact, cf, bsz)))
    if predictor is not None and (labels >= 0).any():
      pred = predictor.predict(flat, bsz).reshape(k_total, n_prompts)
      ok = pred == labels[None, :]
      keep = labels >= 0
      row["alignment"] = float(ok[:, 1:][:, keep[1:]].mean()) if keep[1:].any() else float("nan")
      row["alignment_all"] = float(ok[:, keep].mean())
    row["fid_vs_floor"] = row["fid"] / result["fid_floor"] if result["fid_floor"] > 0 else None
    row["texture"] = texture_lib.energy_ratio(
        texture_lib.mean_detail_energy(flat, texture_levels, bsz), real_texture)
    if rule is not None:
      row["ground_truth"] = _ground_truth(rule, vols, prompts)
    return row

  sampler_for = eval_sampler(gen, config)   # one compile per scale, shared by both sets
  for scale, vols in generate_volumes(gen, config, emb, mask, sampler_for):
    row = {"guidance_scale": float(scale), **measure(vols)}
    result["scales"].append(row)
    logging.info("evaluate w=%g: %s", scale, {k: v for k, v in row.items()
                                               if not isinstance(v, dict)})
  if calibration is not None:   # each prompt at the scale --mode=calibrate chose for it
    chosen = [float(calibration["chosen_scale"][p]) for p in prompts]
    vols = calibrate_lib.decode_calibrated(
        gen, chosen, emb, mask, num_subjects=config.eval.num_per_prompt,
        seed=config.seed + EVAL_STREAM, batch_size=bsz,
        negative=config.sample.guidance_negative, sampler_for=sampler_for)
    result["calibrated"] = {"chosen_scale": dict(zip(prompts, chosen)),
                            "num_noises": calibration["num_noises"], **measure(vols)}
    logging.info("evaluate calibrated %s: %s", chosen, {
        k: v for k, v in result["calibrated"].items() if not isinstance(v, dict)})
  if parallel.is_writer():   # multi-host: every process evaluates, process 0 writes
    out_dir = out_dir or Workdir(workdir).eval
    write_text(os.path.join(out_dir, "results.json"), json.dumps(result, indent=1))
    write_text(os.path.join(out_dir, "results.md"), results_markdown(result))
    plot_guidance(result, os.path.join(out_dir, "guidance.png"))
  return result


def _fmt(v, digits=4) -> str:
  return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def _by_scale(result: dict) -> list[dict]:
  """The per-scale rows in increasing guidance scale (Table 1's scale may come first in config)."""
  return sorted(result["scales"], key=lambda row: row["guidance_scale"])


def plot_guidance(result: dict, path: str) -> None:
  """Alignment (if a classifier was found) and preservation against the guidance scale."""
  plt = pyplot()
  rows = _by_scale(result)
  w = [row["guidance_scale"] for row in rows]
  fig, ax = plt.subplots(figsize=(4.5, 3.2))
  ax.plot(w, [row["ms_ssim_preservation"] for row in rows], "o-", label="MS-SSIM preservation")
  if all("alignment" in row for row in rows):
    ax.plot(w, [row["alignment"] for row in rows], "s-", label="alignment")
  ax.set_xlabel("guidance scale w")
  ax.set_ylim(0, 1.02)
  ax.legend(fontsize=8)
  fig.tight_layout()
  save_png(fig, path)


def results_markdown(result: dict) -> str:
  """Table 1 (first scale) and Table 2 (every scale, increasing w) in the paper's layout."""
  first = result["scales"][0]
  lines = [f"# Evaluation: {result['objective']} on {result['dataset']} "
           f"(checkpoint {result['checkpoint_step']}, {result['num_per_prompt']} per prompt)", "",
           f"FID features: {result['fid_features']}.",
           f"Real volumes: {result['num_real']} ({result['real_split']} split).", ""]
  if "classifier" in result:
    lines.append(f"Classifier accuracy on real {result['real_split']} volumes: "
                 f"{100 * result['classifier']['real_accuracy']:.2f}%.")
    lines.append("")
  if "fid_floor" in result:
    lines += [f"Realism floor: FID between the real train ({result['num_real_train']}) and "
              f"{result['real_split']} volumes = {_fmt(result['fid_floor'])}; each row's "
              "'FID / floor' divides by it.", ""]
  lines += [f"## Table 1 (guidance w = {first['guidance_scale']:g})", "",
            "| FID ↓ | MS-SSIM div ↓ | MS-SSIM pres ↑ | PSNR ↑ | align % ↑ |",
            "| --- | --- | --- | --- | --- |",
            f"| {_fmt(first['fid'])} | {_fmt(first['ms_ssim_diversity'])} | "
            f"{_fmt(first['ms_ssim_preservation'])} | {_fmt(first['psnr_preservation'], 2)} | "
            f"{_fmt(100 * first['alignment'], 2) if 'alignment' in first else '—'} |", "",
            "## Table 2 (guidance sweep)", "",
            "| w | align % ↑ | MS-SSIM pres ↑ | PSNR ↑ | FID ↓ | FID / floor ↓ | texture per level (1 = data) |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
  for row in _by_scale(result):
    align = _fmt(100 * row["alignment"], 2) if "alignment" in row else "—"
    texture = texture_lib.format_per_level((row.get("texture") or {}).get("per_level"))
    lines.append(f"| {row['guidance_scale']:g} | {align} | {_fmt(row['ms_ssim_preservation'])} | "
                 f"{_fmt(row['psnr_preservation'], 2)} | {_fmt(row['fid'])} | "
                 f"{_fmt(row.get('fid_vs_floor'), 2)} | {texture} |")
  cal = result.get("calibrated")
  if cal is not None:
    scales = ", ".join(f"{p} w = {w:g}" for p, w in cal["chosen_scale"].items())
    align = _fmt(100 * cal["alignment"], 2) if "alignment" in cal else "—"
    texture = texture_lib.format_per_level((cal.get("texture") or {}).get("per_level"))
    lines += ["", "## Calibrated guidance (each prompt at the scale --mode=calibrate chose on "
              f"{cal['num_noises']} held-out noises)", "", f"Scales: {scales}.", "",
              "| align % ↑ | MS-SSIM pres ↑ | PSNR ↑ | FID ↓ | FID / floor ↓ | texture per level (1 = data) |",
              "| --- | --- | --- | --- | --- | --- |",
              f"| {align} | {_fmt(cal['ms_ssim_preservation'])} | "
              f"{_fmt(cal['psnr_preservation'], 2)} | {_fmt(cal['fid'])} | "
              f"{_fmt(cal.get('fid_vs_floor'), 2)} | {texture} |"]
  gts = [(f"{row['guidance_scale']:g}", row) for row in _by_scale(result)
         if "ground_truth" in row]
  if cal is not None and "ground_truth" in cal:
    gts.append(("calibrated", cal))
  if gts:
    stat = gts[0][1]["ground_truth"]["stat"]
    lines += ["", f"## Phantom ground truth ({stat}, measured in generated volumes)", "",
              "| w | prompt | mean | change vs factual | in class range | ordered | "
              "PSNR outside WM |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, row in gts:
      gt = row["ground_truth"]
      ordered = gt.get("ordered_fraction")
      changes = gt.get("change_vs_first", gt.get("mean_change_vs_factual", {}))
      for p, mean in gt["mean"].items():
        change = changes.get(p)
        hit = gt.get("class_hit_rate", {}).get(p)
        lines.append(f"| {label} | {p} | {mean:.2f} | "
                     f"{'—' if change is None else f'{change:+.2f}'} | "
                     f"{'—' if hit is None else f'{100 * hit:.0f}%'} | "
                     f"{'—' if ordered is None else f'{100 * ordered:.0f}%'} | "
                     f"{_fmt(gt.get('psnr_outside_wm'), 2)} |")
  return "\n".join(lines) + "\n"

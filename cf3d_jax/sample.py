"""`--mode=sample`: counterfactuals from fixed noise under every prompt and guidance scale.

For each of K subjects (noise `z_T[k] = normal(fold_in(key(seed + SAMPLE_STREAM), k))`, the same
for every prompt and scale) the sampler decodes under each prompt of `config.sample.prompts`; the
first prompt is the factual reference. Outputs under `WORKDIR/samples/`:
  `g{scale}/subject_{k:03d}/{prompt-slug}.nii.gz`   each volume, with the dataset grid's affine
                                                      (slugs made unique: '-2', '-3' for prompts
                                                      that differ only in case or punctuation);
  `g{scale}/subject_{k:03d}.png`                     montage: axial/coronal/sagittal mid-slices of
                                                      each prompt, then difference maps vs prompt 0,
                                                      then a real held-out scan of the factual
                                                      prompt's class for comparison (index.json's
                                                      `real_comparison` names it);
  `index.json`                                       every item with its phantom measurement
                                                      (MS lesion volume, AD ventricle volume) and
                                                      PSNR to the factual outside the template WM;
                                                      per scale `prompt_effect`: means, change vs
                                                      the first prompt, class-hit rates and
                                                      ordering (`cf3d_jax.metrics.phantom`).

With `config.sample.calibrate` set, the guidance set `calibrated/` follows the scales: each
prompt decoded at the scale `--mode=calibrate` chose for it on held-out noises of this model
(`cf3d_jax.calibrate`; index items carry `"set": "calibrated"` and their own `guidance_scale`;
`prompt_effect['calibrated']` lists the scales).

With `config.sample.edit_mask` set ('template_wm' or a NIfTI mask), each counterfactual may
change only that region: it follows the factual prompt's sampling trajectory outside the mask at
every step and equals the factual volume there (`generate.generate`).

Real-subject counterfactuals (`config.sample.source` set) are made by `cf3d_jax.invert`
(inversion of the given scans, blended editing); the index's measurements and the output folder
come from `cf3d_jax.sample_index`.

Each run writes its whole output folder under a temporary name and renames it onto
`samples/` (`samples_source/`) when complete: the folder never mixes files of two runs, and a
killed run leaves the previous one in place.
"""

from __future__ import annotations

import json
import os

import jax
from absl import logging

from cf3d_jax import calibrate as calibrate_lib
from cf3d_jax import sample_index
from cf3d_jax.checkpoints import load_generator
from cf3d_jax.data import nifti, phantom_reference
from cf3d_jax.figures import save_montage
from cf3d_jax.files import write_text
from cf3d_jax.generate import SAMPLE_STREAM, generate, sampler_on_mesh, sampling_kwargs
from cf3d_jax.invert import edit_masks, sample_from_sources
from cf3d_jax.workdir import Workdir


def sample_counterfactuals(config, workdir: str) -> dict:
  """Writes NIfTI volumes, montages and `samples/index.json`; returns the index.

  With `config.sample.source` set, makes real-subject counterfactuals instead
  (`invert.sample_from_sources`, outputs under `samples_source/`).
  """
  if config.sample.source:
    return sample_from_sources(config, workdir)
  gen = load_generator(config, workdir)
  prompts = list(config.sample.prompts)
  emb, mask = gen.table.lookup(prompts)                  # PromptError for unknown prompts
  reference = phantom_reference.find_reference(Workdir(workdir).reference)
  rule = sample_index.phantom_rule(reference, config)
  masks = edit_masks(config, reference, gen.latent_shape)   # None: prompts may change everything
  bsz = config.sample.batch_size
  out_dir = Workdir(workdir).samples
  names = sample_index.prompt_file_names(prompts)
  entries = []
  sampler_for = sampler_on_mesh(gen, bsz, "sample.batch_size", **sampling_kwargs(config))
  # Checked before anything is decoded: a calibration of this checkpoint and these settings.
  calibration = (calibrate_lib.load_calibration(config, workdir, gen.step)
                 if config.sample.calibrate else None)
  real = sample_index.real_comparison(config, workdir, prompts[0])

  def record(tmp_dir, folder: str, volumes, prompt_scales, set_name=None):
    """Writes `volumes` [K, P, D, H, W] under `folder/` and appends their index entries."""
    for k in range(config.sample.num_subjects):
      sub_dir = f"{folder}/subject_{k:03d}"
      for p, prompt in enumerate(prompts):
        rel = os.path.join(sub_dir, names[p])
        if tmp_dir is not None:   # multi-host: every process samples, process 0 writes
          nifti.save_volume(os.path.join(tmp_dir, rel), volumes[k, p], gen.affine)
        entry = {"subject": k, "prompt": prompt, "guidance_scale": float(prompt_scales[p]),
                 "nifti": rel}
        if set_name:
          entry["set"] = set_name
        sample_index.ground_truth_stats(entry, volumes[k, p], rule, volumes[k, 0] if p else None)
        entries.append(entry)
      if tmp_dir is not None:
        save_montage(os.path.join(tmp_dir, sub_dir + ".png"), list(volumes[k]), prompts,
                     real=None if real is None else (real["title"], real["volume"]))

  with sample_index.output_folder(out_dir) as tmp_dir:   # None on processes that do not write
    for scale, x in generate(gen, range(config.sample.num_subjects), emb, mask,
                             config.sample.guidance_scales, noise_seed=config.seed,
                             key=jax.random.key(config.seed + SAMPLE_STREAM), batch_size=bsz,
                             negative=config.sample.guidance_negative, sampler_for=sampler_for,
                             desc="sampling", edit_masks=masks):
      record(tmp_dir, f"g{scale:g}", x[..., 0], [scale] * len(prompts))
    if calibration is not None:   # each prompt at the scale --mode=calibrate chose for it
      chosen = [calibration["chosen_scale"][p] for p in prompts]
      x = calibrate_lib.decode_calibrated(
          gen, chosen, emb, mask, num_subjects=config.sample.num_subjects, seed=config.seed,
          batch_size=bsz, negative=config.sample.guidance_negative, sampler_for=sampler_for,
          masks=masks)
      record(tmp_dir, calibrate_lib.SET_NAME, x[..., 0], chosen, calibrate_lib.SET_NAME)
    result = {"checkpoint_step": gen.step, "seed": config.seed, "prompts": prompts,
              "guidance_scales": [float(g) for g in config.sample.guidance_scales],
              "guidance": sample_index.guidance_record(config, prompts[0]),
              "num_subjects": config.sample.num_subjects, "items": entries}
    if calibration is not None:
      result["calibration"] = {"file": "calibration.json", "num_noises": calibration["num_noises"]}
    if real is not None:   # the montages' last row
      result["real_comparison"] = {k: real[k] for k in ("subject_id", "class", "split")}
    effects = sample_index.summarise(result, entries, prompts, config.sample.guidance_scales, rule)
    if tmp_dir is not None:
      write_text(os.path.join(tmp_dir, "index.json"), json.dumps(result, indent=1))
  logging.info("wrote %d volumes to %s", len(entries), out_dir)
  sample_index.report(effects, prompts, out_dir)
  return result

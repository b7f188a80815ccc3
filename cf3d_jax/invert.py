"""Counterfactuals of given scans (`--mode=sample` with `config.sample.source` set).

`sample_from_sources`: each scan is conformed to the training grid, inverted under its factual
prompt with the conditional model (`config.sample.inversion`: 'ddim' = deterministic DDIM or
rectified-flow ODE inversion, `objectives.guidance.invert_loop`; 'edit_friendly' = DDPM noise
maps, `objectives.guidance.edit_friendly_inversion`, whose residuals replace the sampler's noise
when decoding), then decoded under every prompt and guidance scale. Outputs under
`WORKDIR/samples_source/` in the layout of `samples/` (`subject_k` = the k-th scan), plus
`subject_{k:03d}/input.nii.gz` (the conformed scan), montages whose first row is the input and whose differences are against it, and in index.json
each scan's `reconstruction_psnr_db` (invert → decode under the factual prompt at w = 1) and
each item's `psnr_vs_input_db`.

`resolve_sources` reads what `config.sample.source` names, `load_source` conforms a scan to the
training grid, `edit_masks` makes the masks of blended editing (`config.sample.edit_mask`). The
output folder is written as `cf3d_jax.sample` writes `samples/` (`sample_index.output_folder`).
"""

from __future__ import annotations

import csv
import glob
import json
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cf3d_jax import sample_index
from cf3d_jax.background import background_of
from cf3d_jax.checkpoints import load_generator
from cf3d_jax.data import nifti, phantom_reference
from cf3d_jax.errors import ConfigError, DataError
from cf3d_jax.figures import save_montage
from cf3d_jax.files import write_text
from cf3d_jax.generate import SAMPLE_STREAM, batched, guidance_negatives, make_inverter, \
    make_sampler, mesh_kwargs, sampling_kwargs
from cf3d_jax.metrics.image import psnr
from cf3d_jax.text import prompts as prompt_lib
from cf3d_jax.workdir import Workdir


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def resolve_sources(spec: str, dataset: str) -> list[dict]:
  """The scans `config.sample.source` names: `[{"path", "prompt" (or None)}]`.

  spec: comma-separated NIfTI paths, globs and folders (every *.nii / *.nii.gz inside, sorted),
  or one CSV with a `path` column (relative to the CSV) and optionally `prompt`, or
  `lesion_volume_ml` (ms) / `diagnosis` (adni) from which the class's canonical prompt is made.
  """
  if spec.endswith(".csv"):
    return _sources_from_csv(spec, dataset)
  out = []
  for part in (p.strip() for p in spec.split(",")):
    if not part:
      continue
    if os.path.isdir(part):
      found = sorted(f for f in glob.glob(os.path.join(part, "*")) if f.endswith(NIFTI_SUFFIXES))
      if not found:
        raise DataError(f"{part}: config.sample.source folder holds no .nii/.nii.gz files")
    elif any(ch in part for ch in "*?["):
      found = sorted(glob.glob(part))
      if not found:
        raise DataError(f"{part}: config.sample.source pattern matches no file")
    elif not os.path.exists(part):
      raise DataError(f"{part}: config.sample.source file not found")
    else:
      found = [part]
    out += [{"path": f, "prompt": None} for f in found]
  if not out:
    raise ConfigError(f"config.sample.source={spec!r} names no scan")
  return out


def _sources_from_csv(path: str, dataset: str) -> list[dict]:
  if not os.path.exists(path):
    raise DataError(f"{path}: config.sample.source CSV not found")
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  if not rows or "path" not in rows[0]:
    raise DataError(f"{path}: source CSV needs a header with a `path` column and at least one row")
  base = os.path.dirname(os.path.abspath(path))
  out = []
  for n, row in enumerate(rows, start=2):
    prompt = row.get("prompt") or None
    try:
      if prompt is None and row.get("lesion_volume_ml"):
        prompt = prompt_lib.canonical_prompt(
            "ms", prompt_lib.lesion_class(float(row["lesion_volume_ml"])))
      elif prompt is None and row.get("diagnosis"):
        prompt = prompt_lib.canonical_prompt("adni", prompt_lib.diagnosis_class(row["diagnosis"]))
    except (ValueError, DataError) as e:
      raise DataError(f"{path} row {n}: {e}") from e
    scan = row["path"] if os.path.isabs(row["path"]) else os.path.join(base, row["path"])
    if not os.path.exists(scan):
      raise DataError(f"{path} row {n}: scan {scan} not found")
    out.append({"path": scan, "prompt": prompt})
  del dataset
  return out


def _factual_prompts(config, sources: list[dict], prompts: list[str]) -> list[str]:
  given = list(config.sample.source_prompts)
  if given and len(given) != len(sources):
    raise ConfigError(f"config.sample.source_prompts has {len(given)} prompts for "
                      f"{len(sources)} source scans; give one per scan or none")
  return [given[k] if given else (s["prompt"] or prompts[0]) for k, s in enumerate(sources)]


def load_source(path: str, config, grid_affine: np.ndarray | None = None) -> np.ndarray:
  """A scan conformed to the training grid, float32 `[D, H, W]` in [-1, 1] (as `prepare` does).

  A volume already on the training grid (shape `data.shape`, affine `grid_affine`) with
  intensities in [-1, 1] — a generated sample, or a prepared subject written by
  `cf3d_jax.data.export` — is taken as it is: re-normalising it by percentiles would change it.
  """
  data, affine = nifti.load_volume(path)
  if (grid_affine is not None and data.shape == tuple(config.data.shape)
      and np.allclose(affine, grid_affine, atol=1e-3)
      and float(data.min()) >= -1.0 - 1e-6 and float(data.max()) <= 1.0 + 1e-6):
    return np.clip(data, -1.0, 1.0).astype(np.float32)
  try:
    volume, _ = nifti.conform(data, affine, config.data.shape, config.data.fov_mm,
                              config.data.intensity_percentiles)
  except DataError as e:
    raise DataError(f"{path}: {e}") from e
  return volume


def edit_masks(config, reference, z_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray] | None:
  """`config.sample.edit_mask` → (mask on z's grid `[1, d, h, w, 1]`, image mask
  `[1, D, H, W, 1]`), float32 in {0, 1}; None when unset. 'template_wm' = the phantom
  reference's white-matter mask (where lesions are measured); else a NIfTI mask on the training
  grid (nonzero = editable). A z voxel is editable if any image voxel it covers is."""
  spec = config.sample.edit_mask
  if not spec:
    return None
  shape = tuple(config.data.shape)
  if spec == "template_wm":
    if reference is None:
      raise ConfigError("config.sample.edit_mask='template_wm' needs the phantom reference "
                        "(WORKDIR/data/reference.npz, written by prepare for phantom data); give "
                        "a NIfTI mask path instead")
    mask = np.asarray(reference.wm_mask, bool)
  else:
    data, _ = nifti.load_volume(spec)
    if data.shape != shape:
      raise DataError(f"{spec}: edit mask of shape {data.shape}; expected the training grid "
                      f"{shape} (config.data.shape)")
    mask = data != 0
  if not mask.any():
    raise DataError(f"config.sample.edit_mask={spec!r}: the mask is empty")
  f = [s // z for s, z in zip(shape, tuple(z_shape)[:3])]
  d, h, w = tuple(z_shape)[:3]
  mask_z = mask.reshape(d, f[0], h, f[1], w, f[2]).any(axis=(1, 3, 5))
  as_input = lambda m: m.astype(np.float32)[None, ..., None]
  return as_input(mask_z), as_input(mask)


# Key stream of edit-friendly inversion's noisy copies (scan k: fold_in(key(seed + this), k)).
INVERSION_STREAM = 7_919


def inversion_key(seed: int, k: int) -> jax.Array:
  """The key of scan k's edit-friendly noise maps: fixed by the config seed and the scan's
  index, not by the batch it falls in."""
  return jax.random.fold_in(jax.random.key(seed + INVERSION_STREAM), k)


def invert_scans(gen, config, inputs: np.ndarray, f_emb: np.ndarray, f_mask: np.ndarray, masks
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
  """Inverts `inputs` `[N, D, H, W, 1]` under their factual prompts' embeddings (conditional
  model, `config.sample.inversion` / `inversion_depth` / `inversion_refine`): (z at the
  inversion depth `[N, d, h, w, C]`, the inversion trajectory `[N, S', ...]` that blended editing
  follows (None for DDIM inversion without `masks`), the edit-friendly residuals `[N, S', ...]`
  or None)."""
  bsz = config.sample.batch_size
  method = str(config.sample.inversion)
  invert = make_inverter(gen.model, gen.objective, gen.space, config.sample.inversion_refine,
                         float(config.sample.inversion_depth), trajectory=masks is not None,
                         method=method, **mesh_kwargs(gen, bsz, "sample.batch_size"))
  if method == "edit_friendly":
    keys = jax.random.key_data(jax.vmap(lambda k: inversion_key(int(config.seed), k))(
        jnp.arange(len(inputs))))
    return batched(lambda _, x, e, m, k: invert(gen.params, x, e, m, k), len(inputs), bsz,
                   inputs, f_emb, f_mask, np.asarray(keys))
  out = batched(lambda _, x, e, m: invert(gen.params, x, e, m), len(inputs), bsz, inputs, f_emb,
                f_mask)
  return out + (None,) if masks is not None else (out, None, None)


def scan_samplers(gen, config, masks) -> Callable[[float], Callable]:
  """scale → the sampler that decodes given scans from their inversions (depth, edit masks,
  the edit-friendly residuals, guidance interval and rescale of `config.sample`), made once per
  scale: the calibrated set reuses the plain scales' compiles."""
  made: dict[float, Callable] = {}
  on_mesh = mesh_kwargs(gen, config.sample.batch_size, "sample.batch_size")

  def sampler_for(scale: float) -> Callable:
    if float(scale) not in made:
      made[float(scale)] = make_sampler(
          gen.model, gen.objective, gen.space, float(scale), *gen.null, deterministic=True,
          depth=float(config.sample.inversion_depth), edit_masks=masks,
          residuals=config.sample.inversion == "edit_friendly", **sampling_kwargs(config),
          **on_mesh)
    return made[float(scale)]

  return sampler_for


def decode_scans(gen, config, sampler_for, scale: float, inverted, inputs: np.ndarray,
                 ks: np.ndarray, ps: np.ndarray, emb: np.ndarray, mask: np.ndarray,
                 f_emb: np.ndarray, f_mask: np.ndarray) -> np.ndarray:
  """Item i = scan `ks[i]` decoded under prompt `ps[i]` at guidance scale `scale` from its
  inversion (`invert_scans`: with a trajectory when the samplers blend in edit masks) with
  `sampler_for(scale)` (`scan_samplers`), guided against `config.sample.guidance_negative`
  (the scan's factual prompt for 'factual'): volumes `[len(ks), D, H, W, 1]`."""
  z_T, known, residuals = inverted
  bsz = config.sample.batch_size
  run = sampler_for(scale)
  key = jax.random.key(config.seed + SAMPLE_STREAM)
  neg_e, neg_m = guidance_negatives(config.sample.guidance_negative, emb[ps], mask[ps],
                                    f_emb[ks], f_mask[ks], gen.null)
  res = () if residuals is None else (residuals[ks],)
  res_kw = lambda r: {} if not r else {"residuals": r[0]}
  if config.sample.edit_mask:           # the samplers blend (`scan_samplers` made them with masks)
    return batched(lambda _, z, e, m, ne, nm, kn, xin, *r: run(gen.params, z, e, m, key, kn, xin,
                                                               ne, nm, **res_kw(r)),
                   len(ks), bsz, z_T[ks], emb[ps], mask[ps], neg_e, neg_m, known[ks], inputs[ks],
                   *res)
  return batched(lambda _, z, e, m, ne, nm, *r: run(gen.params, z, e, m, key, ne, nm,
                                                    **res_kw(r)),
                 len(ks), bsz, z_T[ks], emb[ps], mask[ps], neg_e, neg_m, *res)


def sample_from_sources(config, workdir: str) -> dict:
  """Real-subject counterfactuals of the scans `config.sample.source` names (module docstring).
  With `config.sample.calibrate`, also the set `calibrated/`: each prompt at the scale
  `--mode=calibrate` chose for given scans (`cf3d_jax.calibrate.calibrate_scans`)."""
  from tqdm import tqdm
  from cf3d_jax import calibrate as calibrate_lib
  prompts = list(config.sample.prompts)
  # The sources first: a missing scan or a bad CSV row is reported before the checkpoint loads.
  sources = resolve_sources(config.sample.source, config.data.dataset)
  factual = _factual_prompts(config, sources, prompts)
  gen = load_generator(config, workdir)
  emb, mask = gen.table.lookup(prompts)                  # PromptError for unknown prompts
  reference = phantom_reference.find_reference(Workdir(workdir).reference)
  rule = sample_index.phantom_rule(reference, config)
  f_emb, f_mask = gen.table.lookup(factual)
  # Checked before anything is decoded: a given-scan calibration of this checkpoint and settings.
  items = [(k, p) for k in range(len(sources)) for p in range(len(prompts))]
  calibrated = None   # item (scan k, prompt p): the w chosen for k's factual prompt → p
  if config.sample.calibrate:
    calibration = calibrate_lib.load_calibration(config, workdir, gen.step, scans=True)
    calibrated = np.asarray([calibrate_lib.scan_scale(calibration, factual[k], prompts[p],
                                                      workdir) for k, p in items])
  inputs = np.stack([load_source(s["path"], config, gen.affine)
                     for s in tqdm(sources, desc="loading", unit="scan",
                                              disable=jax.process_index() > 0)])[..., None]
  n = len(sources)
  depth = float(config.sample.inversion_depth)
  masks = edit_masks(config, reference, gen.latent_shape)
  inverted = invert_scans(gen, config, inputs, f_emb, f_mask, masks)
  sampler_for = scan_samplers(gen, config, masks)
  key = jax.random.key(config.seed + SAMPLE_STREAM)
  # Reconstruction: decode under the factual prompt with the conditional model.
  edit_friendly = config.sample.inversion == "edit_friendly"
  plain = make_sampler(gen.model, gen.objective, gen.space, 1.0, *gen.null, deterministic=True,
                       depth=depth, background=background_of(config), residuals=edit_friendly,
                       **mesh_kwargs(gen, config.sample.batch_size, "sample.batch_size"))
  recon = batched(lambda _, z, e, m, *r: plain(gen.params, z, e, m, key,
                                               **({"residuals": r[0]} if r else {})), n,
                  config.sample.batch_size, inverted[0], f_emb, f_mask,
                  *(() if inverted[2] is None else (inverted[2],)))
  recon_psnr = np.asarray(psnr(jnp.asarray(recon), jnp.asarray(inputs), 2.0))
  ks, ps = np.asarray([k for k, _ in items]), np.asarray([p for _, p in items])
  out_dir = Workdir(workdir).samples_source
  names = sample_index.prompt_file_names(prompts)
  entries = []
  # (folder, scale per item, set name): the plain scales, then the calibrated set.
  runs = [(f"g{scale:g}", np.full(len(items), float(scale)), None)
          for scale in config.sample.guidance_scales]
  if calibrated is not None:
    runs.append((calibrate_lib.SET_NAME, calibrated, calibrate_lib.SET_NAME))
  with sample_index.output_folder(out_dir) as tmp_dir:   # None on processes that do not write
    for folder, item_scales, set_name in runs:
      x = np.zeros((len(items),) + inputs.shape[1:], np.float32)
      for w in sorted(set(item_scales.tolist())):   # one sampler per distinct scale
        sel = np.flatnonzero(item_scales == w)
        x[sel] = decode_scans(gen, config, sampler_for, w, inverted, inputs, ks[sel], ps[sel],
                              emb, mask, f_emb, f_mask)
      scores = np.asarray(psnr(jnp.asarray(x), jnp.asarray(inputs[ks]), 2.0))
      for k, src in enumerate(sources):
        sub = os.path.join(folder, f"subject_{k:03d}")
        write = tmp_dir is not None   # multi-host: every process samples, process 0 writes
        if write:
          nifti.save_volume(os.path.join(tmp_dir, sub, "input.nii.gz"), inputs[k, ..., 0],
                            gen.affine)
        vols = []
        for i in np.flatnonzero(ks == k):
          prompt = prompts[ps[i]]
          rel = os.path.join(sub, names[ps[i]])
          if write:
            nifti.save_volume(os.path.join(tmp_dir, rel), x[i, ..., 0], gen.affine)
          entry = {"subject": k, "source": src["path"], "factual_prompt": factual[k],
                   "prompt": prompt, "guidance_scale": float(item_scales[i]), "nifti": rel,
                   "psnr_vs_input_db": float(scores[i])}
          if set_name:
            entry["set"] = set_name
          sample_index.ground_truth_stats(entry, x[i, ..., 0], rule, inputs[k, ..., 0])
          entries.append(entry)
          vols.append(x[i, ..., 0])
        if write:
          save_montage(os.path.join(tmp_dir, sub) + ".png", [inputs[k, ..., 0]] + vols,
                  ["input: " + os.path.basename(src["path"])] + prompts)
    result = {"checkpoint_step": gen.step, "seed": config.seed, "prompts": prompts,
              "guidance_scales": [float(g) for g in config.sample.guidance_scales],
              "guidance": sample_index.guidance_record(config, "each scan's factual prompt"),
              "num_subjects": n, "objective": config.objective.name,
              "inversion": {"sampler_steps": int(len(gen.objective.timesteps())),
                            "depth": depth,
                            "method": str(config.sample.inversion),
                            "refine_iters": int(config.sample.inversion_refine),
                            "edit_mask": config.sample.edit_mask or None,
                            "guidance": "conditional model (w = 1) under the factual prompt"},
              "sources": [{"subject": k, "path": s["path"], "factual_prompt": factual[k],
                           "reconstruction_psnr_db": float(recon_psnr[k])}
                          for k, s in enumerate(sources)],
              "mean_reconstruction_psnr_db": float(np.mean(recon_psnr)), "items": entries}
    if calibrated is not None:
      result["calibration"] = {"file": os.path.basename(calibrate_lib.calibration_path(
          workdir, scans=True)), "num_scans": calibration["num_noises"]}
    if rule is not None:
      for src, vol in zip(result["sources"], inputs[..., 0]):
        src[f"input_{rule.stat}"] = rule.measure(vol)
    effects = sample_index.summarise(result, entries, prompts, config.sample.guidance_scales, rule)
    if tmp_dir is not None:
      write_text(os.path.join(tmp_dir, "index.json"), json.dumps(result, indent=1))
  sample_index.report(effects, prompts, out_dir)
  logging.info("inverted %d scans (reconstruction PSNR %.2f dB); wrote %d volumes to %s", n,
               result["mean_reconstruction_psnr_db"], len(entries), out_dir)
  return result

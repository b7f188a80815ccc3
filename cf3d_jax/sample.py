"""`--mode=sample`: counterfactuals from fixed noise under every prompt and guidance scale.

For each of K subjects (noise `z_T[k] = normal(fold_in(key(seed + SAMPLE_STREAM), k))`, the same
for every prompt and scale) the sampler decodes under each prompt of `config.sample.prompts`; the
first prompt is the factual reference. Outputs under `WORKDIR/samples/`:
  `g{scale}/subject_{k:03d}/{prompt-slug}.nii.gz`   each volume, with the dataset grid's affine
                                                      (slugs made unique: '-2', '-3' for prompts
                                                      that differ only in case or punctuation);
  `g{scale}/subject_{k:03d}.png`                     montage: axial/coronal/sagittal mid-slices of
                                                      each prompt, then difference maps vs prompt 0;
  `index.json`                                       every item with its phantom measurement
                                                      (MS lesion volume, AD ventricle volume) and
                                                      PSNR to the factual outside the template WM;
                                                      per scale `prompt_effect`: means, change vs
                                                      the first prompt, class-hit rates and
                                                      ordering (`cf3d_jax.metrics.phantom`).

Real-subject counterfactuals (`config.sample.source` set; `sample_from_sources`): each scan is
conformed to the training grid, inverted deterministically under its factual prompt (DDIM or
rectified-flow ODE inversion, `objectives.guidance.invert_loop`, conditional model), then decoded
from that noise under every prompt and guidance scale with the deterministic sampler. Outputs
under `WORKDIR/samples_source/` in the same layout (`subject_k` = the k-th scan), plus
`subject_{k:03d}/input.nii.gz` (the conformed scan), montages whose first row is the input and
whose differences are against it, and in index.json each scan's `reconstruction_psnr_db`
(invert → decode under the factual prompt at w = 1) and each item's `psnr_vs_input_db`.

Each run writes its whole output folder under a temporary name and renames it onto
`samples/` (`samples_source/`) when complete: the folder never mixes files of two runs, and a
killed run leaves the previous one in place.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cf3d_jax import parallel
from cf3d_jax.checkpoints import load_generator
from cf3d_jax.data import nifti, phantom_reference
from cf3d_jax.errors import ConfigError, DataError
from cf3d_jax.files import atomic_dir, atomic_path, unique_slug, write_text
from cf3d_jax.generate import SAMPLE_STREAM, batched, generate, guidance_negatives, \
    make_inverter, make_sampler, mesh_kwargs, sampler_on_mesh
from cf3d_jax.metrics import phantom as phantom_lib
from cf3d_jax.metrics.image import psnr
from cf3d_jax.text import prompts as prompt_lib
from cf3d_jax.workdir import Workdir


def montage(path: str, volumes: Sequence[np.ndarray], titles: Sequence[str]) -> None:
  """PNG of mid-slices (axial, coronal, sagittal) per volume, then differences vs volume 0.

  volumes: `[D, H, W]` arrays in [-1, 1] (RAS: D = x, H = y, W = z).
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  def views(v):
    d, h, w = (s // 2 for s in v.shape)
    return [np.rot90(v[:, :, w]), np.rot90(v[:, h, :]), np.rot90(v[d, :, :])]

  rows = [(t, views(v), "gray", (-1, 1)) for t, v in zip(titles, volumes)]
  diffs = [v - volumes[0] for v in volumes[1:]]
  lim = max([float(np.abs(d).max()) for d in diffs] + [1e-6])
  rows += [(f"{t} − {titles[0]}", views(d), "RdBu_r", (-lim, lim))
           for t, d in zip(titles[1:], diffs)]
  fig, axes = plt.subplots(len(rows), 3, figsize=(6.6, 2.3 * len(rows)), squeeze=False)
  for r, (title, imgs, cmap, (lo, hi)) in enumerate(rows):
    for c, img in enumerate(imgs):
      ax = axes[r][c]
      ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
    axes[r][0].set_ylabel(title if len(title) < 34 else title[:31] + "…", fontsize=7)
  for c, name in enumerate(("axial", "coronal", "sagittal")):
    axes[0][c].set_title(name, fontsize=8)
  fig.tight_layout()
  with atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=110, format="png")
  plt.close(fig)


def _phantom_rule(reference, config) -> phantom_lib.PhantomRule | None:
  """The dataset's ground-truth rule on the reference grid, or None without a reference."""
  if reference is None or tuple(reference.wm_mask.shape) != tuple(config.data.shape):
    return None
  return phantom_lib.PhantomRule.build(config.data.dataset, reference,
                                       config.eval.lesion_threshold)


def _ground_truth_stats(entry: dict, volume: np.ndarray, rule, reference_volume=None) -> None:
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


def _summarise(result: dict, entries: list[dict], prompts: list[str], scales, rule
               ) -> dict[str, dict]:
  """Adds the measurement rule and, per guidance scale, `phantom.prompt_effect` of the
  `[subjects, prompts]` measurements (means, change vs the first prompt, class-hit rates,
  ordering) under `result['prompt_effect']`; returns that dict."""
  if rule is None or not any(rule.stat in e for e in entries):
    return {}
  result["rule"] = rule.description
  effects = {}
  for g in scales:
    rows = {}
    for e in entries:
      if e["guidance_scale"] == float(g):
        rows.setdefault(e["subject"], {})[e["prompt"]] = e[rule.stat]
    values = np.asarray([[row[p] for p in prompts] for _, row in sorted(rows.items())])
    eff = phantom_lib.prompt_effect(values, prompts, rule.dataset)
    psnrs = [e["psnr_outside_wm_db"] for e in entries
             if e["guidance_scale"] == float(g) and "psnr_outside_wm_db" in e]
    if psnrs:   # None where nothing changed outside the WM (blended edits): counted apart
      finite = [v for v in psnrs if v is not None]
      eff["fraction_unchanged_outside_wm"] = 1.0 - len(finite) / len(psnrs)
      if finite:
        eff["mean_psnr_outside_wm_db"] = float(np.mean(finite))
    effects[f"g{g:g}"] = eff
  result["prompt_effect"] = effects
  return effects


def _guidance_record(config, factual: str) -> dict:
  """What index.json says about guidance: the formula, the negative text and the interval."""
  contrastive = config.sample.guidance_negative == "factual"
  return {"negative": config.sample.guidance_negative,
          "formula": ("out = out_factual + w (out_prompt − out_factual), factual = "
                      f"{factual} (the factual itself: the conditional model at every w)"
                      if contrastive else
                      "out = out_null + w (out_prompt − out_null) (classifier-free guidance)"),
          "interval": [float(v) for v in config.sample.guidance_interval],
          "rescale": float(config.sample.guidance_rescale)}


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


def _report(effects: dict[str, dict], prompts: list[str], out_dir: str) -> None:
  """Logs the per-prompt table (means, class-hit rates, ordering) and where it came from."""
  if effects:
    logging.info("measured in the generated volumes (%s; class-hit rate in brackets):\n%s",
                 next(iter(effects.values()))["stat"],
                 phantom_lib.format_table(effects, prompts))
  logging.info("wrote %s", os.path.join(out_dir, "index.json"))


def sample_counterfactuals(config, workdir: str) -> dict:
  """Writes NIfTI volumes, montages and `samples/index.json`; returns the index.

  With `config.sample.source` set, makes real-subject counterfactuals instead
  (`sample_from_sources`, outputs under `samples_source/`).
  """
  if config.sample.source:
    return sample_from_sources(config, workdir)
  gen = load_generator(config, workdir)
  prompts = list(config.sample.prompts)
  emb, mask = gen.table.lookup(prompts)                  # PromptError for unknown prompts
  rule = _phantom_rule(phantom_reference.find_reference(Workdir(workdir).reference), config)
  bsz = config.sample.batch_size
  out_dir = Workdir(workdir).samples
  names = prompt_file_names(prompts)
  entries = []
  sampler_for = sampler_on_mesh(gen, bsz, "sample.batch_size", config.sample.guidance_interval,
                                config.sample.guidance_rescale)
  with output_folder(out_dir) as tmp_dir:   # None on processes that do not write
    for scale, x in generate(gen, range(config.sample.num_subjects), emb, mask,
                             config.sample.guidance_scales, noise_seed=config.seed,
                             key=jax.random.key(config.seed + SAMPLE_STREAM), batch_size=bsz,
                             negative=config.sample.guidance_negative, sampler_for=sampler_for,
                             desc="sampling"):
      volumes = x[..., 0]                                # [K, P, D, H, W]
      for k in range(config.sample.num_subjects):
        sub_dir = f"g{scale:g}/subject_{k:03d}"
        for p, prompt in enumerate(prompts):
          rel = os.path.join(sub_dir, names[p])
          if tmp_dir is not None:   # multi-host: every process samples, process 0 writes
            nifti.save_volume(os.path.join(tmp_dir, rel), volumes[k, p], gen.affine)
          entry = {"subject": k, "prompt": prompt, "guidance_scale": float(scale), "nifti": rel}
          _ground_truth_stats(entry, volumes[k, p], rule, volumes[k, 0] if p else None)
          entries.append(entry)
        if tmp_dir is not None:
          montage(os.path.join(tmp_dir, sub_dir + ".png"), list(volumes[k]), prompts)
    result = {"checkpoint_step": gen.step, "seed": config.seed, "prompts": prompts,
              "guidance_scales": [float(g) for g in config.sample.guidance_scales],
              "guidance": _guidance_record(config, prompts[0]),
              "num_subjects": config.sample.num_subjects, "items": entries}
    effects = _summarise(result, entries, prompts, config.sample.guidance_scales, rule)
    if tmp_dir is not None:
      write_text(os.path.join(tmp_dir, "index.json"), json.dumps(result, indent=1))
  logging.info("wrote %d volumes to %s", len(entries), out_dir)
  _report(effects, prompts, out_dir)
  return result


# ---- real-subject counterfactuals -----------------------------------------------------------

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


def sample_from_sources(config, workdir: str) -> dict:
  """Real-subject counterfactuals of the scans `config.sample.source` names (module docstring)."""
  from tqdm import tqdm
  gen = load_generator(config, workdir)
  prompts = list(config.sample.prompts)
  emb, mask = gen.table.lookup(prompts)                  # PromptError for unknown prompts
  reference = phantom_reference.find_reference(Workdir(workdir).reference)
  rule = _phantom_rule(reference, config)
  sources = resolve_sources(config.sample.source, config.data.dataset)
  factual = _factual_prompts(config, sources, prompts)
  f_emb, f_mask = gen.table.lookup(factual)
  inputs = np.stack([load_source(s["path"], config, gen.affine)
                     for s in tqdm(sources, desc="loading", unit="scan",
                                              disable=jax.process_index() > 0)])[..., None]
  n, bsz = len(sources), config.sample.batch_size
  depth = float(config.sample.inversion_depth)
  on_mesh = mesh_kwargs(gen, bsz, "sample.batch_size")
  masks = edit_masks(config, reference, gen.latent_shape)
  invert = make_inverter(gen.model, gen.objective, gen.space, config.sample.inversion_refine,
                         depth, trajectory=masks is not None, **on_mesh)
  z_T = batched(lambda _, x, e, m: invert(gen.params, x, e, m), n, bsz, inputs, f_emb, f_mask)
  z_T, known = z_T if masks is not None else (z_T, None)
  key = jax.random.key(config.seed + SAMPLE_STREAM)
  # Reconstruction: decode under the factual prompt with the conditional model.
  plain = make_sampler(gen.model, gen.objective, gen.space, 1.0, *gen.null, deterministic=True,
                       depth=depth, **on_mesh)
  recon = batched(lambda _, z, e, m: plain(gen.params, z, e, m, key), n, bsz, z_T, f_emb, f_mask)
  recon_psnr = np.asarray(psnr(jnp.asarray(recon), jnp.asarray(inputs), 2.0))
  items = [(k, p) for k in range(n) for p in range(len(prompts))]
  ks, ps = np.asarray([k for k, _ in items]), np.asarray([p for _, p in items])
  out_dir = Workdir(workdir).samples_source
  names = prompt_file_names(prompts)
  entries = []
  with output_folder(out_dir) as tmp_dir:   # None on processes that do not write
    for scale in config.sample.guidance_scales:
      run = make_sampler(gen.model, gen.objective, gen.space, float(scale), *gen.null,
                         deterministic=True, depth=depth, edit_masks=masks,
                         interval=tuple(config.sample.guidance_interval),
                         rescale=float(config.sample.guidance_rescale), **on_mesh)
      neg_e, neg_m = guidance_negatives(config.sample.guidance_negative, emb[ps], mask[ps],
                                        f_emb[ks], f_mask[ks], gen.null)
      if masks is None:
        x = batched(lambda _, z, e, m, ne, nm: run(gen.params, z, e, m, key, ne, nm), len(items),
                    bsz, z_T[ks], emb[ps], mask[ps], neg_e, neg_m)
      else:
        x = batched(lambda _, z, e, m, ne, nm, kn, xin: run(gen.params, z, e, m, key, kn, xin, ne,
                                                            nm),
                    len(items), bsz, z_T[ks], emb[ps], mask[ps], neg_e, neg_m, known[ks],
                    inputs[ks])
      scores = np.asarray(psnr(jnp.asarray(x), jnp.asarray(inputs[ks]), 2.0))
      for k, src in enumerate(sources):
        sub = os.path.join(f"g{scale:g}", f"subject_{k:03d}")
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
                   "prompt": prompt, "guidance_scale": float(scale), "nifti": rel,
                   "psnr_vs_input_db": float(scores[i])}
          _ground_truth_stats(entry, x[i, ..., 0], rule, inputs[k, ..., 0])
          entries.append(entry)
          vols.append(x[i, ..., 0])
        if write:
          montage(os.path.join(tmp_dir, sub) + ".png", [inputs[k, ..., 0]] + vols,
                  ["input: " + os.path.basename(src["path"])] + prompts)
    result = {"checkpoint_step": gen.step, "seed": config.seed, "prompts": prompts,
              "guidance_scales": [float(g) for g in config.sample.guidance_scales],
              "guidance": _guidance_record(config, "each scan's factual prompt"),
              "num_subjects": n, "objective": config.objective.name,
              "inversion": {"sampler_steps": int(len(gen.objective.timesteps())),
                            "depth": depth,
                            "refine_iters": int(config.sample.inversion_refine),
                            "edit_mask": config.sample.edit_mask or None,
                            "guidance": "conditional model (w = 1) under the factual prompt"},
              "sources": [{"subject": k, "path": s["path"], "factual_prompt": factual[k],
                           "reconstruction_psnr_db": float(recon_psnr[k])}
                          for k, s in enumerate(sources)],
              "mean_reconstruction_psnr_db": float(np.mean(recon_psnr)), "items": entries}
    if rule is not None:
      for src, vol in zip(result["sources"], inputs[..., 0]):
        src[f"input_{rule.stat}"] = rule.measure(vol)
    effects = _summarise(result, entries, prompts, config.sample.guidance_scales, rule)
    if tmp_dir is not None:
      write_text(os.path.join(tmp_dir, "index.json"), json.dumps(result, indent=1))
  _report(effects, prompts, out_dir)
  logging.info("inverted %d scans (reconstruction PSNR %.2f dB); wrote %d volumes to %s", n,
               result["mean_reconstruction_psnr_db"], len(entries), out_dir)
  return result

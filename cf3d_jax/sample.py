"""`--mode=sample`: counterfactuals from fixed noise under every prompt and guidance scale.

For each of K subjects (noise `z_T[k] = normal(fold_in(key(seed + SAMPLE_STREAM), k))`, the same
for every prompt and scale) the sampler decodes under each prompt of `config.sample.prompts`; the
first prompt is the factual reference. Outputs under `WORKDIR/samples/`:
  `g{scale}/subject_{k:03d}/{prompt-slug}.nii.gz`   each volume, with the dataset grid's affine;
  `g{scale}/subject_{k:03d}.png`                     montage: axial/coronal/sagittal mid-slices of
                                                      each prompt, then difference maps vs prompt 0;
  `index.json`                                       every item, and the lesion volume (mL) of each
                                                      generated volume by the rule of
                                                      `cf3d_jax.metrics.lesion` (phantom data),
                                                      and its mean intensity in the template WM.
"""

from __future__ import annotations

import json
import os
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cf3d_jax import config_base
from cf3d_jax.data import nifti, phantoms, records
from cf3d_jax.data.prepare import data_paths
from cf3d_jax.files import atomic_path, write_text
from cf3d_jax.metrics import lesion as lesion_lib
from cf3d_jax.objectives.guidance import guided, sample_loop
from cf3d_jax.text import prompts as prompt_lib
from cf3d_jax.text.table import load_table
from cf3d_jax.train import abstract_state, build_components, checkpoint_manager, \
    make_optimizer, restore_state

SAMPLE_STREAM = 1_000_003  # offsets the sampling key from the training key


def slug(prompt: str) -> str:
  """File-name-safe form of a prompt: 'Subject has high lesion load.' → 'subject-has-high-lesion-load'."""
  return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-") or "null"


def subject_noise(seed: int, k: int, shape: Sequence[int]) -> jax.Array:
  """The fixed starting noise of subject k, `shape` = latent shape without batch."""
  key = jax.random.fold_in(jax.random.key(seed + SAMPLE_STREAM), k)
  return jax.random.normal(key, tuple(shape), jnp.float32)


def make_sampler(model, objective, space, scale: float, null_emb, null_mask):
  """jit(params, z_T [B,...], emb [B,L,E], mask [B,L], key) → images `[B, D, H, W, 1]`."""

  def run(params, z_start, emb, mask, key):
    def model_fn(z, t, e, m):
      return model.apply({"params": params}, z, t, e, m, train=False)
    fn = guided(model_fn, scale, jnp.asarray(null_emb), jnp.asarray(null_mask))
    return space.decode(sample_loop(objective, fn, z_start, emb, mask, key, space.clip_x0))

  return jax.jit(run)


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


def sample_counterfactuals(config, workdir: str) -> dict:
  """Writes NIfTI volumes, montages and `samples/index.json`; returns the index."""
  from tqdm import tqdm
  config_base.validate(config)
  paths = data_paths(workdir)
  index = records.load_index(paths["records"])
  table = load_table(paths["table"])
  prompts = list(config.sample.prompts)
  emb, mask = table.lookup(prompts)                      # PromptError for unknown prompts
  null_emb, null_mask = table.lookup([prompt_lib.NULL_PROMPT])
  affine = np.asarray(index["meta"].get("affine", np.eye(4)))
  reference = (phantoms.load_reference(paths["reference"])
               if os.path.exists(paths["reference"]) else None)

  model, objective, space = build_components(config)
  mngr = checkpoint_manager(workdir, config.train)
  state = restore_state(mngr, abstract_state(model, make_optimizer(config.train), config,
                                             table.embeddings.shape[1:]),
                        step=config.sample.checkpoint_step)
  params = state["ema"] if config.sample.use_ema else state["params"]
  ckpt_step = int(state["step"])
  del state

  z_shape = space.latent_shape(tuple(config.data.shape))
  items = [(k, p) for k in range(config.sample.num_subjects) for p in range(len(prompts))]
  bsz = config.sample.batch_size
  out_dir = os.path.join(workdir, "samples")
  entries = []
  for scale in config.sample.guidance_scales:
    run = make_sampler(model, objective, space, float(scale), null_emb[0], null_mask[0])
    volumes = {}
    for start in tqdm(range(0, len(items), bsz), desc=f"sampling w={scale:g}", unit="batch"):
      chunk = items[start:start + bsz]
      padded = chunk + [chunk[-1]] * (bsz - len(chunk))   # one compiled shape for every call
      z = jnp.stack([subject_noise(config.seed, k, z_shape) for k, _ in padded])
      x = run(params, z, jnp.asarray(emb[[p for _, p in padded]]),
              jnp.asarray(mask[[p for _, p in padded]]),
              jax.random.fold_in(jax.random.key(config.seed + SAMPLE_STREAM), start))
      for (k, p), v in zip(chunk, np.asarray(x)[: len(chunk), ..., 0]):
        volumes[(k, p)] = v
    for k in range(config.sample.num_subjects):
      sub_dir = os.path.join(out_dir, f"g{scale:g}", f"subject_{k:03d}")
      for p, prompt in enumerate(prompts):
        rel = os.path.join(f"g{scale:g}", f"subject_{k:03d}", slug(prompt) + ".nii.gz")
        nifti.save_volume(os.path.join(out_dir, rel), volumes[(k, p)], affine)
        entry = {"subject": k, "prompt": prompt, "guidance_scale": float(scale), "nifti": rel}
        if reference is not None:
          entry["lesion_volume_ml"] = float(lesion_lib.lesion_volume_ml(
              volumes[(k, p)], reference.wm_mask, reference.voxel_ml,
              config.eval.lesion_threshold))
          entry["wm_mean_intensity"] = float(volumes[(k, p)][reference.wm_mask].mean())
        entries.append(entry)
      montage(sub_dir + ".png", [volumes[(k, p)] for p in range(len(prompts))], prompts)
  result = {"checkpoint_step": ckpt_step, "seed": config.seed, "prompts": prompts,
            "guidance_scales": [float(g) for g in config.sample.guidance_scales],
            "num_subjects": config.sample.num_subjects, "items": entries}
  if reference is not None:
    result["lesion_rule"] = (f"voxels inside the template white-matter mask with intensity > "
                             f"{config.eval.lesion_threshold} (images in [-1, 1]); volume = count × "
                             f"{reference.voxel_ml:.4f} mL per voxel")
    for stat in ("lesion_volume_ml", "wm_mean_intensity"):
      result[f"mean_{stat}"] = {
          f"g{g:g}": {p: float(np.mean([e[stat] for e in entries
                                        if e["prompt"] == p and e["guidance_scale"] == float(g)]))
                      for p in prompts}
          for g in config.sample.guidance_scales}
  write_text(os.path.join(out_dir, "index.json"), json.dumps(result, indent=1))
  logging.info("wrote %d volumes to %s", len(entries), out_dir)
  return result

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

from cf3d_jax import config_base, parallel
from cf3d_jax.data import nifti, phantoms, records
from cf3d_jax.data.prepare import data_paths
from cf3d_jax.errors import ConfigError, DataError
from cf3d_jax.files import atomic_dir, atomic_path, unique_slug, write_text
from cf3d_jax.metrics import phantom as phantom_lib
from cf3d_jax.metrics.image import psnr
from cf3d_jax.objectives.guidance import guided, invert_loop, sample_loop
from cf3d_jax.spaces import placed
from cf3d_jax.text import prompts as prompt_lib
from cf3d_jax.text.table import load_table
from cf3d_jax.train import abstract_state, build_components, check_checkpoint_config, \
    checkpoint_manager, make_optimizer, restore_state

SAMPLE_STREAM = 1_000_003  # offsets the sampling key from the training key


def subject_noise(seed: int, k: int, shape: Sequence[int]) -> jax.Array:
  """The fixed starting noise of subject k, `shape` = latent shape without batch."""
  key = jax.random.fold_in(jax.random.key(seed + SAMPLE_STREAM), k)
  return jax.random.normal(key, tuple(shape), jnp.float32)


def _on_mesh(jitted, space, mesh, rules):
  """`call(params, batch, rest=())` → `jitted(params, space_params, *batch, *rest)`. With `mesh`:
  the host `batch` arrays (every process holds the same whole batch) become global arrays split
  by `parallel.batch_spec`, the space's params and the `rest` arrays are replicated, the call is
  traced with the activation rules, and the result comes back to every process as NumPy."""
  if mesh is None:
    return lambda params, batch, rest=(): jitted(params, space.params, *batch, *rest)
  space_params = parallel.replicate(space.params, mesh)

  def call(params, batch, rest=()):
    on_mesh = parallel.put_batch(dict(enumerate(np.asarray(a) for a in batch)), mesh, rules)
    with parallel.activation_context(mesh, rules):
      out = jitted(params, space_params, *(on_mesh[i] for i in range(len(batch))),
                   *(parallel.replicate(a, mesh) for a in rest))
    return jax.tree.map(parallel.to_host, out)

  return call


def make_sampler(model, objective, space, scale: float, null_emb, null_mask,
                 deterministic: bool = False, depth: float = 1.0, mesh=None,
                 rules: parallel.Rules = parallel.DEFAULT_RULES,
                 interval: tuple[float, float] = (0.0, 1.0), edit_masks=None):
  """jit(params, z_T [B,...], emb [B,L,E], mask [B,L], key) → images `[B, D, H, W, 1]` in [-1, 1].

  The callable also takes `neg_emb [B,L,E]` / `neg_mask [B,L]` (keywords): the text each item is
  guided against (contrastive guidance, `guidance_negatives`); absent = the null text
  (`null_emb [L,E]`, `null_mask [L]`) for every item, the paper's classifier-free guidance.

  deterministic: use the objective's ODE step whatever sampler is configured (after inversion).
  interval: the guidance interval (fractions of T, `guidance.guided`).
  edit_masks `(mask_z [1, d, h, w, 1], mask_img [1, D, H, W, 1])` (`edit_masks`): blended
  editing of given scans; the sampler then takes `known` `[B, S', ...]` (the inversion
  trajectory, batch first) and the input images `[B, D, H, W, 1]` after the key, follows the
  inversion outside the mask at every step and returns `mask_img·x + (1 − mask_img)·input`.
  The space's own arrays (a VAE's params) are jit arguments, not compiled-in constants.
  mesh: sample on a device mesh (`parallel`): `params` as restored onto it (FSDP by the rules),
  z / emb / mask host arrays split over the batch axes (B divisible by data × fsdp where
  it splits), the Haar transform block-local on `spatial`; returns NumPy on every process.
  """
  sp_placed = placed(space, mesh, rules)

  def run(params, space_params, z_start, emb, mask, neg_emb, neg_mask, *rest):
    def model_fn(z, t, e, m):
      return model.apply({"params": params}, z, t, e, m, train=False)
    if edit_masks is None:
      (key_data,), known, mask_z = rest, None, None
    else:
      known, x_input, key_data, mask_z, mask_img = rest
      known = jnp.swapaxes(known, 0, 1)                  # [S', B, ...] for the scan
    key = jax.random.wrap_key_data(key_data)
    sp = sp_placed.with_params(space_params)
    fn = guided(model_fn, scale, neg_emb, neg_mask, interval, objective.num_train_steps)
    # Images live in [-1, 1]: the last clamp removes the inverse transform's rounding (±1e-7).
    x = jnp.clip(sp.decode(sample_loop(objective, fn, z_start, emb, mask, key, sp.clip_x0,
                                       deterministic=deterministic, depth=depth, known=known,
                                       edit_mask=mask_z)), -1.0, 1.0)
    if edit_masks is None:
      return x
    return mask_img * x + (1 - mask_img) * x_input

  call = _on_mesh(jax.jit(run), space, mesh, rules)

  def negatives(emb, neg_emb, neg_mask):
    """The per-item negative text `[B,L,E]`, `[B,L]`: the given one, else the null text."""
    if (neg_emb is None) != (neg_mask is None):
      raise ValueError("give both neg_emb and neg_mask, or neither")
    if neg_emb is None:
      b = np.shape(emb)[0]
      neg_emb = np.broadcast_to(np.asarray(null_emb), (b,) + np.shape(null_emb))
      neg_mask = np.broadcast_to(np.asarray(null_mask), (b,) + np.shape(null_mask))
    if np.shape(neg_emb) != np.shape(emb):
      raise ValueError(f"neg_emb has shape {np.shape(neg_emb)}; expected emb's {np.shape(emb)}")
    return neg_emb, neg_mask

  if edit_masks is None:
    return lambda params, z_start, emb, mask, key, neg_emb=None, neg_mask=None: call(
        params, (z_start, emb, mask) + negatives(emb, neg_emb, neg_mask), (_key_data(key),))
  return lambda params, z_start, emb, mask, key, known, x_input, neg_emb=None, neg_mask=None: call(
      params, (z_start, emb, mask) + negatives(emb, neg_emb, neg_mask) + (known, x_input),
      (_key_data(key),) + tuple(edit_masks))


GUIDANCE_NEGATIVES = ("null", "factual")


def guidance_negatives(mode: str, emb: np.ndarray, mask: np.ndarray, factual_emb: np.ndarray,
                       factual_mask: np.ndarray, null: tuple[np.ndarray, np.ndarray]
                       ) -> tuple[np.ndarray, np.ndarray]:
  """The text each item is guided against (`config.sample.guidance_negative`): `[B,L,E]`, `[B,L]`.

  emb `[B,L,E]`, mask `[B,L]`: each item's prompt; factual_emb / factual_mask: the same item's
  factual prompt (the first prompt, or a given scan's own); null `([L,E], [L])`.
  'null': every item against the null text (classifier-free guidance, the paper's).
  'factual' (contrastive guidance): every item against its factual prompt A. A counterfactual
  prompt B gives `out = out_A + w (out_B − out_A)`: w scales the difference between the two
  prompts' predictions; the factual item (B = A) is the conditional model `out_A` at every w.
  Factual and counterfactual share the base `out_A`, so the subject outside the region the
  prompts disagree on is kept, and the factual volume is the same across a guidance sweep.
  """
  emb, mask = np.asarray(emb), np.asarray(mask)
  null_e = np.broadcast_to(np.asarray(null[0], emb.dtype), emb.shape)
  null_m = np.broadcast_to(np.asarray(null[1], mask.dtype), mask.shape)
  if mode == "null":
    return null_e, null_m
  if mode != "factual":
    raise ConfigError(f"config.sample.guidance_negative={mode!r}: expected one of "
                      f"{GUIDANCE_NEGATIVES}")
  return np.asarray(factual_emb, emb.dtype), np.asarray(factual_mask, mask.dtype)


def _key_data(key: jax.Array) -> np.ndarray:
  """Raw uint32 data of a (typed or legacy) key: a plain array that can be replicated."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return np.asarray(key)


def make_inverter(model, objective, space, refine_iters: int, depth: float = 1.0, mesh=None,
                  rules: parallel.Rules = parallel.DEFAULT_RULES, trajectory: bool = False):
  """jit(params, images [B, D, H, W, 1], emb [B,L,E], mask [B,L]) → z_T `[B, ...]`.

  The conditional model (no guidance) drives the inversion. mesh: as `make_sampler`.
  trajectory: return `(z_T, known [B, S', ...])`, the states blended editing follows.
  """
  sp_placed = placed(space, mesh, rules)

  def run(params, space_params, x, emb, mask):
    def model_fn(z, t, e, m):
      return model.apply({"params": params}, z, t, e, m, train=False)
    z0 = sp_placed.with_params(space_params).encode(x)
    out = invert_loop(objective, model_fn, z0, emb, mask, refine_iters, depth, trajectory)
    return (out[0], jnp.swapaxes(out[1], 0, 1)) if trajectory else out

  call = _on_mesh(jax.jit(run), space, mesh, rules)
  return lambda params, x, emb, mask: call(params, (x, emb, mask))


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


def _restore(config, workdir: str) -> dict:
  """Everything sampling needs: data meta, the table, the model family and restored params."""
  config_base.validate(config, "sample")
  paths = data_paths(workdir)
  index = records.load_index(paths["records"])
  table = load_table(paths["table"])
  prompts = list(config.sample.prompts)
  emb, mask = table.lookup(prompts)                      # PromptError for unknown prompts
  null_emb, null_mask = table.lookup([prompt_lib.NULL_PROMPT])
  reference = (phantoms.load_reference(paths["reference"])
               if os.path.exists(paths["reference"]) else None)
  model, objective, space = build_components(config, workdir, load_autoencoder=True)
  mesh = parallel.make_mesh(config.mesh.shape)
  parallel.check_spatial_divisible(tuple(config.data.shape), mesh, "data.shape")
  mngr = checkpoint_manager(workdir, config.train)
  check_checkpoint_config(config, mngr, config.sample.checkpoint_step, ("model",))
  # Restored straight onto the mesh (FSDP by config.mesh.rules), whatever mesh trained it.
  state = restore_state(mngr, abstract_state(model, make_optimizer(config.train), config,
                                             table.embeddings.shape[1:], mesh),
                        step=config.sample.checkpoint_step)
  params = state["ema"] if config.sample.use_ema else state["params"]
  return {"table": table, "prompts": prompts, "emb": emb, "mask": mask,
          "null": (null_emb[0], null_mask[0]), "reference": reference,
          "affine": np.asarray(index["meta"].get("affine", np.eye(4))),
          "model": model, "objective": objective, "space": space, "params": params,
          "step": int(state["step"]), "mesh": mesh,
          "rules": parallel.rules_from_config(config.mesh)}


def mesh_kwargs(r: dict, batch_size: int, key: str) -> dict:
  """`make_sampler` / `make_inverter` keywords for the restored mesh; ConfigError naming `key`
  if `batch_size` does not split over its data axis."""
  parallel.check_batch_divisible(batch_size, r["mesh"], key)
  return {"mesh": r["mesh"], "rules": r["rules"]}


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
          "interval": [float(v) for v in config.sample.guidance_interval]}


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
  from tqdm import tqdm
  r = _restore(config, workdir)
  prompts, emb, mask = r["prompts"], r["emb"], r["mask"]
  rule = _phantom_rule(r["reference"], config)
  z_shape = r["space"].latent_shape(tuple(config.data.shape))
  items = [(k, p) for k in range(config.sample.num_subjects) for p in range(len(prompts))]
  bsz = config.sample.batch_size
  out_dir = os.path.join(workdir, "samples")
  names = prompt_file_names(prompts)
  entries = []
  with output_folder(out_dir) as tmp_dir:   # None on processes that do not write
    for scale in config.sample.guidance_scales:
      run = make_sampler(r["model"], r["objective"], r["space"], float(scale), *r["null"],
                         interval=tuple(config.sample.guidance_interval),
                         **mesh_kwargs(r, bsz, "sample.batch_size"))
      volumes = {}
      for start in tqdm(range(0, len(items), bsz), desc=f"sampling w={scale:g}", unit="batch",
                        disable=jax.process_index() > 0):
        chunk = items[start:start + bsz]
        padded = chunk + [chunk[-1]] * (bsz - len(chunk))   # one compiled shape for every call
        z = jnp.stack([subject_noise(config.seed, k, z_shape) for k, _ in padded])
        rows = [p for _, p in padded]
        neg = guidance_negatives(config.sample.guidance_negative, emb[rows], mask[rows],
                                 emb[[0] * len(rows)], mask[[0] * len(rows)], r["null"])
        x = run(r["params"], z, emb[rows], mask[rows],
                jax.random.fold_in(jax.random.key(config.seed + SAMPLE_STREAM), start), *neg)
        for (k, p), v in zip(chunk, np.asarray(x)[: len(chunk), ..., 0]):
          volumes[(k, p)] = v
      for k in range(config.sample.num_subjects):
        sub_dir = f"g{scale:g}/subject_{k:03d}"
        for p, prompt in enumerate(prompts):
          rel = os.path.join(sub_dir, names[p])
          if tmp_dir is not None:   # multi-host: every process samples, process 0 writes
            nifti.save_volume(os.path.join(tmp_dir, rel), volumes[(k, p)], r["affine"])
          entry = {"subject": k, "prompt": prompt, "guidance_scale": float(scale), "nifti": rel}
          _ground_truth_stats(entry, volumes[(k, p)], rule, volumes[(k, 0)] if p else None)
          entries.append(entry)
        if tmp_dir is not None:
          montage(os.path.join(tmp_dir, sub_dir + ".png"), [volumes[(k, p)] for p in range(len(prompts))], prompts)
    result = {"checkpoint_step": r["step"], "seed": config.seed, "prompts": prompts,
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


def _batched(fn, n: int, bsz: int, *arrays):
  """Runs fn on batches of `bsz` (the last padded by repetition) and concatenates `[n, ...]`
  (each array of a tuple output alike)."""
  outs = []
  for start in range(0, n, bsz):
    idx = list(range(start, min(start + bsz, n)))
    idx += [idx[-1]] * (bsz - len(idx))
    out = fn(*[a[np.asarray(idx)] for a in arrays])
    outs.append(jax.tree.map(lambda a: np.asarray(a)[: min(bsz, n - start)], out))
  return jax.tree.map(lambda *parts: np.concatenate(parts), *outs)


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
  r = _restore(config, workdir)
  prompts, table = r["prompts"], r["table"]
  rule = _phantom_rule(r["reference"], config)
  sources = resolve_sources(config.sample.source, config.data.dataset)
  factual = _factual_prompts(config, sources, prompts)
  f_emb, f_mask = table.lookup(factual)
  inputs = np.stack([load_source(s["path"], config, r["affine"])
                     for s in tqdm(sources, desc="loading", unit="scan",
                                              disable=jax.process_index() > 0)])[..., None]
  n, bsz = len(sources), config.sample.batch_size
  depth = float(config.sample.inversion_depth)
  on_mesh = mesh_kwargs(r, bsz, "sample.batch_size")
  masks = edit_masks(config, r["reference"], r["space"].latent_shape(tuple(config.data.shape)))
  invert = make_inverter(r["model"], r["objective"], r["space"], config.sample.inversion_refine,
                         depth, trajectory=masks is not None, **on_mesh)
  z_T = _batched(lambda x, e, m: invert(r["params"], x, e, m), n, bsz, inputs, f_emb, f_mask)
  z_T, known = z_T if masks is not None else (z_T, None)
  key = jax.random.key(config.seed + SAMPLE_STREAM)
  # Reconstruction: decode under the factual prompt with the conditional model.
  plain = make_sampler(r["model"], r["objective"], r["space"], 1.0, *r["null"], deterministic=True,
                       depth=depth, **on_mesh)
  recon = _batched(lambda z, e, m: plain(r["params"], z, e, m, key), n, bsz, z_T, f_emb, f_mask)
  recon_psnr = np.asarray(psnr(jnp.asarray(recon), jnp.asarray(inputs), 2.0))
  items = [(k, p) for k in range(n) for p in range(len(prompts))]
  ks, ps = np.asarray([k for k, _ in items]), np.asarray([p for _, p in items])
  out_dir = os.path.join(workdir, "samples_source")
  names = prompt_file_names(prompts)
  entries = []
  with output_folder(out_dir) as tmp_dir:   # None on processes that do not write
    for scale in config.sample.guidance_scales:
      run = make_sampler(r["model"], r["objective"], r["space"], float(scale), *r["null"],
                         deterministic=True, depth=depth, edit_masks=masks,
                         interval=tuple(config.sample.guidance_interval), **on_mesh)
      neg_e, neg_m = guidance_negatives(config.sample.guidance_negative, r["emb"][ps],
                                        r["mask"][ps], f_emb[ks], f_mask[ks], r["null"])
      if masks is None:
        x = _batched(lambda z, e, m, ne, nm: run(r["params"], z, e, m, key, ne, nm), len(items),
                     bsz, z_T[ks], r["emb"][ps], r["mask"][ps], neg_e, neg_m)
      else:
        x = _batched(lambda z, e, m, ne, nm, kn, xin: run(r["params"], z, e, m, key, kn, xin, ne,
                                                          nm),
                     len(items), bsz, z_T[ks], r["emb"][ps], r["mask"][ps], neg_e, neg_m,
                     known[ks], inputs[ks])
      scores = np.asarray(psnr(jnp.asarray(x), jnp.asarray(inputs[ks]), 2.0))
      for k, src in enumerate(sources):
        sub = os.path.join(f"g{scale:g}", f"subject_{k:03d}")
        write = tmp_dir is not None   # multi-host: every process samples, process 0 writes
        if write:
          nifti.save_volume(os.path.join(tmp_dir, sub, "input.nii.gz"), inputs[k, ..., 0],
                            r["affine"])
        vols = []
        for i in np.flatnonzero(ks == k):
          prompt = prompts[ps[i]]
          rel = os.path.join(sub, names[ps[i]])
          if write:
            nifti.save_volume(os.path.join(tmp_dir, rel), x[i, ..., 0], r["affine"])
          entry = {"subject": k, "source": src["path"], "factual_prompt": factual[k],
                   "prompt": prompt, "guidance_scale": float(scale), "nifti": rel,
                   "psnr_vs_input_db": float(scores[i])}
          _ground_truth_stats(entry, x[i, ..., 0], rule, inputs[k, ..., 0])
          entries.append(entry)
          vols.append(x[i, ..., 0])
        if write:
          montage(os.path.join(tmp_dir, sub) + ".png", [inputs[k, ..., 0]] + vols,
                  ["input: " + os.path.basename(src["path"])] + prompts)
    result = {"checkpoint_step": r["step"], "seed": config.seed, "prompts": prompts,
              "guidance_scales": [float(g) for g in config.sample.guidance_scales],
              "guidance": _guidance_record(config, "each scan's factual prompt"),
              "num_subjects": n, "objective": config.objective.name,
              "inversion": {"sampler_steps": int(len(r["objective"].timesteps())),
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

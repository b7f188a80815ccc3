"""`--mode=prepare_latents`: encode the prepared images once into latent shards (MAISI path).

Reads `WORKDIR/data/records` (written by `prepare`), encodes every volume with the frozen VAE
(`config.space.autoencoder`, or `WORKDIR/autoencoder/vae` from `--mode=train_autoencoder`) and
writes `WORKDIR/data/latents/`: the same records (subject, label, clinical value, affine) with
`volume` replaced by one posterior draw `z = μ + σ·ε` `[D/f, H/f, W/f, C_lat]` (MAISI's
training latents), unscaled. `dataset.json`'s meta records the latent statistics over the
train split and `scale_factor = 1 / std` (MAISI's), which the latent space multiplies by.

ε for record `position` comes from `fold_in(key(seed + LATENT_STREAM), position)`, so the shards
are a pure function of (images, VAE, seed). The folder is written atomically; a complete one is
kept when re-run with the same VAE and seed (fingerprint in the meta) and is an error naming
the folder with a different one.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cf3d_jax import spaces
from cf3d_jax.data import pipeline, records
from cf3d_jax.errors import DataError
from cf3d_jax.workdir import Workdir

LATENT_STREAM = 4049   # offset of the posterior-draw key from config.seed
COPIED_FIELDS = ("affine", "subject_id", "label", "clinical_value")


def autoencoder_fingerprint(vae_path: str, params: Any) -> str:
  """sha256 of the VAE's config.json and its param values (which VAE made the latents)."""
  digest = hashlib.sha256()
  with open(os.path.join(vae_path, "config.json"), "rb") as f:
    digest.update(f.read())
  for leaf in jax.tree.leaves(params):
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return digest.hexdigest()


def make_encoder(model):
  """jit(params, x `[B, D, H, W, 1]`, keys `[B]`) → z = μ + σ·ε `[B, D/f, H/f, W/f, C_lat]`."""

  def run(params, x, keys):
    mean, logvar = model.apply({"params": params}, x, method="encode")
    eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], mean.dtype))(keys)
    return mean + jnp.exp(0.5 * logvar) * eps

  return jax.jit(run)


class _Stats:
  """Running float64 sum / sum of squares / count of the latents of the train split."""

  def __init__(self):
    self.total, self.squares, self.count = 0.0, 0.0, 0

  def add(self, z: np.ndarray) -> None:
    z = np.asarray(z, np.float64)
    self.total += float(z.sum())
    self.squares += float(np.square(z).sum())
    self.count += z.size

  def mean_std(self) -> tuple[float, float]:
    if self.count == 0:
      raise DataError("prepare_latents: the train split has no records to compute the latent "
                      "scale factor from")
    mean = self.total / self.count
    return mean, float(np.sqrt(max(self.squares / self.count - mean * mean, 0.0)))


def _latent_records(config, image_dir: str, index: dict, encode, params, stats: _Stats,
                    train_subjects: set[str]) -> Iterator[dict]:
  """Yields the latent record of every image record, in position order, encoding in batches."""
  from tqdm import tqdm
  reader = grain.sources.ArrayRecordDataSource(records.shard_paths(image_dir, index))
  n, bsz = len(index["records"]), int(config.space.encode_batch_size)
  base = jax.random.key(config.seed + LATENT_STREAM)
  shape = tuple(config.data.shape) + (1,)
  for start in tqdm(range(0, n, bsz), desc="encoding latents", unit="batch",
                    disable=jax.process_index() > 0):
    recs = [records.decode_record(reader[i]) for i in range(start, min(start + bsz, n))]
    for i, rec in enumerate(recs):
      if tuple(rec["volume"].shape) != shape:
        raise DataError(f"{image_dir}: record {start + i} has volume {rec['volume'].shape}, "
                        f"config.data.shape gives {shape}")
    x = np.stack([r["volume"] for r in recs] + [recs[-1]["volume"]] * (bsz - len(recs)))
    keys = jax.vmap(lambda p: jax.random.fold_in(base, p))(
        jnp.arange(start, start + bsz, dtype=jnp.uint32))
    z = np.asarray(encode(params, jnp.asarray(x, jnp.float32), keys))[:len(recs)]
    for rec, zi in zip(recs, z):
      if str(rec["subject_id"]) in train_subjects:
        stats.add(zi)
      yield {"volume": zi.astype(np.float32), **{k: rec[k] for k in COPIED_FIELDS if k in rec}}


def prepare_latents(config, workdir: str) -> dict:
  """Writes `WORKDIR/data/latents/` (see the module docstring) unless already there; returns
  its index."""
  wd = Workdir(workdir)
  out = spaces.latents_dir(workdir)
  vae_path = spaces.autoencoder_path(config.space, workdir)
  model, params = spaces.load_autoencoder(config.space, workdir)
  fingerprint = autoencoder_fingerprint(vae_path, params)
  if os.path.exists(os.path.join(out, records.INDEX_NAME)):
    done = records.load_index(out)
    made = (done["meta"].get("autoencoder_sha256"), done["meta"].get("seed"))
    if made != (fingerprint, config.seed):
      raise DataError(f"{out}: latents made with another autoencoder or seed ({made[0][:12]}…, "
                      f"seed {made[1]}) than now ({fingerprint[:12]}…, seed {config.seed}); "
                      "delete the folder to re-encode")
    logging.info("latents already prepared in %s (scale factor %.5g)", out,
                 done["meta"]["scale_factor"])
    return done
  index = records.load_index(wd.records)
  split = pipeline.split_subjects([r["subject_id"] for r in index["records"]], config.data.split,
                                  config.seed)
  stats = _Stats()
  latent_shape = list(spaces.make_space(config.space).latent_shape(tuple(config.data.shape)))

  def meta() -> dict:
    mean, std = stats.mean_std()
    if not std > 0:
      raise DataError(f"{vae_path}: every train latent is {mean}; the VAE is degenerate")
    return {**index["meta"], "space": "latent", "image_shape": list(config.data.shape),
            "shape": latent_shape, "autoencoder": vae_path, "autoencoder_sha256": fingerprint,
            "seed": config.seed, "latent_mean": mean, "latent_std": std,
            "scale_factor": 1.0 / std, "scale_split": "train"}

  written = records.write_dataset(
      out, _latent_records(config, wd.records, index, make_encoder(model), params, stats,
                           set(split["train"])),
      config.data.records_per_shard, meta)
  logging.info("wrote %d latent records %s to %s; scale factor %.5g",
               len(written["records"]), latent_shape, out, written["meta"]["scale_factor"])
  return written

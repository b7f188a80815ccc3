"""The latent path: LatentSpace, prepare_latents (scale factor, posterior draws, resume), and
latent diffusion train + sample end to end at toy size through `modes.run`."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cf3d_jax import config_base, convert, latents, modes, spaces
from cf3d_jax.data import pipeline, records
from cf3d_jax.errors import ConfigError, DataError
from cf3d_jax.models import autoencoder as ae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VAE = dict(channels=(8, 16, 16), num_res_blocks=(1, 1, 1), norm_num_groups=4)


def _save_vae(path: str, seed: int = 0) -> tuple[ae.AutoencoderKL, dict]:
  model = ae.build_autoencoder(TINY_VAE)
  params = ae.init_params(model, jax.random.key(seed))
  convert.save_converted(path, params, "maisi-vae", ae.autoencoder_hparams(model))
  return model, params


def _latent_config(vae: str):
  c = config_base.load_config_file(os.path.join(ROOT, "configs", "demo.py"), "smoke")
  config_base.apply_objective_preset(c, "maisi_rflow")
  c.space.name = "latent"
  c.space.autoencoder = vae
  c.model.out_channels = 4
  c.objective.num_sample_steps = 3
  c.sample.guidance_scales = (2.0,)
  return c


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
  """`--mode=all` on configs/demo_latent.py:smoke: prepare → train_autoencoder →
  prepare_latents → train (rectified flow on latents) → sample (decoded through the VAE)."""
  c = config_base.load_config_file(os.path.join(ROOT, "configs", "demo_latent.py"), "smoke")
  workdir = str(tmp_path_factory.mktemp("latent") / "run")
  modes.run(c, workdir, "all")
  model_config, params = convert.load_converted(os.path.join(workdir, "autoencoder", "vae"))
  return c, workdir, ae.build_autoencoder(model_config), params


def _space_config(**kw) -> ml_collections.ConfigDict:
  base = dict(name="latent", autoencoder="", latent_channels=4, downsample=4, scale_factor=0.0,
              decode_splits=1, encode_batch_size=2, lll_scale=3.0)
  return ml_collections.ConfigDict({**base, **kw})


def test_latent_space_encode_decode_scale(tmp_path):
  model, params = _save_vae(str(tmp_path / "vae"))
  space = spaces.make_space(_space_config(autoencoder=str(tmp_path / "vae"), scale_factor=0.5),
                            load_autoencoder=True)
  assert space.latent_shape((16, 16, 32)) == (4, 4, 8, 4)
  assert space.record_shape((16, 16, 32)) == (4, 4, 8, 4) and space.clip_x0 is None
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 16, 1), minval=-1, maxval=1)
  mean, _ = model.apply({"params": params}, x, method="encode")
  z = space.encode(x)
  np.testing.assert_allclose(z, 0.5 * mean, rtol=1e-6)
  np.testing.assert_allclose(space.from_records(mean), z, rtol=1e-6)
  np.testing.assert_allclose(space.decode(z),
                             model.apply({"params": params}, mean, method="decode"),
                             rtol=1e-4, atol=1e-5)
  # params as a jit argument (how the sampler passes them) give the same decode
  decode = jax.jit(lambda p, zz: space.with_params(p).decode(zz))
  np.testing.assert_allclose(decode(space.params, z), space.decode(z), rtol=1e-4, atol=1e-5)


def test_latent_space_errors(tmp_path):
  with pytest.raises(ConfigError, match="divisible by 4"):
    spaces.make_space(_space_config()).latent_shape((16, 16, 18))
  with pytest.raises(DataError, match="no autoencoder here"):
    spaces.make_space(_space_config(autoencoder=str(tmp_path / "none")), load_autoencoder=True)
  _save_vae(str(tmp_path / "vae"))
  with pytest.raises(ConfigError, match="latent_channels=8"):
    spaces.make_space(_space_config(autoencoder=str(tmp_path / "vae"), latent_channels=8),
                      load_autoencoder=True)
  with pytest.raises(DataError, match="prepare_latents"):   # no recorded scale in this workdir
    spaces.make_space(_space_config(autoencoder=str(tmp_path / "vae")), str(tmp_path))
  with pytest.raises(ConfigError, match="without its autoencoder"):
    spaces.make_space(_space_config(scale_factor=1.0)).decode(jnp.zeros((1, 2, 2, 2, 4)))
  c = _latent_config(str(tmp_path / "vae"))
  c.model.out_channels = 8
  with pytest.raises(ConfigError, match="model.out_channels"):
    config_base.validate(c)
  c = _latent_config(str(tmp_path / "vae"))
  c.space.name = "wavelet"
  with pytest.raises(ConfigError, match="prepare_latents needs"):
    modes.run(c, str(tmp_path / "w"), "prepare_latents")


def test_prepare_latents_records_and_scale_factor(latent_run):
  c, workdir, model, params = latent_run
  images = records.load_index(os.path.join(workdir, "data", "records"))
  lat = records.load_index(spaces.latents_dir(workdir))
  assert [r["subject_id"] for r in lat["records"]] == [r["subject_id"] for r in images["records"]]
  meta = lat["meta"]
  assert meta["shape"] == [4, 4, 4, 4] and meta["image_shape"] == [16, 16, 16]
  read = lambda folder, index: [records.decode_record(r) for r in
                                _all_records(folder, index)]
  lat_recs = read(spaces.latents_dir(workdir), lat)
  img_recs = read(os.path.join(workdir, "data", "records"), images)
  # scale factor = 1 / std over the train split, recomputed here in float64
  split = pipeline.split_subjects([r["subject_id"] for r in lat["records"]], c.data.split, c.seed)
  train = np.stack([r["volume"] for r in lat_recs if str(r["subject_id"]) in split["train"]])
  assert meta["scale_factor"] == pytest.approx(1.0 / train.astype(np.float64).std(), rel=1e-6)
  # record p holds μ + σ·ε with ε from fold_in(key(seed + LATENT_STREAM), p)
  p = 5
  mean, logvar = model.apply({"params": params}, jnp.asarray(img_recs[p]["volume"][None]),
                             method="encode")
  eps = jax.random.normal(jax.random.fold_in(jax.random.key(c.seed + latents.LATENT_STREAM), p),
                          mean.shape[1:])
  np.testing.assert_allclose(lat_recs[p]["volume"], (mean + jnp.exp(0.5 * logvar) * eps)[0],
                             rtol=1e-4, atol=1e-5)
  assert int(lat_recs[p]["label"]) == int(img_recs[p]["label"])
  # a re-run keeps the folder; another seed is refused with the folder named
  assert latents.prepare_latents(c, workdir)["meta"] == meta
  c2 = c.copy_and_resolve_references()
  c2.seed = 1
  with pytest.raises(DataError, match="another autoencoder or seed"):
    latents.prepare_latents(c2, workdir)


def _all_records(folder, index):
  import grain
  source = grain.sources.ArrayRecordDataSource(records.shard_paths(folder, index))
  return [source[i] for i in range(len(index["records"]))]


def test_latent_diffusion_trains_and_samples_through_the_vae(latent_run):
  c, workdir, model, params = latent_run
  with open(os.path.join(workdir, "samples", "index.json")) as f:
    index = json.load(f)
  entries = index["items"]
  assert len(entries) == c.sample.num_subjects * len(c.sample.prompts)
  import nibabel as nib
  vols = [np.asarray(nib.load(os.path.join(workdir, "samples", e["nifti"])).dataobj)
          for e in entries]
  assert all(v.shape[:3] == tuple(c.data.shape) and np.all(np.isfinite(v)) for v in vols)
  assert all(float(np.std(v)) > 0 for v in vols)

"""--mode=train_autoencoder: losses against NumPy, the patch discriminator against MONAI, the
warm-up switch, the perceptual term, shapes of the MAISI VAE, and the mode end to end with
resume. The smoke-size step is compiled once and shared by the tests (module-level jit)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cf3d_jax import autoencoder_train as at
from cf3d_jax import config_base, convert, modes
from cf3d_jax.data import records
from cf3d_jax.data.export import read_records, split_entries
from cf3d_jax.errors import ConfigError, DataError
from cf3d_jax.models import autoencoder as ae_lib
from cf3d_jax.models import patch_discriminator as disc_lib
from cf3d_jax.models import resnet3d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(arg="smoke", name="autoencoder_ms.py"):
  return config_base.load_config_file(os.path.join(ROOT, "configs", name), arg)


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)   # the jitted step donates its state


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """A workdir whose data/ was written by `modes.run(smoke, W, 'prepare')`."""
  workdir = str(tmp_path_factory.mktemp("ae_prepared"))
  modes.run(_config(), workdir, "prepare")
  return workdir


@pytest.fixture(scope="module")
def medicalnet_folder(tmp_path_factory):
  """A randomly initialised MedicalNet resnet10 saved as a converted folder."""
  abstract = resnet3d.abstract_variables(resnet3d.build_resnet3d(10))
  rng = np.random.default_rng(2)

  def draw(path, leaf):   # kaiming-like kernels, BN near identity
    name = path[-1].key
    if name == "kernel":
      return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return rng.normal(0, 0.1, leaf.shape).astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(draw, abstract)
  out = str(tmp_path_factory.mktemp("medicalnet") / "resnet10")
  convert.save_converted(out, variables, "medicalnet", {"depth": 10, "shortcut_type": None})
  return out


@pytest.fixture(scope="module")
def smoke():
  """(config, model, discriminator, settings, initial state, perceptual network, its variables)
  at smoke size; the perceptual term is off there (as without a MedicalNet folder): a resnet10
  in the step costs ~0.5 s per CPU step, so it is tested on its own below."""
  c = _config()
  model, disc = at.build_vae(c.autoencoder), at.build_discriminator(c.autoencoder)
  settings = at.LossSettings.from_config(c.autoencoder)
  state = at.init_state(model, disc, settings, jax.random.key(0))
  return c, model, disc, settings, state, None, None


def _train_volumes(config, workdir, split="train"):
  data_dir = os.path.join(workdir, "data", "records")
  index = records.load_index(data_dir)
  entries = split_entries(index, split, config.seed, tuple(config.data.split))
  return np.stack([r["volume"] for r in read_records(data_dir, index, entries)])


def dict_with(section, **values):
  """A copy of a config section with `values` set."""
  out = section.copy_and_resolve_references()
  with out.unlocked():
    for k, v in values.items():
      out[k] = v
  return out


def _step(smoke_fixture, state, volume, adversarial, key=0, donate=False):
  _, model, disc, settings, _, net, variables = smoke_fixture
  return at.jit_train_step(state if donate else _copy(state), jnp.asarray(volume),
                           jax.random.key(key), variables, model=model, disc=disc,
                           perceptual=net, settings=settings, adversarial=adversarial)


# ---- losses ----------------------------------------------------------------------------------

def test_losses_match_float64_numpy():
  rng = np.random.default_rng(0)
  mean, logvar = rng.normal(size=(2, 3, 4, 5, 4)), rng.normal(size=(2, 3, 4, 5, 4))
  want_kl = np.mean(0.5 * np.sum(mean ** 2 + np.exp(logvar) - logvar - 1, axis=(1, 2, 3, 4)))
  got_kl = at.kl_loss(jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32))
  np.testing.assert_allclose(float(got_kl), want_kl, rtol=1e-5)
  real, fake = rng.normal(size=(2, 6, 6, 6, 1)), rng.normal(size=(2, 6, 6, 6, 1))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  np.testing.assert_allclose(float(at.lsgan_generator_loss(f32(fake))),
                             np.mean((fake - 1) ** 2), rtol=1e-5)
  np.testing.assert_allclose(float(at.lsgan_discriminator_loss(f32(real), f32(fake))),
                             0.5 * (np.mean(fake ** 2) + np.mean((real - 1) ** 2)), rtol=1e-5)
  np.testing.assert_allclose(float(at.l1_loss(f32(real), f32(fake))),
                             np.mean(np.abs(real - fake)), rtol=1e-5)
  # The KL of the prior itself is zero.
  assert float(at.kl_loss(jnp.zeros((1, 2, 2, 2, 4)), jnp.zeros((1, 2, 2, 2, 4)))) == 0.0


def test_contrast_weighted_l1_matches_the_float64_oracle_and_weighs_a_lesion():
  """autoencoder.contrast_weight λ: mean of w · |x̂ − x|, w = (1 + λ c / mean c) / (1 + λ),
  c = (x − box3 mean over the in-volume neighbours)² (the volume's own units)."""
  rng = np.random.default_rng(3)
  x = rng.normal(scale=0.05, size=(2, 6, 5, 4, 1))
  x[0, 2, 2, 1, 0] += 1.0                       # a one-voxel "lesion"
  recon = x + rng.normal(scale=0.1, size=x.shape)
  lam = 2.0
  n, d, h, w, _ = x.shape
  local = np.zeros_like(x)
  for i, j, k in np.ndindex(d, h, w):
    local[:, i, j, k] = x[:, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2,
                          max(k - 1, 0):k + 2].mean((1, 2, 3))
  c = (x - local) ** 2
  weight = (1 + lam * c / c.mean((1, 2, 3, 4), keepdims=True)) / (1 + lam)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  got = float(at.contrast_l1_loss(f32(recon), f32(x), lam))
  np.testing.assert_allclose(got, np.mean(weight * np.abs(recon - x)), rtol=2e-5)
  assert weight[0, 2, 2, 1, 0] > 10 * np.median(weight[0])     # the lesion voxel counts most
  assert float(at.contrast_l1_loss(f32(recon), f32(x), 0.0)) == float(at.l1_loss(f32(recon),
                                                                                  f32(x)))


def test_random_crop_takes_blocks_of_the_volume():
  vol = jnp.arange(2 * 8 * 8 * 8, dtype=jnp.float32).reshape(2, 8, 8, 8, 1)
  crop = np.asarray(at.random_crop(vol, (4, 6, 2), jax.random.key(3)))
  assert crop.shape == (2, 4, 6, 2, 1)
  for item in range(2):
    start = np.argwhere(np.asarray(vol[item]) == crop[item, 0, 0, 0, 0])[0][:3]
    d, h, w = start
    np.testing.assert_array_equal(crop[item], np.asarray(vol[item, d:d + 4, h:h + 6, w:w + 2]))
  assert at.random_crop(vol, (), jax.random.key(0)) is vol


# ---- patch discriminator ---------------------------------------------------------------------

def test_patch_discriminator_matches_monai():
  torch = pytest.importorskip("torch")
  nets = pytest.importorskip("monai.networks.nets")
  torch.manual_seed(0)
  ref = nets.PatchDiscriminator(spatial_dims=3, num_layers_d=3, channels=32, in_channels=1,
                                out_channels=1, norm="INSTANCE").eval()
  disc = disc_lib.PatchDiscriminator(channels=32, num_layers=3)
  abstract = disc_lib.abstract_params(disc)
  assert disc_lib.count_params(abstract) == sum(p.numel() for p in ref.parameters())
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  kernel = lambda w: jnp.asarray(np.transpose(w, (2, 3, 4, 1, 0)))
  params = {"initial_conv": {"kernel": kernel(sd["initial_conv.conv.weight"]),
                             "bias": jnp.asarray(sd["initial_conv.conv.bias"])},
            "final_conv": {"kernel": kernel(sd["final_conv.conv.weight"]),
                           "bias": jnp.asarray(sd["final_conv.conv.bias"])}}
  for layer in range(3):
    params[f"layer_{layer}"] = {"kernel": kernel(sd[f"{layer}.conv.weight"])}
  assert jax.tree.structure(params) == jax.tree.structure(abstract)
  x = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 32, 1)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(np.moveaxis(x, -1, 1).copy()))[-1].numpy()
  got = np.asarray(jax.jit(disc.apply)({"params": params}, jnp.asarray(x)))
  assert got.shape == (2,) + disc_lib.output_shape((32, 32, 32), 3) + (1,) == (2, 2, 2, 2, 1)
  np.testing.assert_allclose(got, np.moveaxis(want, 1, -1), rtol=1e-4, atol=1e-4)


# ---- the step: warm-up switch and training ---------------------------------------------------

def test_adversarial_terms_exactly_off_before_warmup_and_on_after(smoke, prepared):
  config, _, _, _, state, _, _ = smoke
  volume = _train_volumes(config, prepared)[:config.autoencoder.batch_size]
  other_disc = dict(state, disc_params=jax.tree.map(lambda p: p + 0.5, state["disc_params"]))

  off, m_off = _step(smoke, state, volume, adversarial=False)
  off2, _ = _step(smoke, other_disc, volume, adversarial=False)
  assert float(m_off["generator_adversarial"]) == 0.0 and float(m_off["discriminator"]) == 0.0
  for a, b in zip(jax.tree.leaves(off["params"]), jax.tree.leaves(off2["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))   # D plays no part
  for a, b in zip(jax.tree.leaves(off["disc_params"]), jax.tree.leaves(state["disc_params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))   # and is not trained
  assert int(off["disc_opt_state"][0].count) == 0

  on, m_on = _step(smoke, state, volume, adversarial=True)
  on2, _ = _step(smoke, other_disc, volume, adversarial=True)
  assert float(m_on["generator_adversarial"]) > 0 and float(m_on["discriminator"]) > 0
  weights = config.autoencoder
  np.testing.assert_allclose(
      float(m_on["loss"]), float(m_on["l1"]) + weights.kl_weight * float(m_on["kl"])
      + weights.perceptual_weight * float(m_on["perceptual"])
      + weights.adversarial_weight * float(m_on["generator_adversarial"]), rtol=1e-6)
  assert float(m_on["perceptual"]) == 0.0   # off without a perceptual network
  assert int(on["disc_opt_state"][0].count) == 1
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(on["disc_params"]),
                                                      jax.tree.leaves(state["disc_params"])))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(on["params"]),
                                                      jax.tree.leaves(on2["params"])))
  # Same l1/KL draws with and without the adversary: only the adversarial term differs.
  assert float(m_on["l1"]) == float(m_off["l1"]) and float(m_on["kl"]) == float(m_off["kl"])

  # autoencoder.contrast_weight: the reconstruction term of the loss becomes the weighted L1 of
  # the same reconstruction (the reported l1 stays the plain one).
  _, model, disc, _, _, net, variables = smoke
  weighted = at.LossSettings.from_config(dict_with(config.autoencoder, contrast_weight=4.0))
  assert weighted.contrast_weight == 4.0
  _, m_w = at.jit_train_step(_copy(state), jnp.asarray(volume), jax.random.key(0), variables,
                             model=model, disc=disc, perceptual=net, settings=weighted,
                             adversarial=False)
  assert float(m_w["l1"]) == pytest.approx(float(m_off["l1"]), rel=1e-6)
  assert float(m_w["loss"]) - weights.kl_weight * float(m_w["kl"]) != pytest.approx(
      float(m_w["l1"]), rel=1e-3)


def test_train_step_decreases_the_loss_on_phantoms(smoke, prepared):
  config, _, _, _, state, _, _ = smoke
  volumes = _train_volumes(config, prepared)
  b = config.autoencoder.batch_size
  state = _copy(state)
  losses = []
  for i in range(60):   # L1 + KL, before the adversarial warm-up ends
    batch = volumes[[(b * i + j) % len(volumes) for j in range(b)]]
    state, metrics = _step(smoke, state, batch, adversarial=False, key=1, donate=True)
    losses.append(float(metrics["loss"]))
  first, last = np.mean(losses[:10]), np.mean(losses[-10:])
  assert np.all(np.isfinite(losses))
  assert last < 0.6 * first, (first, last)


# ---- perceptual term -------------------------------------------------------------------------

def test_perceptual_term_zero_for_identical_inputs_positive_otherwise(medicalnet_folder):
  net, variables = at.load_perceptual_network(medicalnet_folder)
  assert net.stages == ("layer1_0", "layer2_0", "layer3_0", "layer4_0")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 16, 1)), jnp.float32)
  y = jnp.asarray(np.clip(np.asarray(x) + rng.normal(0, 0.3, x.shape), -1, 1), jnp.float32)
  loss_and_grad = jax.jit(jax.value_and_grad(
      lambda a, b: at.perceptual_loss(net, variables, a, b)))   # one compile for both calls
  same, _ = loss_and_grad(x, x)
  assert abs(float(same)) < 1e-10   # zero up to float rounding of the two batch halves
  differ, grad = loss_and_grad(y, x)
  assert float(differ) > 1e-4
  assert np.all(np.isfinite(np.asarray(grad))) and float(jnp.abs(grad).max()) > 0
  assert at.load_perceptual_network("") == (None, None)
  with pytest.raises(DataError, match="perceptual_network"):
    at.load_perceptual_network(medicalnet_folder + "-missing")


# ---- shapes of the paper-scale VAE (no allocation) ------------------------------------------

@pytest.mark.parametrize("side", [64, 128, 256])
def test_default_maisi_encode_decode_shapes(side):
  c = config_base.base_config()
  model = at.build_vae(c.autoencoder)
  params = ae_lib.abstract_params(model)
  assert ae_lib.count_params(params) == 20_944_897   # the released MAISI VAE
  x = jax.ShapeDtypeStruct((1, side, side, side, 1), jnp.float32)
  mean, logvar = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, method="encode"),
                                params, x)
  assert mean.shape == logvar.shape == (1, side // 4, side // 4, side // 4, 4)
  recon = jax.eval_shape(lambda p, z: model.apply({"params": p}, z, method="decode"), params,
                         mean)
  assert recon.shape == x.shape
  disc = at.build_discriminator(c.autoencoder)
  logits = jax.eval_shape(lambda p, x: disc.apply({"params": p}, x),
                          disc_lib.abstract_params(disc),
                          jax.ShapeDtypeStruct((1, 64, 64, 64, 1), jnp.float32))
  assert logits.shape == (1, 6, 6, 6, 1)


# ---- config ----------------------------------------------------------------------------------

def test_configs_and_errors_name_the_key(tmp_path):
  base = config_base.base_config().autoencoder
  assert (base.kl_weight, base.perceptual_weight, base.adversarial_weight,
          base.learning_rate) == (1e-7, 0.3, 0.1, 1e-4)
  assert (tuple(base.channels), base.disc_layers, base.disc_channels) == ((64, 128, 256), 3, 32)
  adni = _config(None, "autoencoder_adni.py")
  assert adni.data.dataset == "adni" and tuple(adni.autoencoder.patch_shape) == (64, 64, 64)
  for arg in ("demo", "smoke", "res128"):
    c = _config(arg)
    config_base.validate(c)
    at.check_config(c)
  c = _config()
  model, disc = at.build_vae(c.autoencoder), at.build_discriminator(c.autoencoder)
  with_ema = at.abstract_state(model, disc, at.LossSettings(ema_decay=0.99))
  assert jax.tree.structure(with_ema["ema"]) == jax.tree.structure(with_ema["params"])
  assert "ema" not in at.abstract_state(model, disc, at.LossSettings.from_config(c.autoencoder))
  c.autoencoder.patch_shape = (32, 32, 32)
  with pytest.raises(ConfigError, match=r"config\.autoencoder\.patch_shape=\(32, 32, 32\).*"
                                        r"data\.shape=\(16, 16, 16\)"):
    modes.run(c, str(tmp_path), "train_autoencoder")
  c = _config()
  c.autoencoder.disc_layers = 4
  with pytest.raises(ConfigError, match=r"config\.autoencoder\.disc_layers=4"):
    at.check_config(c)
  c = _config()
  c.autoencoder.channels = (8, 10)
  with pytest.raises(ConfigError, match=r"config\.autoencoder\.channels"):
    config_base.validate(c)
  c = _config()
  c.autoencoder.patch_shape = (12, 12, 9)
  with pytest.raises(ConfigError, match=r"config\.autoencoder\.patch_shape"):
    config_base.validate(c)


# ---- the mode end to end, and resume ---------------------------------------------------------

def _fresh(prepared, path):
  shutil.copytree(os.path.join(prepared, "data"), os.path.join(path, "data"))
  return str(path)


def _restore_counts(workdir, step, abstract):
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "autoencoder", "checkpoints", str(step), "state")
  state = ocp.StandardCheckpointer().restore(path, abstract)
  return int(state["opt_state"][0].count), int(state["disc_opt_state"][0].count)


def test_mode_end_to_end_and_resume_equals_uninterrupted(smoke, prepared, tmp_path):
  config, model, disc, settings, _, _, _ = smoke
  full = _fresh(prepared, tmp_path / "full")
  modes.run(config, full, "train_autoencoder")
  vae_dir = os.path.join(full, "autoencoder", "vae")
  model_config, params = convert.load_converted(vae_dir)
  assert ae_lib.build_autoencoder(model_config) == model
  with open(os.path.join(full, "autoencoder", "metrics.json")) as f:
    metrics = json.load(f)
  assert metrics["step"] == 4 and metrics["val"]["num_volumes"] >= 1
  assert np.isfinite(metrics["val"]["psnr"]) and 0 < metrics["val"]["l1"] < 2
  assert metrics["perceptual_network"] is None
  # The ground truth through encode → decode on the held-out phantoms (the lesion rule).
  gt = metrics["val"]["ground_truth"]
  assert gt["stat"] == "lesion_volume_ml" and len(gt["input"]) == metrics["val"]["num_volumes"]
  change = np.asarray(gt["reconstruction"]) - np.asarray(gt["input"])
  assert gt["mean_abs_change"] == pytest.approx(np.mean(np.abs(change)), abs=2e-3)
  assert gt["within_tolerance"] == pytest.approx(np.mean(np.abs(change) <= 2.0), abs=1e-9)
  assert max(gt["input"]) > 0                     # the held-out phantoms carry lesions
  # The warm-up switch in the loop: no discriminator update in steps 1-2, two in steps 3-4.
  abstract = at.abstract_state(model, disc, settings)
  assert _restore_counts(full, 2, abstract) == (2, 0)
  assert _restore_counts(full, 4, abstract) == (4, 2)

  resumed = _fresh(prepared, tmp_path / "resumed")
  first = config.copy_and_resolve_references()
  first.autoencoder.num_steps = 2
  modes.run(first, resumed, "train_autoencoder")
  modes.run(config, resumed, "train_autoencoder")
  _, params_resumed = convert.load_converted(os.path.join(resumed, "autoencoder", "vae"))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with open(os.path.join(resumed, "autoencoder", "metrics.json")) as f:
    assert json.load(f)["val"] == metrics["val"]

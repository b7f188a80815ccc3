"""Sampling helpers: edit masks for blended editing of given scans."""

import nibabel as nib
import numpy as np
import pytest

from cf3d_jax.config_base import load_config_file
from cf3d_jax.data import phantom_reference
from cf3d_jax.errors import ConfigError, DataError
from cf3d_jax.generate import guidance_negatives
from cf3d_jax.invert import edit_masks
from cf3d_jax.sample_index import prompt_file_names


@pytest.fixture
def config():
  c = load_config_file("configs/demo.py", "smoke")    # 16³ images, 8³ × 8 wavelet grid
  return c


def test_template_wm_mask_on_both_grids(config):
  reference = phantom_reference.make_reference(tuple(config.data.shape), config.data.fov_mm)
  config.sample.edit_mask = "template_wm"
  mask_z, mask_img = edit_masks(config, reference, (8, 8, 8, 8))
  assert mask_z.shape == (1, 8, 8, 8, 1) and mask_img.shape == (1, 16, 16, 16, 1)
  np.testing.assert_array_equal(mask_img[0, ..., 0], reference.wm_mask)
  # A z voxel is editable iff any of the 2×2×2 image voxels it covers is.
  blocks = reference.wm_mask.reshape(8, 2, 8, 2, 8, 2).any(axis=(1, 3, 5))
  np.testing.assert_array_equal(mask_z[0, ..., 0], blocks)
  with pytest.raises(ConfigError, match="reference"):
    edit_masks(config, None, (8, 8, 8, 8))
  config.sample.edit_mask = ""
  assert edit_masks(config, reference, (8, 8, 8, 8)) is None


def test_nifti_mask_is_checked_against_the_grid(config, tmp_path):
  good, bad, empty = (str(tmp_path / f"{n}.nii.gz") for n in ("good", "bad", "empty"))
  vol = np.zeros((16, 16, 16), np.float32)
  vol[4:6, 4:6, 4:6] = 1
  nib.save(nib.Nifti1Image(vol, np.eye(4)), good)
  nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), bad)
  nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4)), empty)
  config.sample.edit_mask = good
  mask_z, mask_img = edit_masks(config, None, (8, 8, 8, 8))
  assert mask_img.sum() == 8 and mask_z.sum() == 1 and mask_z[0, 2, 2, 2, 0] == 1
  config.sample.edit_mask = bad
  with pytest.raises(DataError, match="bad.nii.gz.*training grid"):
    edit_masks(config, None, (8, 8, 8, 8))
  config.sample.edit_mask = empty
  with pytest.raises(DataError, match="empty"):
    edit_masks(config, None, (8, 8, 8, 8))


def test_guidance_negatives_per_item():
  """'null': every item against the null text; 'factual': every item against its factual
  prompt (the factual item itself then is the conditional model)."""
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(3, 2, 4)).astype(np.float32)        # prompts A, B, C
  mask = np.asarray([[True, True], [True, False], [True, True]])
  null = (np.zeros((2, 4), np.float32), np.asarray([True, False]))
  fact_e, fact_m = np.repeat(emb[:1], 3, 0), np.repeat(mask[:1], 3, 0)
  ne, nm = guidance_negatives("null", emb, mask, fact_e, fact_m, null)
  np.testing.assert_array_equal(ne, np.zeros_like(emb))
  np.testing.assert_array_equal(nm, np.repeat(null[1][None], 3, 0))
  ne, nm = guidance_negatives("factual", emb, mask, fact_e, fact_m, null)
  assert ne.shape == emb.shape and ne.dtype == emb.dtype and nm.dtype == mask.dtype
  np.testing.assert_array_equal(ne, fact_e)                   # A, B, C against A
  np.testing.assert_array_equal(nm, fact_m)
  with pytest.raises(ConfigError, match="guidance_negative"):
    guidance_negatives("prompt", emb, mask, fact_e, fact_m, null)


def test_guidance_negative_is_validated(config):
  from cf3d_jax.config_base import validate
  config.sample.guidance_negative = "factual"
  validate(config, "sample")
  config.sample.guidance_negative = "prompt"
  with pytest.raises(ConfigError, match="sample.guidance_negative"):
    validate(config, "sample")


def test_prompt_file_names_are_unique_per_run():
  names = prompt_file_names(["High lesion load.", "high lesion load", "HIGH lesion-load",
                                    "Input", "minimal"])
  assert names == ["high-lesion-load.nii.gz", "high-lesion-load-2.nii.gz",
                   "high-lesion-load-3.nii.gz", "input-2.nii.gz", "minimal.nii.gz"]


def test_edit_friendly_given_scans_through_the_generator(config):
  """make_inverter(method='edit_friendly') + make_sampler(residuals=True) on the smoke U-Net
  (random weights): the factual decode returns each scan, guided (contrastive guidance
  against the factual prompt is the conditional model); another prompt changes the scan; the
  inverter checks its keys and the sampler its residuals."""
  import jax
  import jax.numpy as jnp
  from cf3d_jax import checkpoints, generate
  from cf3d_jax.data.prepare import table_source
  from cf3d_jax.invert import inversion_key
  from cf3d_jax.models import unet as unet_lib
  from cf3d_jax.text import prompts as prompt_lib
  from cf3d_jax.text.table import load_table
  model, objective, space = checkpoints.build_components(config)
  table = load_table(table_source(config))
  emb, mask = table.lookup(list(config.sample.prompts))
  null_emb, null_mask = table.lookup([prompt_lib.NULL_PROMPT])
  shape = tuple(config.data.shape)
  z_shape = space.latent_shape(shape)
  params = unet_lib.init_params(model, jax.random.key(0), (1,) + z_shape, emb.shape[1:])
  # Zero-initialised output layers ignore the text: perturb every weight so the prompt acts.
  leaves, tree = jax.tree.flatten(params)
  params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(jax.random.key(i), p.shape)
                                     for i, p in enumerate(leaves)])
  x = np.tanh(np.random.default_rng(0).normal(0, 0.7, (2,) + shape + (1,))).astype(np.float32)
  f_emb, f_mask = emb[[0, 0]], mask[[0, 0]]
  keys = jax.vmap(lambda k: inversion_key(0, k))(jnp.arange(2))
  invert = generate.make_inverter(model, objective, space, 0, method="edit_friendly")
  z, known, res = invert(params, x, f_emb, f_mask, keys)
  assert known.shape == res.shape == (2, len(objective.timesteps())) + z_shape
  key = jax.random.key(1)
  run = generate.make_sampler(model, objective, space, 3.0, null_emb[0], null_mask[0],
                              residuals=True)
  back = np.asarray(run(params, z, f_emb, f_mask, key, f_emb, f_mask, residuals=res))
  np.testing.assert_allclose(back, x, atol=2e-4)
  other = np.asarray(run(params, z, emb[[2, 2]], mask[[2, 2]], key, f_emb, f_mask,
                         residuals=res))
  assert np.abs(other - x).max() > 1e-3
  with pytest.raises(ValueError, match="keys"):
    invert(params, x, f_emb, f_mask)
  with pytest.raises(ValueError, match="residuals=True"):
    run(params, z, f_emb, f_mask, key)
  with pytest.raises(ConfigError, match="inversion"):
    generate.make_inverter(model, objective, space, 0, method="nti")

"""Background regularization: against a SciPy connected-components oracle, identity on real
phantoms, and applied by the sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from cf3d_jax.background import background_mask, background_of, regularize_background
from cf3d_jax.config_ranges import check_ranges
from cf3d_jax.errors import ConfigError
from conftest import load_config


def _oracle(v: np.ndarray, threshold: float, margin: int, min_island: int) -> np.ndarray:
  """SciPy: low voxels in a 6-connected component touching the grid's faces, plus bright
  components under `min_island` voxels whose 6-neighbour ring lies in that background, minus
  `margin` binary dilations (6-connected) of the remaining bright voxels."""
  out = []
  for x in v[..., 0]:
    low = x <= -1 + threshold
    labels, _ = ndimage.label(low)
    faces = np.ones_like(low)
    faces[1:-1, 1:-1, 1:-1] = False
    ids = np.unique(labels[faces & low])
    bg = np.isin(labels, ids[ids > 0])
    tissue = ~low
    comps, n = ndimage.label(tissue)
    for i in range(1, n + 1):
      comp = comps == i
      ring = ndimage.binary_dilation(comp) & ~comp
      if comp.sum() < min_island and bg[ring].all():
        bg |= comp
        tissue &= ~comp
    if margin:
      bg &= ~ndimage.binary_dilation(tissue, iterations=margin)
    out.append(bg)
  return np.stack(out)


@pytest.mark.parametrize("threshold,margin,min_island", [(0.25, 1, 0), (0.4, 0, 0), (0.1, 2, 0),
                                                         (0.25, 0, 27), (0.5, 1, 200)])
def test_background_mask_matches_scipy(threshold, margin, min_island):
  rng = np.random.default_rng(0)
  v = ndimage.gaussian_filter(rng.normal(size=(3, 20, 18, 22)), (0, 2, 2, 2))
  v = np.clip(v / v.std() * 0.6 - 0.6, -1, 1)
  v[rng.random(v.shape) < 0.01] = 0.5                  # specks, some in the air
  v = v[..., None].astype(np.float32)
  ours = np.asarray(jax.jit(background_mask, static_argnums=(1, 2, 3))(v, threshold, margin,
                                                                      min_island))
  want = _oracle(v, threshold, margin, min_island)
  assert 0.02 < want.mean() < 0.95                     # a real mix of background and tissue
  np.testing.assert_array_equal(ours, want)
  if min_island:                                       # specks did go
    plain = _oracle(v, threshold, margin, 0)
    assert (want & ~plain).sum() > 0


def test_real_phantoms_are_unchanged():
  from cf3d_jax.data import phantoms
  from cf3d_jax.data.phantom_reference import make_reference
  config = load_config("demo.py", None)
  threshold, margin, min_island = background_of(config)
  ref = make_reference((32, 32, 32))
  rng = np.random.default_rng(0)
  ms = [phantoms.make_ms_subject(ref, c, rng, lesion_radius_mm=(9.0, 18.0))["volume"]
        for c in phantoms.MS_CLASSES * 2]
  ad = [phantoms.make_ad_subject(ref, c, rng)["volume"] for c in phantoms.AD_CLASSES * 2]
  v = np.stack(ms + ad)[..., None]
  assert (v == -1).mean() > 0.5
  assert min_island > 0
  np.testing.assert_array_equal(
      np.asarray(regularize_background(v, threshold, margin, min_island)), v)


def test_speckle_goes_ventricles_and_edges_stay():
  d = 24
  grid = np.stack(np.meshgrid(*[np.arange(d)] * 3, indexing="ij"))
  r = np.sqrt(((grid - d / 2 + 0.5) ** 2).sum(0))
  x = np.full((d, d, d), -1.0, np.float32)
  x[r < 8] = 0.2                                       # tissue
  x[r < 3] = -0.95                                     # a dark ventricle enclosed by tissue
  x[d // 2, d // 2, d // 2] = 0.5                      # a bright speck inside it: anatomy
  head = ndimage.binary_dilation(r < 8)
  x[head & (r >= 8)] = -0.8                            # a blurred edge: dark, one step from tissue
  speckle = np.abs(np.random.default_rng(1).normal(0, 0.05, x.shape)).astype(np.float32)
  noisy = np.where(head, x, -1 + speckle)[None, ..., None]
  noisy[0, 2, 3, 2, 0] = noisy[0, 20, 2, 21, 0] = noisy[0, 20, 3, 21, 0] = 0.6   # specks in the air
  kept = np.asarray(regularize_background(noisy, 0.25, 1))[0, ..., 0]
  assert kept[2, 3, 2] == kept[20, 2, 21] == kept[20, 3, 21] == np.float32(0.6)
  out = np.asarray(regularize_background(noisy, 0.25, 1, 27))[0, ..., 0]
  assert out[2, 3, 2] == out[20, 2, 21] == out[20, 3, 21] == -1
  far = ~ndimage.binary_dilation(head, iterations=2)
  assert (out[far] == -1).all() and (noisy[0, ..., 0][far] > -1).mean() > 0.9   # speckle: gone
  np.testing.assert_array_equal(out[head], x[head])    # ventricle, tissue and edge: as decoded
  changed = noisy[0, ..., 0] != out
  assert changed.any() and (noisy[0, ..., 0][changed] <= -0.75).sum() == changed.sum() - 3


def test_config_switch():
  config = load_config("demo.py", "smoke")
  assert background_of(config) == (0.25, 0, 27)
  config.sample.background_threshold = 0.0
  assert background_of(config) is None
  config.sample.background_threshold = 2.0
  with pytest.raises(ConfigError, match="background_threshold"):
    background_of(config)
  with pytest.raises(ConfigError, match="background_threshold"):
    check_ranges(config)
  config.sample.background_threshold = 0.25
  config.sample.background_margin = -1
  with pytest.raises(ConfigError, match="background_margin"):
    background_of(config)
  config.sample.background_margin = 0
  config.sample.background_min_island = -2
  with pytest.raises(ConfigError, match="background_min_island"):
    background_of(config)
  with pytest.raises(ValueError, match="one channel"):
    regularize_background(jnp.zeros((1, 4, 4, 4, 2)), 0.2)


def test_sampler_regularizes_what_it_decodes():
  from cf3d_jax import checkpoints, generate
  from cf3d_jax.models import unet as unet_lib
  from cf3d_jax.text import prompts as prompt_lib
  from cf3d_jax.data.prepare import table_source
  from cf3d_jax.text.table import load_table
  config = load_config("demo.py", "smoke")
  model, objective, space = checkpoints.build_components(config)
  table = load_table(table_source(config))
  emb, mask = table.lookup(list(config.sample.prompts[:2]))
  null_emb, null_mask = table.lookup([prompt_lib.NULL_PROMPT])
  z_shape = space.latent_shape(tuple(config.data.shape))
  params = unet_lib.init_params(model, jax.random.key(0), (1,) + z_shape, emb.shape[1:])
  z = jnp.stack([generate.subject_noise(0, k, z_shape) for k in range(2)])
  key = jax.random.key(1)

  def decode(background):
    run = generate.make_sampler(model, objective, space, 3.0, null_emb[0], null_mask[0],
                                background=background)
    return np.asarray(run(params, z, emb, mask, key))

  plain, regular = decode(None), decode((1.5, 0, 27))
  want = np.asarray(regularize_background(plain, 1.5, 0, 27))
  np.testing.assert_array_equal(regular, want)
  assert (regular != plain).any()

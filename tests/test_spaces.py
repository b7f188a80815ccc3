"""The wavelet space: LLL/3 convention, exact round trip, clipping through image space."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cf3d_jax import spaces, wavelets
from cf3d_jax.errors import ConfigError


def test_encode_divides_lll_by_three_and_round_trips():
  space = spaces.make_space(ml_collections.ConfigDict({"name": "wavelet", "lll_scale": 3.0}))
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 4, 4, 4, 1)), jnp.float32)
  z = space.encode(x)
  raw = wavelets.haar_dwt3d(x)
  np.testing.assert_allclose(z[..., 0], raw[..., 0] / 3, rtol=1e-6)
  np.testing.assert_allclose(z[..., 1:], raw[..., 1:], rtol=1e-6)
  np.testing.assert_allclose(space.decode(z), x, atol=1e-6)
  assert space.latent_shape((4, 4, 4)) == (2, 2, 2, 8)


def test_clip_x0_clamps_in_image_space():
  space = spaces.WaveletSpace()
  x = jnp.asarray(np.random.default_rng(1).normal(0, 2, (1, 4, 4, 4, 1)), jnp.float32)
  clipped = space.decode(space.clip_x0(space.encode(x)))
  np.testing.assert_allclose(clipped, jnp.clip(x, -1, 1), atol=1e-5)


def test_unknown_space_and_odd_shape_are_config_errors():
  with pytest.raises(ConfigError, match="config.space.name"):
    spaces.make_space(ml_collections.ConfigDict({"name": "pixel", "lll_scale": 3.0}))
  with pytest.raises(ConfigError, match="even"):
    spaces.WaveletSpace().latent_shape((5, 4, 4))

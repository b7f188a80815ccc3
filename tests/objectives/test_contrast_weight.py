"""objective.contrast_weight: per-position loss weights from the clean target's local contrast
(float64 NumPy oracle), on top of the noise-level weighting (DDPM, x0 prediction)."""
import jax.numpy as jnp
import numpy as np
import pytest

from cf3d_jax.config_base import load_config_file
from cf3d_jax.errors import ConfigError
from cf3d_jax.objectives import make_objective
from cf3d_jax.objectives.common import contrast_weight_map

SIGMAS = (0.81, 0.166, 0.157, 0.096, 0.177, 0.096, 0.101, 0.083)   # the demo's subband stds


def _oracle_map(x: np.ndarray, sigmas, lam: float) -> np.ndarray:
  """(1 + λ c / mean c) / (1 + λ), c = Σ_ch ((x − box3 mean over the in-volume neighbours) / σ)²."""
  n, d, h, w, ch = x.shape
  local = np.zeros_like(x)
  for i, j, k in np.ndindex(d, h, w):
    nb = x[:, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2, max(k - 1, 0):k + 2]
    local[:, i, j, k] = nb.mean((1, 2, 3))
  c = (((x - local) / np.asarray(sigmas)) ** 2).sum(-1, keepdims=True)
  return (1 + lam * c / c.mean((1, 2, 3, 4), keepdims=True)) / (1 + lam)


def _demo(lam):
  c = load_config_file("configs/demo.py")
  c.objective.contrast_weight = lam
  return c


@pytest.mark.parametrize("lam", [1.0, 4.0])
def test_map_matches_the_float64_oracle_and_weighs_a_bright_blob(lam):
  rng = np.random.default_rng(0)
  x = rng.normal(scale=0.05, size=(2, 6, 5, 4, 8)) * np.asarray(SIGMAS)
  x[0, 2, 2, 1, :] += 1.0                       # one bright "lesion" position in example 0
  got = np.asarray(contrast_weight_map(jnp.asarray(x, jnp.float32), SIGMAS, lam))
  np.testing.assert_allclose(got, _oracle_map(x, SIGMAS, lam), rtol=2e-4, atol=1e-6)
  assert got.shape == (2, 6, 5, 4, 1)
  np.testing.assert_allclose(got.mean((1, 2, 3, 4)), 1.0, rtol=1e-5)     # mean 1 per example
  assert got[0, 2, 2, 1, 0] == got[0].max() and got[0, 2, 2, 1, 0] > 5 * np.median(got[0])
  assert contrast_weight_map(jnp.asarray(x, jnp.float32), SIGMAS, 0.0) is None


def test_ddpm_loss_applies_the_map_with_min_snr():
  lam = 4.0
  obj = make_objective(_demo(lam).objective, (4, 4, 4, 8))
  rng = np.random.default_rng(1)
  pred, target = rng.normal(size=(2, 2, 4, 4, 4, 8)) * 0.2
  t = np.array([40, 600])
  betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
  ab = np.cumprod(1 - betas)[t]
  snr_w = np.clip(ab / (1 - ab), 0.0, 5.0)[:, None, None, None, None]
  want = ((pred - target) ** 2 * snr_w * _oracle_map(target, SIGMAS, lam)).reshape(2, -1).mean(1)
  got = obj.loss(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32), jnp.asarray(t),
                 clean=jnp.asarray(target, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4)
  with pytest.raises(ValueError, match="clean"):
    obj.loss(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32), jnp.asarray(t))
  plain = make_objective(_demo(0.0).objective, (4, 4, 4, 8))
  assert not np.allclose(np.asarray(plain.loss(jnp.asarray(pred, jnp.float32),
                                               jnp.asarray(target, jnp.float32),
                                               jnp.asarray(t))), want, rtol=1e-2)


def test_rflow_weighs_the_velocity_error_by_the_clean_volume_contrast():
  c = load_config_file("configs/demo_latent.py")
  c.objective.sigma_data_channels = (1.0, 0.5, 0.25, 0.5)
  c.objective.contrast_weight = 2.0
  obj = make_objective(c.objective, (4, 4, 4, 4))
  assert obj.loss_weight(jnp.asarray([0.5]), jnp.zeros((1, 4, 4, 4, 4))) is None
  rng = np.random.default_rng(2)
  pred, target, clean = rng.normal(size=(3, 2, 4, 4, 4, 4))
  want = (np.abs(pred - target) * _oracle_map(clean, c.objective.sigma_data_channels, 2.0)
          ).reshape(2, -1).mean(1)                                    # MAISI's L1, no weighting
  got = obj.loss(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32),
                 jnp.asarray([0.2, 0.7]), clean=jnp.asarray(clean, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4)


@pytest.mark.parametrize("config, shape", [("configs/demo.py", (4, 4, 4, 8)),
                                           ("configs/demo_latent.py", (4, 4, 4, 4))])
def test_a_negative_strength_is_a_config_error(config, shape):
  c = load_config_file(config)
  c.objective.contrast_weight = -1.0
  with pytest.raises(ConfigError, match="contrast_weight"):
    make_objective(c.objective, shape)


def test_noisy_source_weighs_by_the_network_input():
  c = _demo(2.0)
  c.objective.contrast_source = "noisy"
  obj = make_objective(c.objective, (4, 4, 4, 8))
  rng = np.random.default_rng(3)
  pred, target, z_t = rng.normal(size=(3, 2, 4, 4, 4, 8)) * 0.2
  t = np.array([40, 600])
  ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))[t]
  snr_w = np.clip(ab / (1 - ab), 0.0, 5.0)[:, None, None, None, None]
  want = ((pred - target) ** 2 * snr_w * _oracle_map(z_t, SIGMAS, 2.0)).reshape(2, -1).mean(1)
  as32 = lambda a: jnp.asarray(a, jnp.float32)
  got = obj.loss(as32(pred), as32(target), jnp.asarray(t), clean=as32(target), noisy=as32(z_t))
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4)
  with pytest.raises(ValueError, match="noisy=z_t"):
    obj.loss(as32(pred), as32(target), jnp.asarray(t), clean=as32(target))
  c.objective.contrast_source = "both"
  with pytest.raises(ConfigError, match="contrast_source"):
    make_objective(c.objective, (4, 4, 4, 8))


def test_channels_limit_the_contrast_sum():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(1, 4, 4, 4, 8)) * np.asarray(SIGMAS)
  got = np.asarray(contrast_weight_map(jnp.asarray(x, jnp.float32), SIGMAS, 1.0, (0,)))
  lll = x[..., :1]
  np.testing.assert_allclose(got, _oracle_map(lll, SIGMAS[:1], 1.0), rtol=2e-4, atol=1e-6)
  c = _demo(1.0)
  c.objective.contrast_channels = (8,)
  obj = make_objective(c.objective, (4, 4, 4, 8))
  with pytest.raises(ConfigError, match="contrast_channels"):
    obj.loss(jnp.zeros((1, 4, 4, 4, 8)), jnp.zeros((1, 4, 4, 4, 8)), jnp.asarray([10]),
             clean=jnp.zeros((1, 4, 4, 4, 8)))

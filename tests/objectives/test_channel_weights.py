"""objective.channel_weight_power: per-channel loss weights (max σ / σ_c)^p on top of the
noise-level weighting (float64 NumPy oracle), for DDPM and rectified flow."""
import jax.numpy as jnp
import numpy as np
import pytest

from cf3d_jax.config_base import load_config_file
from cf3d_jax.errors import ConfigError
from cf3d_jax.objectives import make_objective

SIGMAS = (0.81, 0.166, 0.157, 0.096, 0.177, 0.096, 0.101, 0.083)   # the demo's subband stds


def _demo(power, **objective):
  c = load_config_file("configs/demo.py")
  c.objective.channel_weight_power = power
  c.objective.contrast_weight = 0.0          # the demo's contrast map: tested on its own
  for k, v in objective.items():
    setattr(c.objective, k, v)
  return c


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_ddpm_loss_weights_each_subband_by_its_std(power):
  c = _demo(power)
  assert tuple(c.objective.sigma_data_channels) == SIGMAS
  obj = make_objective(c.objective, (4, 4, 4, 8))
  rng = np.random.default_rng(0)
  pred, target = rng.normal(size=(2, 3, 4, 4, 4, 8))
  t = np.array([40, 600])
  betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
  ab = np.cumprod(1 - betas)[t]
  snr_w = np.clip(ab / (1 - ab), 0.0, 5.0)[:, None, None, None, None]     # the demo's min-SNR-5
  channel = (max(SIGMAS) / np.asarray(SIGMAS)) ** power
  want = ((pred[:2] - target[:2]) ** 2 * snr_w * channel).reshape(2, -1).mean(1)
  got = obj.loss(jnp.asarray(pred[:2], jnp.float32), jnp.asarray(target[:2], jnp.float32),
                 jnp.asarray(t))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)
  # The widest channel (LLL) keeps weight 1: the same loss as without the option there.
  plain = make_objective(_demo(0.0).objective, (4, 4, 4, 8))
  only_lll = np.zeros_like(pred[:2])
  only_lll[..., 0] = pred[:2, ..., 0] - target[:2, ..., 0]
  np.testing.assert_allclose(
      np.asarray(obj.loss(jnp.asarray(only_lll, jnp.float32), jnp.zeros(only_lll.shape), t)),
      np.asarray(plain.loss(jnp.asarray(only_lll, jnp.float32), jnp.zeros(only_lll.shape), t)),
      rtol=1e-6)


def test_rflow_loss_takes_the_channel_weights_without_a_noise_weighting():
  c = load_config_file("configs/demo_latent.py")
  c.objective.sigma_data_channels = (1.0, 0.5, 0.25, 0.5)
  c.objective.channel_weight_power = 2.0
  c.objective.time_shift = False
  obj = make_objective(c.objective, (4, 4, 4, 4))
  err = np.ones((1, 4, 4, 4, 4), np.float32)
  err[..., 1] = 2.0
  got = float(obj.loss(jnp.asarray(err), jnp.zeros_like(jnp.asarray(err)), jnp.asarray([500.0]))[0])
  # L1 (MAISI's rflow loss) × (1, 4, 16, 4): mean over channels of (1, 2·4, 16, 4)
  assert got == pytest.approx((1 + 8 + 16 + 4) / 4, rel=1e-6)


def test_channel_weights_need_per_channel_stds_and_the_right_count():
  c = _demo(1.0, sigma_data_channels=())
  with pytest.raises(ConfigError, match="set config.objective.sigma_data_channels"):
    make_objective(c.objective, (4, 4, 4, 8))
  obj = make_objective(_demo(1.0, sigma_data_channels=(0.8, 0.2)).objective, (4, 4, 4, 2))
  with pytest.raises(ConfigError, match="has 2 values; the diffused tensor has 8 channels"):
    obj.loss(jnp.zeros((1, 4, 4, 4, 8)), jnp.zeros((1, 4, 4, 4, 8)), jnp.asarray([10]))
  with pytest.raises(ConfigError, match="channel_weight_power"):
    make_objective(_demo(-1.0).objective, (4, 4, 4, 8))

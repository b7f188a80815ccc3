"""objective.snr_range: the 'min_snr' x0 weight is clip(SNR_t, lo, hi) (float64 NumPy oracle)."""
import jax.numpy as jnp
import numpy as np
import pytest

from cf3d_jax.config_base import load_config_file
from cf3d_jax.errors import ConfigError
from cf3d_jax.objectives import make_objective


@pytest.mark.parametrize("snr_range", [(0.0, 5.0), (1.0, 5.0), (0.0, 20.0)])
def test_ddpm_min_snr_weight_is_clipped_snr(snr_range):
  c = load_config_file("configs/demo.py")
  c.objective.snr_range = snr_range
  obj = make_objective(c.objective, (16, 16, 16, 8))
  t = np.array([0, 50, 100, 300, 500, 900])
  betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
  ab = np.cumprod(1 - betas)[t]
  want = np.clip(ab / (1 - ab), *snr_range)
  got = np.asarray(obj.loss_weight(jnp.asarray(t), jnp.zeros((6, 1, 1, 1, 8))))[:, 0, 0, 0, 0]
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_bad_snr_range_is_a_config_error():
  c = load_config_file("configs/demo.py")
  c.objective.snr_range = (5.0, 1.0)
  with pytest.raises(ConfigError, match="snr_range"):
    make_objective(c.objective, (16, 16, 16, 8))

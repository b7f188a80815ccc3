"""Per-subband RMS of prepared data (for objective.sigma_data_channels) against PyWavelets."""

import numpy as np
import pywt

from cf3d_jax.data.channel_stats import subband_rms


def test_subband_rms_matches_pywavelets():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 8, 8, 8, 1)) * np.linspace(0.1, 2, 8)[None, :, None, None, None]
  coeffs = [pywt.dwtn(v[..., 0], "haar") for v in x]
  keys = sorted(coeffs[0])                      # 'aaa', 'aad', …, 'ddd' = LLL … HHH
  want = np.array([np.sqrt(np.mean([np.mean(c[k] ** 2) for c in coeffs])) for k in keys])
  want[0] /= 3.0
  np.testing.assert_allclose(subband_rms(x, 3.0), want, rtol=1e-5)

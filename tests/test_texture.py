"""The texture metric (Haar detail-subband energy) against PyWavelets and on known textures."""

import numpy as np
import pytest
import pywt

from cf3d_jax.metrics import texture


def _pywt_energy(v: np.ndarray) -> np.ndarray:
  """[N, D, H, W, C] → [N, 7] in float64: mean square of each pywt detail subband ('aad' … 'ddd',
  sorted, which is LLH … HHH), averaged over channels."""
  out = np.zeros((v.shape[0], 7))
  for i in range(v.shape[0]):
    for c in range(v.shape[-1]):
      coeffs = pywt.dwtn(v[i, ..., c].astype(np.float64), "haar")
      out[i] += [np.mean(coeffs[k] ** 2) for k in sorted(coeffs)[1:]]
  return out / v.shape[-1]


def test_detail_energy_equals_pywavelets():
  rng = np.random.default_rng(0)
  v = rng.normal(size=(3, 8, 6, 4, 2)).astype(np.float32)
  np.testing.assert_allclose(texture.detail_energy(v)[:, 0], _pywt_energy(v), rtol=1e-5)
  # Two levels: pywt.wavedecn's level-2 details are those of the level-1 approximation.
  v = rng.normal(size=(2, 8, 8, 4, 1)).astype(np.float32)
  got = texture.detail_energy(v, levels=2)
  for i in range(2):
    coeffs = pywt.wavedecn(v[i, ..., 0].astype(np.float64), "haar", level=2)
    for level, details in ((2, coeffs[1]), (1, coeffs[2])):
      want = [np.mean(details[k] ** 2) for k in sorted(details)]
      np.testing.assert_allclose(got[i, level - 1], want, rtol=1e-5)
  assert texture.max_levels((32, 32, 32)) == 3 and texture.max_levels((12, 8, 8)) == 2


def test_the_ratio_is_one_on_the_data_and_reads_added_noise_and_smoothing():
  rng = np.random.default_rng(1)
  base = np.repeat(np.repeat(np.repeat(rng.normal(size=(6, 4, 4, 4, 1)), 4, 1), 4, 2), 4, 3)
  real = (base + 0.1 * rng.normal(size=base.shape)).astype(np.float32)   # noise σ = 0.1
  same = texture.detail_energy_ratio(real, real, batch_size=4)
  assert same["total"] == pytest.approx(1.0) and all(
      r == pytest.approx(1.0) for r in same["per_subband"].values())
  assert same["per_level"] == pytest.approx([1.0, 1.0, 1.0])
  # Twice the noise σ: four times the detail energy (the blocks of 4 hold none at the 2-voxel scale).
  noisier = (base + 0.2 * rng.normal(size=base.shape)).astype(np.float32)
  noisy = texture.detail_energy_ratio(noisier, real)
  assert noisy["total"] == pytest.approx(4.0, rel=0.1)
  # Coarser 4-voxel blocks: level 2 grows, level 1 (white noise only) does not.
  blotchy = real + np.repeat(np.repeat(np.repeat(0.3 * rng.normal(size=(6, 8, 8, 8, 1)), 2, 1), 2,
                                       2), 2, 3).astype(np.float32)
  levels = texture.detail_energy_ratio(blotchy, real)["per_level"]
  assert levels[0] == pytest.approx(1.0, rel=0.1) and levels[1] > 3
  smooth = base.astype(np.float32)
  assert texture.detail_energy_ratio(smooth, real)["total"] < 1e-6
  # Texture in one subband only: an HHH-only checkerboard raises that subband alone.
  d, h, w = np.indices((16, 16, 16))
  checker = (0.3 * (-1.0) ** (d + h + w))[None, ..., None].astype(np.float32)
  ratio = texture.detail_energy_ratio(real + checker, real)["per_subband"]
  assert ratio["HHH"] > 5 and all(ratio[k] == pytest.approx(1.0, rel=0.15)
                                  for k in texture.DETAIL_SUBBANDS[:-1])


def test_bad_input_is_refused():
  with pytest.raises(ValueError, match="expected \\[N, D, H, W, C\\]"):
    texture.detail_energy(np.zeros((4, 4, 4)))
  with pytest.raises(ValueError, match="2 Haar levels need spatial sizes divisible by 4"):
    texture.detail_energy(np.zeros((1, 6, 8, 8, 1)), levels=2)
  with pytest.raises(ValueError, match="no detail energy"):
    texture.detail_energy_ratio(np.ones((1, 4, 4, 4, 1)), np.zeros((1, 4, 4, 4, 1)))

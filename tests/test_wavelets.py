"""Haar DWT/IDWT against PyWavelets (and jaxwt) on random inputs."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import pywt

from cf3d_jax import wavelets

jax.config.update("jax_enable_x64", False)


def _pywt_reference(x: np.ndarray) -> np.ndarray:
  """[N, D, H, W, C] → [N, D/2, H/2, W/2, 8*C] via pywt.dwtn per item and channel."""
  n, _, _, _, c = x.shape
  out = []
  for i in range(n):
    per_band = {}
    for ch in range(c):
      coeffs = pywt.dwtn(x[i, ..., ch].astype(np.float64), "haar")
      for k in sorted(coeffs):
        per_band.setdefault(k, []).append(coeffs[k])
    out.append(np.stack([b for k in sorted(per_band) for b in per_band[k]], axis=-1))
  return np.stack(out)


@pytest.mark.parametrize("shape", [(1, 2, 2, 2, 1), (2, 4, 6, 8, 1), (1, 8, 8, 8, 3),
                                   (3, 6, 4, 10, 2)])
def test_dwt_matches_pywavelets(shape):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  got = np.asarray(wavelets.haar_dwt3d(jnp.asarray(x)))
  np.testing.assert_allclose(got, _pywt_reference(x), rtol=1e-5, atol=1e-5)


def test_subband_names_follow_pywt_order():
  names = ["".join("L" if ch == "a" else "H" for ch in k)
           for k in sorted("".join(p) for p in itertools.product("ad", repeat=3))]
  assert tuple(names) == wavelets.SUBBANDS


@pytest.mark.parametrize("shape", [(2, 4, 6, 8, 1), (1, 8, 8, 8, 3)])
def test_perfect_reconstruction(shape):
  x = jnp.asarray(np.random.default_rng(1).normal(size=shape).astype(np.float32))
  np.testing.assert_allclose(wavelets.haar_idwt3d(wavelets.haar_dwt3d(x)), x, atol=1e-5)


def test_orthonormal_energy_preserved():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, 8, 2)).astype(np.float32))
  np.testing.assert_allclose(jnp.sum(wavelets.haar_dwt3d(x) ** 2), jnp.sum(x ** 2), rtol=1e-5)


def test_matches_jaxwt_lowpass():
  jaxwt = pytest.importorskip("jaxwt")
  x = np.random.default_rng(3).normal(size=(1, 4, 4, 4, 1)).astype(np.float32)
  coeffs = jaxwt.wavedec3(jnp.asarray(x[..., 0]), "haar", level=1)
  ours = np.asarray(wavelets.haar_dwt3d(jnp.asarray(x)))
  np.testing.assert_allclose(ours[..., 0], np.asarray(coeffs[0]), rtol=1e-5, atol=1e-5)
  detail = coeffs[1]
  for key, band in (("aad", 1), ("ada", 2), ("add", 3), ("daa", 4), ("dad", 5), ("dda", 6),
                    ("ddd", 7)):
    np.testing.assert_allclose(ours[..., band], np.asarray(detail[key]), rtol=1e-5, atol=1e-5)


def test_odd_sizes_rejected_with_clear_message():
  with pytest.raises(ValueError, match="even D, H, W"):
    wavelets.haar_dwt3d(jnp.zeros((1, 3, 4, 4, 1)))
  with pytest.raises(ValueError, match="multiple of 8"):
    wavelets.haar_idwt3d(jnp.zeros((1, 2, 2, 2, 5)))

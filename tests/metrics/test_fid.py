"""Fréchet distance of cf3d_jax.metrics.fid against a float64 SciPy `sqrtm` computation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from cf3d_jax.errors import ConfigError
from cf3d_jax.metrics import fid


def _scipy_frechet(mu1, sigma1, mu2, sigma2) -> float:
  """The pytorch-fid / wdm-3d formula with `scipy.linalg.sqrtm` of Σ1 Σ2, float64."""
  covmean = linalg.sqrtm(sigma1 @ sigma2)
  assert np.allclose(covmean.imag, 0, atol=1e-8) if np.iscomplexobj(covmean) else True
  covmean = np.real(covmean)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _features(n: int, f: int, seed: int, shift: float = 0.0) -> np.ndarray:
  """Correlated, non-centred random features `[n, f]` (float32, as a network would give)."""
  rng = np.random.default_rng(seed)
  mixing = rng.standard_normal((f, f)) / np.sqrt(f)
  x = rng.standard_normal((n, f)) @ mixing + shift + rng.standard_normal(f)
  return x.astype(np.float32)


def test_feature_statistics_match_numpy():
  x = _features(50, 7, seed=0)
  mu, sigma = fid.feature_statistics(x)
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(mu, x.astype(np.float64).mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10,
                             atol=1e-12)


@pytest.mark.parametrize('n1,n2,f,shift', [(200, 150, 16, 0.3), (400, 400, 64, 0.0),
                                           (300, 250, 32, 2.0)])
def test_matches_scipy_sqrtm(n1, n2, f, shift):
  f1, f2 = _features(n1, f, seed=1), _features(n2, f, seed=2, shift=shift)
  mu1, s1 = fid.feature_statistics(f1)
  mu2, s2 = fid.feature_statistics(f2)
  want = _scipy_frechet(mu1, s1, mu2, s2)
  got = fid.frechet_distance(mu1, s1, mu2, s2)
  assert want > 0.1
  np.testing.assert_allclose(got, want, rtol=1e-9)
  assert fid.fid_from_features(f1, f2) == pytest.approx(want, rel=1e-9)


def test_symmetric_and_zero_for_identical_sets():
  f1, f2 = _features(120, 24, seed=3), _features(90, 24, seed=4, shift=0.5)
  d12, d21 = fid.fid_from_features(f1, f2), fid.fid_from_features(f2, f1)
  assert d12 > 0.1
  assert d12 == pytest.approx(d21, rel=1e-10)
  assert fid.fid_from_features(f1, f1) == pytest.approx(0.0, abs=1e-9)
  # Row order does not matter; a shift of the mean adds its squared norm.
  assert fid.fid_from_features(f1, f1[::-1]) == pytest.approx(0.0, abs=1e-9)
  delta = np.linspace(-1, 1, 24).astype(np.float32)
  assert fid.fid_from_features(f1, f1 + delta) == pytest.approx(float(delta.astype(np.float64)
                                                                      @ delta), rel=1e-6)


def test_diagonal_covariances_closed_form():
  rng = np.random.default_rng(5)
  a, b = rng.uniform(0.1, 2, 10), rng.uniform(0.1, 2, 10)
  mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  assert got == pytest.approx(want, rel=1e-12)


def test_singular_covariances_fewer_samples_than_features():
  # 20 samples of 64 features: rank-deficient covariances (where sqrtm of the product is
  # ill-conditioned); the result stays finite, real, non-negative and symmetric.
  f1, f2 = _features(20, 64, seed=6), _features(20, 64, seed=7, shift=0.2)
  d12, d21 = fid.fid_from_features(f1, f2), fid.fid_from_features(f2, f1)
  assert np.isfinite(d12) and d12 > 0
  assert d12 == pytest.approx(d21, rel=1e-8)
  assert fid.fid_from_features(f1, f1) == pytest.approx(0.0, abs=1e-8)
  # Same support: scaling the centred features by c gives (1 − c)² tr(Σ) exactly.
  mu, sigma = fid.feature_statistics(f1)
  scaled = mu + 2.0 * (f1.astype(np.float64) - mu)
  assert fid.fid_from_features(f1, scaled) == pytest.approx(np.trace(sigma), rel=1e-8)


def test_bad_inputs_raise_clear_errors():
  mu, sigma = np.zeros(3), np.eye(3)
  with pytest.raises(ConfigError, match=r'\[N, F\]'):
    fid.feature_statistics(np.zeros(5))
  with pytest.raises(ValueError, match='at least 2'):
    fid.feature_statistics(np.zeros((1, 3)))
  with pytest.raises(ValueError, match='NaN'):
    fid.feature_statistics(np.array([[0.0, np.nan], [1.0, 2.0]]))
  with pytest.raises(ValueError, match='means must be'):
    fid.frechet_distance(mu, sigma, np.zeros(4), sigma)
  with pytest.raises(ValueError, match=r'\[F, F\]'):
    fid.frechet_distance(mu, sigma, mu, np.eye(4))
  with pytest.raises(ValueError, match='not symmetric'):
    fid.frechet_distance(mu, sigma, mu, np.triu(np.ones((3, 3))))
  with pytest.raises(ValueError, match='positive semi-definite'):
    fid.frechet_distance(mu, np.diag([1.0, -1.0, 1.0]), mu, sigma)
  with pytest.raises(ValueError, match='feature sizes differ'):
    fid.fid_from_features(np.zeros((4, 3)), np.zeros((4, 5)))

"""Fréchet distance between feature distributions (FID on Med3D features), in float64 NumPy.

`d² = ‖μ1 − μ2‖² + tr(Σ1) + tr(Σ2) − 2·tr((Σ1 Σ2)^½)`, the quantity of pytorch-fid's and
wdm-3d's `calculate_frechet_distance` (wdm-3d: `eval/fid.py`, on the 2048-d global-average-pooled
layer4 features of MedicalNet `resnet_50_23dataset`; see `cf3d_jax.models.resnet3d`).

The final statistic runs on the host in float64 (the features may come from JAX in float32).
The matrix square root is never formed: `tr((Σ1 Σ2)^½)` is the sum of the square roots of the
eigenvalues of `Σ1 Σ2`, which equal those of the symmetric positive semi-definite
`Σ1^½ Σ2 Σ1^½`; both steps use symmetric eigendecompositions (`numpy.linalg.eigh`), with
rounding-level negative eigenvalues clipped to 0 and, in the product, eigenvalues below the
rank tolerance `max·F·eps` set to 0. Unlike `scipy.linalg.sqrtm` of the
non-symmetric product, this never yields complex values or NaNs for singular covariances
(fewer samples than features), so no diagonal offset is needed; on well-conditioned inputs the
two agree to float64 rounding. The distance is clamped at 0 (rounding can make it ~−1e-12 for
identical sets).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cf3d_jax.metrics.image import MetricInputError

__all__ = ['feature_statistics', 'frechet_distance', 'fid_from_features']

Array = Any  # numpy.ndarray or jax.Array

# A covariance eigenvalue below −_PSD_TOLERANCE·max|eigenvalue| means the input is not a
# covariance matrix (rounding alone stays many orders of magnitude smaller).
_PSD_TOLERANCE = 1e-5


def feature_statistics(features: Array) -> tuple[np.ndarray, np.ndarray]:
  """`[N, F]` features → `(mu [F], sigma [F, F])`, float64.

  `sigma` is the unbiased sample covariance (divisor N − 1), as `np.cov(features,
  rowvar=False)` in pytorch-fid and wdm-3d. Needs N ≥ 2 finite rows.
  """
  x = np.asarray(features, np.float64)
  if x.ndim != 2:
    raise MetricInputError(f'feature_statistics: features must be [N, F], got shape {x.shape}.')
  if x.shape[0] < 2:
    raise MetricInputError('feature_statistics: need at least 2 feature vectors for a '
                           f'covariance, got {x.shape[0]}.')
  if not np.all(np.isfinite(x)):
    raise MetricInputError('feature_statistics: features contain NaN or inf '
                           f'({int(np.sum(~np.isfinite(x)))} entries).')
  mu = x.mean(axis=0)
  centred = x - mu
  sigma = centred.T @ centred / (x.shape[0] - 1)
  return mu, sigma


def _symmetric_psd(sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
  """Eigenvalues (clipped at 0) and eigenvectors of a covariance; errors if it is not one."""
  if not np.all(np.isfinite(sigma)):
    raise MetricInputError(f'frechet_distance: {name} contains NaN or inf.')
  scale = max(float(np.max(np.abs(sigma))), np.finfo(np.float64).tiny)
  if not np.allclose(sigma, sigma.T, rtol=0, atol=1e-6 * scale):
    raise MetricInputError(f'frechet_distance: {name} is not symmetric '
                           f'(max |Σ − Σᵀ| = {np.max(np.abs(sigma - sigma.T)):.3g}).')
  w, v = np.linalg.eigh((sigma + sigma.T) / 2)
  if w.min() < -_PSD_TOLERANCE * max(abs(w.min()), abs(w.max())):
    raise MetricInputError(f'frechet_distance: {name} is not positive semi-definite '
                           f'(smallest eigenvalue {w.min():.3g}, largest {w.max():.3g}).')
  return np.clip(w, 0.0, None), v


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """`tr((Σ1 Σ2)^½) = Σ √eig(Σ1^½ Σ2 Σ1^½)` for covariances Σ1, Σ2 (float64)."""
  w1, v1 = _symmetric_psd(sigma1, 'sigma1')
  _symmetric_psd(sigma2, 'sigma2')
  root1 = (v1 * np.sqrt(w1)) @ v1.T
  inner = root1 @ sigma2 @ root1
  eig = np.linalg.eigvalsh((inner + inner.T) / 2)
  # Eigenvalues below the rank tolerance (as numpy.linalg.matrix_rank) are rounding noise
  # of a singular product; their square roots (~1e-8 each) would bias the trace.
  tol = max(float(eig.max()), 0.0) * eig.size * np.finfo(np.float64).eps
  return float(np.sum(np.sqrt(np.where(eig > tol, eig, 0.0))))


def frechet_distance(mu1: Array, sigma1: Array, mu2: Array, sigma2: Array) -> float:
  """Fréchet distance `d²` of N(mu1, sigma1) and N(mu2, sigma2): `[F]`, `[F, F]` each → float.

  Symmetric in its two distributions; 0 for identical ones. Computed in float64 NumPy (see
  the module docstring for the square-root trace).
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  f = mu1.shape[0]
  if mu1.ndim != 1 or mu2.shape != (f,):
    raise MetricInputError(f'frechet_distance: means must be [F] of one length, got '
                           f'{mu1.shape} and {mu2.shape}.')
  if sigma1.shape != (f, f) or sigma2.shape != (f, f):
    raise MetricInputError(f'frechet_distance: covariances must be [F, F] = [{f}, {f}], got '
                           f'{sigma1.shape} and {sigma2.shape}.')
  if not (np.all(np.isfinite(mu1)) and np.all(np.isfinite(mu2))):
    raise MetricInputError('frechet_distance: means contain NaN or inf.')
  diff = mu1 - mu2
  value = (diff @ diff + np.trace(sigma1) + np.trace(sigma2)
           - 2.0 * _trace_sqrt_product(sigma1, sigma2))
  return max(float(value), 0.0)


def fid_from_features(features1: Array, features2: Array) -> float:
  """FID of two feature sets `[N1, F]`, `[N2, F]` (e.g. real and generated) → float."""
  mu1, sigma1 = feature_statistics(features1)
  mu2, sigma2 = feature_statistics(features2)
  if mu1.shape != mu2.shape:
    raise MetricInputError(f'fid_from_features: feature sizes differ: {mu1.shape[0]} and '
                           f'{mu2.shape[0]}.')
  return frechet_distance(mu1, sigma1, mu2, sigma2)

"""Pieces every objective shares: per-example losses, broadcasting, and the model-call type.

`ModelEval(z [N, ...], t [N]) -> raw network output [N, ...]` is the network with the text (and
guidance) already bound and `t` in the objective's own time units; objectives turn the raw output
into predictions themselves (`prediction_from_output`), so preconditioning and guidance compose.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from cf3d_jax.errors import ConfigError

ModelEval = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
ClipFn = Callable[[jnp.ndarray], jnp.ndarray]
LOSSES = ("mse", "l1")


LOSS_WEIGHTINGS = ("none", "edm", "min_snr")
MIN_SNR_GAMMA = 5.0   # Hang et al. 2023's γ


def per_example_loss(prediction: jnp.ndarray, target: jnp.ndarray, kind: str,
                     weight: jnp.ndarray | None = None) -> jnp.ndarray:
  """Mean of the squared ('mse') or absolute ('l1') error over all but the batch axis → `[N]`;
  `weight` (broadcasting against the error, e.g. `[N, 1, 1, 1, C]`) multiplies it first."""
  err = prediction.astype(jnp.float32) - target.astype(jnp.float32)
  err = jnp.square(err) if kind == "mse" else jnp.abs(err)
  if weight is not None:
    err = err * weight
  return jnp.mean(err.reshape(err.shape[0], -1), axis=1)


def check_loss_weighting(cfg, preconditioning: str, allowed: tuple[str, ...]) -> str:
  """Resolves `config.objective.loss_weighting`; 'edm' needs skip preconditioning."""
  weighting = cfg.get("loss_weighting", "none")
  if weighting not in allowed:
    raise ConfigError(f"config.objective.loss_weighting={weighting!r}: this objective offers "
                      f"{allowed}")
  if weighting == "edm" and preconditioning != "skip":
    raise ConfigError("config.objective.loss_weighting='edm' weights the loss by 1/c_out² of the "
                      "skip preconditioning; set config.objective.preconditioning='skip'")
  return weighting


def check_snr_range(cfg) -> tuple[float, float]:
  """Resolves `config.objective.snr_range` (lo, hi) of the 'min_snr' weighting: 0 ≤ lo ≤ hi."""
  value = tuple(float(v) for v in cfg.get("snr_range", (0.0, MIN_SNR_GAMMA)))
  if len(value) != 2 or not 0.0 <= value[0] <= value[1]:
    raise ConfigError(f"config.objective.snr_range={value!r}: expected (lo, hi) with 0 <= lo <= hi")
  return value


def check_loss(kind: str, default: str) -> str:
  """Resolves `config.objective.loss` ('default' → the family's own)."""
  kind = default if kind == "default" else kind
  if kind not in LOSSES:
    raise ConfigError(f"config.objective.loss={kind!r}: expected 'default' or one of {LOSSES}")
  return kind


def sigma_data_from_config(cfg) -> float | tuple[float, ...]:
  """`config.objective.sigma_data_channels` (one std per channel of the diffused tensor, e.g. per
  Haar subband) when set, else the scalar `sigma_data`; ConfigError for a non-positive value."""
  channels = tuple(float(v) for v in cfg.get("sigma_data_channels", ()))
  values = channels or (float(cfg.get("sigma_data", 0.5)),)
  key = "sigma_data_channels" if channels else "sigma_data"
  if any(not v > 0 for v in values):
    raise ConfigError(f"config.objective.{key}={channels or values[0]!r}: expected values > 0")
  return channels or values[0]


def sigma_data_array(sigma_data: float | tuple[float, ...], like: jnp.ndarray) -> jnp.ndarray:
  """The data std as an array broadcasting against `like` `[N, ..., C]`: a scalar, or `[C]`
  along the channel axis (ConfigError if its length is not C)."""
  sd = jnp.asarray(sigma_data, jnp.float32)
  if sd.ndim and sd.shape[0] != like.shape[-1]:
    raise ConfigError(f"config.objective.sigma_data_channels has {sd.shape[0]} values; the "
                      f"diffused tensor has {like.shape[-1]} channels")
  return sd


def bcast(values: jnp.ndarray, like: jnp.ndarray) -> jnp.ndarray:
  """`[N]` → `[N, 1, …, 1]` with like's rank and dtype."""
  return values.reshape(values.shape + (1,) * (like.ndim - values.ndim)).astype(like.dtype)

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


def per_example_loss(prediction: jnp.ndarray, target: jnp.ndarray, kind: str) -> jnp.ndarray:
  """Mean of the squared ('mse') or absolute ('l1') error over all but the batch axis → `[N]`."""
  err = prediction.astype(jnp.float32) - target.astype(jnp.float32)
  err = jnp.square(err) if kind == "mse" else jnp.abs(err)
  return jnp.mean(err.reshape(err.shape[0], -1), axis=1)


def check_loss(kind: str, default: str) -> str:
  """Resolves `config.objective.loss` ('default' → the family's own)."""
  kind = default if kind == "default" else kind
  if kind not in LOSSES:
    raise ConfigError(f"config.objective.loss={kind!r}: expected 'default' or one of {LOSSES}")
  return kind


def bcast(values: jnp.ndarray, like: jnp.ndarray) -> jnp.ndarray:
  """`[N]` → `[N, 1, …, 1]` with like's rank and dtype."""
  return values.reshape(values.shape + (1,) * (like.ndim - values.ndim)).astype(like.dtype)

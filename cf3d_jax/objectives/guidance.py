"""Classifier-free guidance and the generic sampling loop (a `lax.scan`, jitted once).

Guidance convention: `out = out_null + w * (out_cond - out_null)` applied to the network output
(for x0/eps/v parameterisations this is the same linear combination of the implied eps at fixed
z_t). `w = 1` is the conditional model alone and skips the null pass ("no CFG"); `w = 0` is the
unconditional model. The conditional and null passes run as ONE batched forward call.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# model_fn(z_t [N,...], t [N] float, text_emb [N,L,E], text_mask [N,L]) -> output [N,...]
ModelFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def guided(model_fn: ModelFn, scale: float, null_emb: jnp.ndarray, null_mask: jnp.ndarray
           ) -> ModelFn:
  """Wraps `model_fn` with CFG at a static `scale`; null_emb `[L, E]`, null_mask `[L]`."""
  if scale == 1.0:
    return model_fn

  def fn(z_t, t, text_emb, text_mask):
    n = z_t.shape[0]
    null_e = jnp.broadcast_to(null_emb, text_emb.shape).astype(text_emb.dtype)
    null_m = jnp.broadcast_to(null_mask, text_mask.shape)
    out = model_fn(jnp.concatenate([z_t, z_t]), jnp.concatenate([t, t]),
                   jnp.concatenate([text_emb, null_e]), jnp.concatenate([text_mask, null_m]))
    cond, uncond = out[:n], out[n:]
    return uncond + scale * (cond - uncond)

  return fn


def sample_loop(objective, model_fn: ModelFn, z_start: jnp.ndarray, text_emb: jnp.ndarray,
                text_mask: jnp.ndarray, key: jax.Array,
                clip_x0: Callable[[jnp.ndarray], jnp.ndarray] | None = None) -> jnp.ndarray:
  """Runs the objective's sampler from `z_start` (pure noise) over `objective.timesteps()`.

  z_start `[N, ...]`; text_emb `[N, L, E]`; returns z0 `[N, ...]`. The step key is
  `fold_in(key, i)` for step i.
  """
  steps = jnp.asarray(objective.timesteps())
  prev = jnp.concatenate([steps[1:], jnp.asarray([-1], steps.dtype)])
  n = z_start.shape[0]

  def body(z, xs):
    i, t, t_prev = xs
    tt = jnp.full((n,), t)
    out = model_fn(z, objective.model_time(tt), text_emb, text_mask)
    z = objective.sampler_step(out.astype(z.dtype), z, tt, jnp.full((n,), t_prev),
                               jax.random.fold_in(key, i), clip_x0)
    return z, None

  z, _ = jax.lax.scan(body, z_start, (jnp.arange(steps.shape[0]), steps, prev))
  return z

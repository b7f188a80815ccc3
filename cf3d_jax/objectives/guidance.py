"""Classifier-free guidance and the generic sampling loop (a `lax.scan`, jitted once).

Guidance convention: `out = out_null + w * (out_cond - out_null)` applied to the network output
(for x0/eps/v parameterisations this is the same linear combination of the implied eps at fixed
z_t). `w = 1` is the conditional model alone and skips the null pass ("no CFG"); `w = 0` is the
unconditional model. The conditional and null passes run as ONE batched forward call.

The "null" branch may be any text per item (contrastive guidance): with the factual prompt A as
the negative of a counterfactual prompt B, `out = out_A + w (out_B − out_A)` extrapolates along
the direction that separates the two prompts, instead of along prompt-vs-nothing.

Guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
Flawed", §3.4; diffusers' `rescale_noise_cfg`): with φ > 0 the guided output is pulled back to
the conditional output's per-item standard deviation, `out ← φ·out·std(cond)/std(out) +
(1 − φ)·out`, which undoes the over-exposure a large w adds everywhere while keeping the
direction it adds.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cf3d_jax.objectives import Objective

# model_fn(z_t [N,...], t [N] float, text_emb [N,L,E], text_mask [N,L]) -> output [N,...]
ModelFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def rescale_guided(out: jnp.ndarray, cond: jnp.ndarray, phi: float) -> jnp.ndarray:
  """Guidance rescale: `out`, `cond` `[N, ...]` (guided and conditional outputs) → `[N, ...]`.

  Each item of `out` scaled to the standard deviation (over all but the batch axis, ddof = 1 as
  torch's `std`) of its conditional output, mixed back by φ ∈ [0, 1] (0 = `out` unchanged).
  """
  if not 0.0 <= phi <= 1.0:
    raise ValueError(f"guidance rescale {phi}: expected a fraction in [0, 1]")
  if phi == 0.0:
    return out
  axes = tuple(range(1, out.ndim))
  o32, c32 = out.astype(jnp.float32), cond.astype(jnp.float32)
  ratio = jnp.std(c32, axis=axes, keepdims=True, ddof=1) / jnp.maximum(
      jnp.std(o32, axis=axes, keepdims=True, ddof=1), 1e-12)
  return (phi * o32 * ratio + (1.0 - phi) * o32).astype(out.dtype)


def guided(model_fn: ModelFn, scale: float, null_emb: jnp.ndarray, null_mask: jnp.ndarray,
           interval: tuple[float, float] = (0.0, 1.0), num_train_steps: int = 1000,
           rescale: float = 0.0) -> ModelFn:
  """Wraps `model_fn` with CFG at a static `scale`.

  null_emb `[L, E]` and null_mask `[L]` (the null text, the same for every item), or `[N, L, E]`
  and `[N, L]` (a negative text per item: contrastive guidance, module docstring).

  interval `(lo, hi)`: guidance acts only where the model time t lies in [lo·T, hi·T]
  (T = `num_train_steps`; t = T is pure noise), elsewhere the conditional output is used
  (w = 1) — Kynkäänniemi et al. 2024's guidance interval. (0, 1) = every step.

  rescale: φ of `rescale_guided` (0 = plain CFG; module docstring).
  """
  if scale == 1.0:
    return model_fn
  if not 0.0 <= rescale <= 1.0:
    raise ValueError(f"guidance rescale {rescale}: expected a fraction in [0, 1]")
  lo, hi = (float(v) for v in interval)
  if not 0.0 <= lo <= hi <= 1.0:
    raise ValueError(f"guidance interval {interval}: expected 0 <= lo <= hi <= 1")
  everywhere = lo == 0.0 and hi == 1.0

  def fn(z_t, t, text_emb, text_mask):
    n = z_t.shape[0]
    null_e = jnp.broadcast_to(null_emb, text_emb.shape).astype(text_emb.dtype)
    null_m = jnp.broadcast_to(null_mask, text_mask.shape)
    out = model_fn(jnp.concatenate([z_t, z_t]), jnp.concatenate([t, t]),
                   jnp.concatenate([text_emb, null_e]), jnp.concatenate([text_mask, null_m]))
    cond, uncond = out[:n], out[n:]
    if everywhere:
      return rescale_guided(uncond + scale * (cond - uncond), cond, rescale)
    frac = t.astype(jnp.float32) / num_train_steps
    w = jnp.where((frac >= lo) & (frac <= hi), scale, 1.0)
    out = uncond + w.reshape((n,) + (1,) * (cond.ndim - 1)).astype(cond.dtype) * (cond - uncond)
    return rescale_guided(out, cond, rescale)

  return fn


def _grid(objective: Objective, depth: float = 1.0) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(times `[S']` descending, next times `[S']` ending at the objective's clean end): the last
  S' = max(1, round(depth·S)) steps of the sampler's grid (depth 1 = all of it)."""
  steps = np.asarray(objective.timesteps())
  nxt = np.concatenate([steps[1:], np.asarray([objective.final_time], steps.dtype)])
  if not 0.0 < depth <= 1.0:
    raise ValueError(f"depth={depth}: expected a fraction in (0, 1]")
  keep = max(1, int(round(depth * len(steps))))
  return jnp.asarray(steps[-keep:]), jnp.asarray(nxt[-keep:])


def _bind(objective: Objective, model_fn: ModelFn, text_emb: jnp.ndarray, text_mask: jnp.ndarray):
  """model_eval(z, t) with the text bound and t converted by `objective.model_time`."""
  return lambda z, t: model_fn(z, objective.model_time(t), text_emb, text_mask).astype(z.dtype)


def sample_loop(objective: Objective, model_fn: ModelFn, z_start: jnp.ndarray, text_emb: jnp.ndarray,
                text_mask: jnp.ndarray, key: jax.Array,
                clip_x0: Callable[[jnp.ndarray], jnp.ndarray] | None = None,
                deterministic: bool = False, depth: float = 1.0,
                known: jnp.ndarray | None = None, edit_mask: jnp.ndarray | None = None,
                trajectory: bool = False, residuals: jnp.ndarray | None = None):
  """Runs the objective's sampler from `z_start` (pure noise, or an inversion) to the clean end.

  z_start `[N, ...]`; text_emb `[N, L, E]`; returns z0 `[N, ...]`. The step key is
  `fold_in(key, i)` for step i. `deterministic=True` uses the objective's ODE step (DDIM η = 0
  for DDPM, Euler/Heun for rectified flow) whatever sampler the config names — the map that
  `invert_loop` undoes. `depth` < 1 starts part-way down the grid (from a partial inversion).

  Blended editing (with `known` `[S', N, ...]` from `invert_loop(..., trajectory=True)` and
  `edit_mask` `[N or 1, ...]` in [0, 1] on z's grid): after step i, `z ← m·z + (1 − m)·known[i]`,
  so outside the mask the state follows the inversion of the given scan (which decodes back to
  it) and only the masked region is generated anew under the prompt. From noise, `known` is the
  factual prompt's own trajectory (`trajectory=True`): a counterfactual that may change only
  the masked region.

  trajectory: return `(z0, states [S', N, ...])`, the state after each step (the last is z0),
  which another call follows as `known`.

  residuals `[S', N, ...]` (`edit_friendly_inversion`): step i is the stochastic update's mean
  plus `residuals[i]` in place of fresh noise (the objective's `stochastic_mean`; DDPM only),
  so the decode under the scan's own prompt retraces its inversion exactly.
  """
  steps, nxt = _grid(objective, depth)
  n = z_start.shape[0]
  model_eval = _bind(objective, model_fn, text_emb, text_mask)
  if (known is None) != (edit_mask is None):
    raise ValueError("blended editing needs both `known` and `edit_mask`")
  for name, arr in (("known", known), ("residuals", residuals)):
    if arr is not None and arr.shape[:2] != (steps.shape[0], n):
      raise ValueError(f"{name} has shape {arr.shape}; expected [{steps.shape[0]}, {n}, ...] "
                       "(one state per sampler step, from the inversion with the same depth)")
  if residuals is not None and not hasattr(objective, "stochastic_mean"):
    raise ValueError(f"{type(objective).__name__} has no stochastic step to follow residuals "
                     "(edit-friendly inversion needs the DDPM objective)")

  def body(z, xs):
    i, t, t_next = xs[:3]
    tt, tn = jnp.full((n,), t), jnp.full((n,), t_next)
    if residuals is not None:
      z = objective.stochastic_mean(model_eval, z, tt, tn, clip_x0) + xs[-1]
    elif deterministic:
      z = objective.ode_step(model_eval, z, tt, tn, clip_x0)
    else:
      z = objective.sampler_step(model_eval, z, tt, tn, jax.random.fold_in(key, i), clip_x0)
    if known is not None:
      z = edit_mask * z + (1 - edit_mask) * xs[3]
    return z, (z if trajectory else None)

  xs = ((jnp.arange(steps.shape[0]), steps, nxt) + (() if known is None else (known,))
        + (() if residuals is None else (residuals,)))
  z, states = jax.lax.scan(body, z_start, xs)
  return (z, states) if trajectory else z


def edit_friendly_inversion(objective: Objective, model_fn: ModelFn, z0: jnp.ndarray,
                            text_emb: jnp.ndarray, text_mask: jnp.ndarray, keys: jax.Array,
                            clip_x0: Callable[[jnp.ndarray], jnp.ndarray] | None = None,
                            depth: float = 1.0):
  """Edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov & Michaeli, CVPR 2024).

  Each grid time t_i gets its own noisy copy of the clean z0 `[N, ...]`,
  `x_i = √ᾱ_i z0 + √(1 − ᾱ_i) ε_i` with independent ε_i drawn from item n's key `keys[n]`
  (`[N]` typed keys: an item's draw does not depend on its batch); the residual of step i is
  what the stochastic update from x_i (under the scan's own text) misses of the next state,
  `r_i = x_{i+1} − mean(x_i)` (the last state is z0). `sample_loop(..., residuals=r)` from x_0
  then retraces x_1, …, z0 exactly under the same text, and under another prompt keeps the
  noise maps that encode the subject while the prompt changes the means. Unlike DDIM inversion
  the states are not tied to one ODE path, so the prompt is not fighting a trajectory that
  already decodes to the scan. Returns `(z_start [N, ...], known [S', N, ...], residuals
  [S', N, ...])`: known[i] is the state after step i (for blended editing, as `invert_loop`'s).
  """
  if not hasattr(objective, "stochastic_mean"):
    raise ValueError(f"edit-friendly inversion needs a stochastic DDPM step; "
                     f"{type(objective).__name__} has none")
  steps, nxt = _grid(objective, depth)
  n, s = z0.shape[0], steps.shape[0]
  model_eval = _bind(objective, model_fn, text_emb, text_mask)

  eps = jax.vmap(lambda k: jax.random.normal(k, (s,) + z0.shape[1:], z0.dtype))(keys)
  states = jax.lax.map(lambda xs: objective.corrupt(z0, xs[0], jnp.full((n,), xs[1])),
                       (jnp.swapaxes(eps, 0, 1), steps))                  # [S', N, ...]
  known = jnp.concatenate([states[1:], z0[None]], axis=0)

  def body(_, xs):
    x, t, t_next, target = xs
    mean = objective.stochastic_mean(model_eval, x, jnp.full((n,), t), jnp.full((n,), t_next),
                                     clip_x0)
    return None, target - mean

  _, residuals = jax.lax.scan(body, None, (states, steps, nxt, known))
  return states[0], known, residuals


def invert_loop(objective: Objective, model_fn: ModelFn, z0: jnp.ndarray, text_emb: jnp.ndarray,
                text_mask: jnp.ndarray, refine_iters: int = 0, depth: float = 1.0,
                trajectory: bool = False):
  """Deterministic inversion: clean z0 `[N, ...]` → the start noise that `sample_loop(...,
  deterministic=True)` maps back to (approximately) z0, on the same time grid in reverse.

  Each step is the objective's `inversion_step` (the model evaluated at the current state and
  the step's noisier time), then `refine_iters` fixed-point corrections
  `z_b ← z_b + (z_a − ode_step(z_b, b → a))`, which make each step the exact inverse of the
  sampler's step when they converge (each costs one ODE step of network calls). No clipping.
  `depth` < 1 inverts only the last fraction of the grid (stops at an intermediate noise level;
  decode with the same depth): less of the subject is locked into the noise, so the prompt can
  change more (SDEdit-style strength).
  With `trajectory=True` returns `(z, known)`: `known[i]` `[S', N, ...]` is the state at the time
  `sample_loop` reaches after its step i (the last is z0 itself), for blended editing.
  """
  steps, nxt = _grid(objective, depth)
  n = z0.shape[0]
  model_eval = _bind(objective, model_fn, text_emb, text_mask)

  def body(z_a, xs):
    t_b, t_a = xs
    tb, ta = jnp.full((n,), t_b), jnp.full((n,), t_a)
    z_b = objective.inversion_step(model_eval, z_a, ta, tb)
    # A loop, not an unrolled chain: one copy of the network in the compiled body.
    z_b = jax.lax.fori_loop(
        0, refine_iters, lambda _, z: z + (z_a - objective.ode_step(model_eval, z, tb, ta)), z_b)
    return z_b, z_b

  z, states = jax.lax.scan(body, z0, (steps[::-1], nxt[::-1]))
  if not trajectory:
    return z
  # states[j] is the state at time steps[::-1][j]; sample step i ends at nxt[i] = steps[i + 1].
  known = jnp.concatenate([states[::-1][1:], z0[None]], axis=0)
  return z, known

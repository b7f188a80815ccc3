"""Rectified flow as MAISI-RFlow uses it (MONAI `RFlowScheduler`), with Euler and Heun samplers.

Conventions (DESIGN.md §4). Time t is continuous in [0, T] (T = `num_train_steps`, 1000) and
s = t/T:
- `z_t = (1 − s) z0 + s ε`: t = 0 is data, t = T pure noise (MONAI's `add_noise`);
- the network sees t itself (a float in [0, T]) and predicts the velocity `v = z0 − ε`;
  loss L1 (MAISI) per example, MSE optional;
- training t: uniform on [0, T) (MAISI) or logit-normal `T·sigmoid(N(loc, scale))`, then the
  resolution shift `s' = r s / (1 + (r − 1) s)` with `r = shift_scale · (numel / base)^(1/3)`,
  numel = D·H·W of the diffused tensor (the latent, or the wavelet subband grid), base = 32³;
  the shift is applied in training and sampling alike (MONAI `use_timestep_transform`);
- sampling: N steps at `t_i = shift((1 − i/N) T)`, i = 0..N−1, then t = 0; Euler
  `z ← z + v (t − t_next)/T` ('euler', MONAI's `step`) or Heun's second-order correction
  `z ← z + (v(z, t) + v(z_E, t_next))/2 · (t − t_next)/T` with the Euler proposal z_E ('heun',
  twice the network calls). MONAI stores its inference grid in float16 and truncates
  `next_timestep` to an int inside `step`; we keep float32 times (a difference below 1/T in dt);
- clipping (wavelet space): x0̂ = z + s v is clipped by the space and the velocity re-derived,
  v = (x0̂_clipped − z)/s, which is exactly DDIM's rule (Euler on this path *is* DDIM);
- optional skip preconditioning (`preconditioning='skip'`): `v̂ = c_skip z_t + c_out F` with the
  optimal linear predictor of v for data of std σ_d: `c_skip = ((1 − s) σ_d² − s)/V`,
  `c_out = σ_d/√V`, V = (1 − s)² σ_d² + s² (finite at every s, unlike x0-based forms);
- inversion: the ODE run from t = 0 towards T with Euler, the velocity evaluated at (z_t, t_next)
  (the time the sampler's step from t_next evaluates at): `z_{t_next} = z_t − v (t_next − t)/T`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cf3d_jax.errors import ConfigError
from cf3d_jax.objectives.common import (LOSS_WEIGHTINGS, MIN_SNR_GAMMA, ClipFn, ModelEval, bcast,
                                        check_loss,
                                        check_loss_weighting, check_snr_range, per_example_loss,
                                        sigma_data_array, sigma_data_from_config)

SAMPLERS = ("euler", "heun")
TIME_SAMPLINGS = ("uniform", "logit-normal")
PRECONDITIONINGS = ("none", "skip")
DEFAULT_SAMPLE_STEPS = 30   # MAISI RFlow inference
BASE_NUMEL = 32 ** 3


def shift_ratio(spatial_shape, base_numel: int = BASE_NUMEL, scale: float = 1.0) -> float:
  """MONAI's `r = scale · (numel / base_numel)^(1/d)` for a spatial shape of d axes."""
  numel = float(np.prod(spatial_shape))
  return float(scale * (numel / base_numel) ** (1.0 / len(spatial_shape)))


def shift_time(t, ratio: float, num_train_steps: int):
  """`T · r s / (1 + (r − 1) s)` with s = t/T; works on NumPy and jnp arrays (ratio 1 = identity)."""
  s = t / num_train_steps
  return num_train_steps * ratio * s / (1 + (ratio - 1) * s)


def sampling_times(num_train_steps: int, num_steps: int, ratio: float) -> np.ndarray:
  """Descending float64 times `[num_steps]`: shift((1 − i/N)·T), i = 0..N−1 (t = 0 comes after)."""
  if not 1 <= num_steps <= num_train_steps:
    raise ConfigError(f"sampler steps {num_steps} must lie in [1, {num_train_steps}]")
  t = (1.0 - np.arange(num_steps, dtype=np.float64) / num_steps) * num_train_steps
  return shift_time(t, ratio, num_train_steps)


@dataclasses.dataclass(frozen=True)
class RectifiedFlow:
  """Rectified flow (velocity prediction) with MONAI's time conventions."""
  num_train_steps: int = 1000
  num_sample_steps: int = DEFAULT_SAMPLE_STEPS
  sampler: str = "euler"
  time_sampling: str = "uniform"
  logit_normal: tuple[float, float] = (0.0, 1.0)
  ratio: float = 1.0                    # resolution shift r (1 = none)
  preconditioning: str = "none"
  sigma_data: float | tuple[float, ...] = 0.5   # scalar, or one std per channel
  loss_kind: str = "l1"
  loss_weighting: str = "none"          # 'none' | 'edm' (1/c_out²) | 'min_snr' (clip(SNR, lo, hi)·s²)
  snr_range: tuple[float, float] = (0.0, MIN_SNR_GAMMA)  # (lo, hi) of 'min_snr'
  final_time = 0.0

  @classmethod
  def from_config(cls, cfg, latent_shape=None) -> "RectifiedFlow":
    """Builds from `config.objective`; `latent_shape` = (D, H, W, C) of the diffused tensor,
    needed for the resolution shift when `time_shift` is on. Keys used: num_train_steps,
    num_sample_steps (0 = 30), sampler ('default' = 'euler'), time_sampling, logit_normal,
    time_shift, shift_base_numel, shift_scale, preconditioning, sigma_data, loss ('default' =
    'l1'). The DDPM-only keys (betas, prediction, eta, spacing) are ignored."""
    sampler = cfg.get("sampler", "default")
    sampler = "euler" if sampler == "default" else sampler
    if sampler not in SAMPLERS:
      raise ConfigError(f"config.objective.sampler={sampler!r}: the 'rflow' objective offers "
                        f"'default' or one of {SAMPLERS}")
    time_sampling = cfg.get("time_sampling", "uniform")
    if time_sampling not in TIME_SAMPLINGS:
      raise ConfigError(f"config.objective.time_sampling={time_sampling!r}: expected one of "
                        f"{TIME_SAMPLINGS}")
    precond = cfg.get("preconditioning", "none")
    if precond not in PRECONDITIONINGS:
      raise ConfigError(f"config.objective.preconditioning={precond!r}: expected one of "
                        f"{PRECONDITIONINGS}")
    ratio = 1.0
    if cfg.get("time_shift", True):
      if latent_shape is None:
        raise ConfigError("config.objective.time_shift=True needs the diffused tensor's shape; "
                          "build the objective through checkpoints.build_components")
      ratio = shift_ratio(tuple(latent_shape)[:3], int(cfg.get("shift_base_numel", BASE_NUMEL)),
                          float(cfg.get("shift_scale", 1.0)))
    loc, scale = (float(v) for v in cfg.get("logit_normal", (0.0, 1.0)))
    obj = cls(num_train_steps=int(cfg.num_train_steps),
              num_sample_steps=int(cfg.num_sample_steps) or DEFAULT_SAMPLE_STEPS,
              sampler=sampler, time_sampling=time_sampling, logit_normal=(loc, scale),
              ratio=ratio, preconditioning=precond, sigma_data=sigma_data_from_config(cfg),
              loss_kind=check_loss(cfg.get("loss", "default"), "l1"),
              loss_weighting=check_loss_weighting(cfg, precond, LOSS_WEIGHTINGS),
              snr_range=check_snr_range(cfg))
    obj.timesteps()  # validates the step count early.
    return obj

  # ---- training ------------------------------------------------------------------------------
  def sample_time(self, key: jax.Array, batch_size: int) -> jnp.ndarray:
    """Continuous training times `[N]` in [0, T), drawn then shifted."""
    if self.time_sampling == "uniform":
      s = jax.random.uniform(key, (batch_size,))
    else:
      loc, scale = self.logit_normal
      s = jax.nn.sigmoid(loc + scale * jax.random.normal(key, (batch_size,)))
    return shift_time(s * self.num_train_steps, self.ratio, self.num_train_steps)

  def _s(self, t: jnp.ndarray, like: jnp.ndarray) -> jnp.ndarray:
    return bcast(jnp.asarray(t, jnp.float32) / self.num_train_steps, like)

  def corrupt(self, z0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """`z_t = (1 − s) z0 + s noise`, s = t/T; z0, noise `[N, ...]`, t `[N]`."""
    s = self._s(t, z0)
    return (1 - s) * z0 + s * noise

  def target(self, z0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """The velocity `z0 − noise`."""
    del t
    return z0 - noise

  def prediction_from_output(self, out: jnp.ndarray, z_t: jnp.ndarray, t: jnp.ndarray
                             ) -> jnp.ndarray:
    """The network output `F` as a velocity (applies the preconditioning)."""
    if self.preconditioning == "none":
      return out
    s, sd = self._s(t, z_t), sigma_data_array(self.sigma_data, z_t)
    var = (1 - s) ** 2 * sd ** 2 + s ** 2
    return ((1 - s) * sd ** 2 - s) / var * z_t + (sd / jnp.sqrt(var)) * out

  def loss_weight(self, t: jnp.ndarray, like: jnp.ndarray) -> jnp.ndarray | None:
    """'edm': 1/c_out² per (example, channel) — the loss of the network output F against its
    unit-variance target (squared for MSE; for L1 the same factor); 'min_snr': clip(SNR, lo, hi)·s²
    with SNR = ((1 − s)/s)², the x0-space min-SNR weight carried to the velocity
    (x0 = z_t + s·v, so an x0 error is s times a velocity error); 'none': None."""
    if self.loss_weighting == "none":
      return None
    s = self._s(t, like)
    if self.loss_weighting == "min_snr":
      s = jnp.clip(s, 1e-6, 1.0)
      return jnp.clip(((1 - s) / s) ** 2, *self.snr_range) * s ** 2
    sd = sigma_data_array(self.sigma_data, like)
    return ((1 - s) ** 2 * sd ** 2 + s ** 2) / sd ** 2

  def loss(self, prediction: jnp.ndarray, target: jnp.ndarray,
           t: jnp.ndarray | None = None) -> jnp.ndarray:
    """Per-example loss `[N]` (L1 by default, as MAISI), weighted by `loss_weight(t)` when a
    weighting is configured."""
    weight = None if self.loss_weighting == "none" else self.loss_weight(t, target)
    return per_example_loss(prediction, target, self.loss_kind, weight)

  def model_time(self, t: jnp.ndarray) -> jnp.ndarray:
    """The time value fed to the network: t in [0, T], float32."""
    return jnp.asarray(t, jnp.float32)

  # ---- sampling --------------------------------------------------------------------------------
  def timesteps(self) -> np.ndarray:
    """Descending sampler times `[S]` (float64; t = 0 follows the last)."""
    return sampling_times(self.num_train_steps, self.num_sample_steps, self.ratio)

  def velocity(self, model_eval: ModelEval, z: jnp.ndarray, t: jnp.ndarray,
               clip_x0: ClipFn | None = None) -> jnp.ndarray:
    """v̂(z, t) `[N, ...]`; with `clip_x0`, x0̂ = z + s v̂ is clipped and v re-derived (s > 0)."""
    v = self.prediction_from_output(model_eval(z, t), z, t).astype(z.dtype)
    if clip_x0 is None:
      return v
    s = self._s(t, z)
    x0 = clip_x0(z + s * v)
    return jnp.where(s > 0, (x0 - z) / jnp.maximum(s, 1e-12), v)

  def euler_update(self, v: jnp.ndarray, z: jnp.ndarray, t: jnp.ndarray, t_next: jnp.ndarray
                   ) -> jnp.ndarray:
    """`z + v (t − t_next)/T` (MONAI `RFlowScheduler.step`)."""
    return z + v * (self._s(t, z) - self._s(t_next, z))

  def ode_step(self, model_eval: ModelEval, z: jnp.ndarray, t: jnp.ndarray,
               t_next: jnp.ndarray, clip_x0: ClipFn | None = None) -> jnp.ndarray:
    """Euler or Heun z_t → z_{t_next} (t_next < t)."""
    v = self.velocity(model_eval, z, t, clip_x0)
    z_euler = self.euler_update(v, z, t, t_next)
    if self.sampler == "euler":
      return z_euler
    v_next = self.velocity(model_eval, z_euler, t_next, clip_x0)
    return self.euler_update(0.5 * (v + v_next), z, t, t_next)

  def sampler_step(self, model_eval: ModelEval, z: jnp.ndarray, t: jnp.ndarray,
                   t_next: jnp.ndarray, key: jax.Array, clip_x0: ClipFn | None = None
                   ) -> jnp.ndarray:
    """The configured sampler's update (deterministic; `key` unused)."""
    del key
    return self.ode_step(model_eval, z, t, t_next, clip_x0)

  def inversion_step(self, model_eval: ModelEval, z: jnp.ndarray, t: jnp.ndarray,
                     t_next: jnp.ndarray) -> jnp.ndarray:
    """Euler inversion z_t → z_{t_next} (t_next > t), velocity taken at (z_t, t_next)."""
    v = self.velocity(model_eval, z, t_next)
    return z - v * (self._s(t_next, z) - self._s(t, z))

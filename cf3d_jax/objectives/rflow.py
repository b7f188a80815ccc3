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
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from cf3d_jax.errors import ConfigError
from cf3d_jax.objectives.common import (LOSSES, MIN_SNR_GAMMA, ClipFn, ErrorFn, ModelEval, bcast,
                                        check_extra_weights, contrast_settings,
                                        extra_loss_weights,
                                        check_loss_weighting, check_snr_range, choose,
                                        family_default, no_preconditioning, no_weight,
                                        objective_settings, per_example_loss,
                                        sigma_data_array, sigma_data_from_settings)

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


# ---- registries: name → function (resolved once in RectifiedFlow.__post_init__) -------------
def _logit_normal_s(key: jax.Array, batch_size: int, logit_normal: tuple[float, float]):
  loc, scale = logit_normal
  return jax.nn.sigmoid(loc + scale * jax.random.normal(key, (batch_size,)))


# Training s = t/T before the shift: (key, N, logit_normal) → `[N]`.
TIME_SAMPLINGS = {
    "uniform": lambda key, batch_size, logit_normal: jax.random.uniform(key, (batch_size,)),
    "logit-normal": _logit_normal_s,
}


def _skip_preconditioning(obj: "RectifiedFlow", out, z_t, t):
  """`v̂ = c_skip z_t + c_out F` (the optimal linear predictor of v plus the network's part)."""
  s, sd = obj._s(t, z_t), sigma_data_array(obj.sigma_data, z_t)
  var = (1 - s) ** 2 * sd ** 2 + s ** 2
  return ((1 - s) * sd ** 2 - s) / var * z_t + (sd / jnp.sqrt(var)) * out


PRECONDITIONINGS = {"none": no_preconditioning, "skip": _skip_preconditioning}


def _min_snr_weight(obj: "RectifiedFlow", t, like):
  s = jnp.clip(obj._s(t, like), 1e-6, 1.0)
  return jnp.clip(((1 - s) / s) ** 2, *obj.snr_range) * s ** 2


def _edm_weight(obj: "RectifiedFlow", t, like):
  s = obj._s(t, like)
  sd = sigma_data_array(obj.sigma_data, like)
  return ((1 - s) ** 2 * sd ** 2 + s ** 2) / sd ** 2


LOSS_WEIGHTS = {"none": no_weight, "edm": _edm_weight, "min_snr": _min_snr_weight}


@dataclasses.dataclass(frozen=True)
class RectifiedFlow:
  """Rectified flow (velocity prediction) with MONAI's time conventions.

  The string fields name entries of this module's registries; `__post_init__` resolves each
  once (ConfigError naming the key for an unknown name) and the methods call what it chose."""
  num_train_steps: int = 1000
  num_sample_steps: int = DEFAULT_SAMPLE_STEPS
  sampler: str = "euler"                # SAMPLERS
  time_sampling: str = "uniform"        # TIME_SAMPLINGS
  logit_normal: tuple[float, float] = (0.0, 1.0)
  ratio: float = 1.0                    # resolution shift r (1 = none)
  preconditioning: str = "none"         # PRECONDITIONINGS
  sigma_data: float | tuple[float, ...] = 0.5   # scalar, or one std per channel
  loss_kind: str = "l1"                 # common.LOSSES
  loss_weighting: str = "none"          # 'none' | 'edm' (1/c_out²) | 'min_snr' (clip(SNR, lo, hi)·s²)
  snr_range: tuple[float, float] = (0.0, MIN_SNR_GAMMA)  # (lo, hi) of 'min_snr'
  channel_weight_power: float = 0.0    # common.channel_weights: per-channel loss weights
  contrast_weight: float = 0.0         # common.contrast_weight_map: per-position loss weights
  contrast_source: str = "clean"       # ... of the clean z0 or of z_t
  contrast_channels: tuple[int, ...] = ()   # ... summed over these channels (() = all)
  final_time = 0.0
  # Resolved from the names above in __post_init__:
  _ode_step: Callable[..., jnp.ndarray] = dataclasses.field(init=False, repr=False,
                                                            compare=False)
  _draw_s: Callable[..., jnp.ndarray] = dataclasses.field(init=False, repr=False, compare=False)
  _precondition: Callable[..., jnp.ndarray] = dataclasses.field(init=False, repr=False,
                                                                compare=False)
  _error: ErrorFn = dataclasses.field(init=False, repr=False, compare=False)
  _weight: Callable[..., Any] = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    check_extra_weights(self)   # channel and contrast weights: ConfigError early
    resolved = dict(
        _ode_step=choose("sampler", self.sampler, SAMPLERS, family="rflow"),
        _draw_s=choose("time_sampling", self.time_sampling, TIME_SAMPLINGS),
        _precondition=choose("preconditioning", self.preconditioning, PRECONDITIONINGS),
        _error=choose("loss", self.loss_kind, LOSSES),
        _weight=choose("loss_weighting", self.loss_weighting, LOSS_WEIGHTS))
    check_loss_weighting(self.loss_weighting, self.preconditioning)
    for name, value in resolved.items():
      object.__setattr__(self, name, value)

  @classmethod
  def from_config(cls, cfg, latent_shape=None) -> "RectifiedFlow":
    """Builds from `config.objective`; `latent_shape` = (D, H, W, C) of the diffused tensor,
    needed for the resolution shift when `time_shift` is on. Keys used: num_train_steps,
    num_sample_steps (0 = 30), sampler ('default' = 'euler'), time_sampling, logit_normal,
    time_shift, shift_base_numel, shift_scale, preconditioning, sigma_data, loss ('default' =
    'l1'), loss_weighting, snr_range. The DDPM-only keys (betas, prediction, eta, spacing) are
    ignored."""
    o = objective_settings(cfg)
    ratio = 1.0
    if o["time_shift"]:
      if latent_shape is None:
        raise ConfigError("config.objective.time_shift=True needs the diffused tensor's shape; "
                          "build the objective through checkpoints.build_components")
      ratio = shift_ratio(tuple(latent_shape)[:3], int(o["shift_base_numel"]),
                          float(o["shift_scale"]))
    loc, scale = (float(v) for v in o["logit_normal"])
    obj = cls(num_train_steps=int(o["num_train_steps"]),
              num_sample_steps=int(o["num_sample_steps"]) or DEFAULT_SAMPLE_STEPS,
              sampler=family_default(o["sampler"], "euler"), time_sampling=o["time_sampling"],
              logit_normal=(loc, scale), ratio=ratio, preconditioning=o["preconditioning"],
              sigma_data=sigma_data_from_settings(o), loss_kind=family_default(o["loss"], "l1"),
              loss_weighting=o["loss_weighting"], snr_range=check_snr_range(o["snr_range"]),
              channel_weight_power=float(o["channel_weight_power"]),
              **contrast_settings(o))
    obj.timesteps()  # validates the step count early.
    return obj

  # ---- training ------------------------------------------------------------------------------
  def sample_time(self, key: jax.Array, batch_size: int) -> jnp.ndarray:
    """Continuous training times `[N]` in [0, T), drawn then shifted."""
    s = self._draw_s(key, batch_size, self.logit_normal)
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
    return self._precondition(self, out, z_t, t)

  def loss_weight(self, t: jnp.ndarray, like: jnp.ndarray) -> jnp.ndarray | None:
    """'edm': 1/c_out² per (example, channel) — the loss of the network output F against its
    unit-variance target (squared for MSE; for L1 the same factor); 'min_snr': clip(SNR, lo, hi)·s²
    with SNR = ((1 − s)/s)², the x0-space min-SNR weight carried to the velocity
    (x0 = z_t + s·v, so an x0 error is s times a velocity error); 'none': None."""
    return self._weight(self, t, like)

  def loss(self, prediction: jnp.ndarray, target: jnp.ndarray,
           t: jnp.ndarray | None = None, clean: jnp.ndarray | None = None,
           noisy: jnp.ndarray | None = None) -> jnp.ndarray:
    """Per-example loss `[N]` (L1 by default, as MAISI), weighted by `loss_weight(t)` when a
    weighting is configured, by the channel weights, and by `contrast_weight_map` of the clean
    z0 `clean` or of z_t `noisy` (`contrast_source`) when `contrast_weight` > 0."""
    weight = extra_loss_weights(self, self.loss_weight(t, target), target, clean, noisy)
    return per_example_loss(prediction, target, self._error, weight)

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

  def euler_step(self, model_eval: ModelEval, z: jnp.ndarray, t: jnp.ndarray,
                 t_next: jnp.ndarray, clip_x0: ClipFn | None = None) -> jnp.ndarray:
    """Euler z_t → z_{t_next} (t_next < t): one network call."""
    return self.euler_update(self.velocity(model_eval, z, t, clip_x0), z, t, t_next)

  def heun_step(self, model_eval: ModelEval, z: jnp.ndarray, t: jnp.ndarray,
                t_next: jnp.ndarray, clip_x0: ClipFn | None = None) -> jnp.ndarray:
    """Heun z_t → z_{t_next}: the Euler proposal, then the mean of both velocities."""
    v = self.velocity(model_eval, z, t, clip_x0)
    z_euler = self.euler_update(v, z, t, t_next)
    v_next = self.velocity(model_eval, z_euler, t_next, clip_x0)
    return self.euler_update(0.5 * (v + v_next), z, t, t_next)

  def ode_step(self, model_eval: ModelEval, z: jnp.ndarray, t: jnp.ndarray,
               t_next: jnp.ndarray, clip_x0: ClipFn | None = None) -> jnp.ndarray:
    """The configured sampler (Euler or Heun) z_t → z_{t_next} (t_next < t)."""
    return self._ode_step(self, model_eval, z, t, t_next, clip_x0)

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


# The samplers (config.objective.sampler; 'default' = 'euler').
SAMPLERS = {"euler": RectifiedFlow.euler_step, "heun": RectifiedFlow.heun_step}

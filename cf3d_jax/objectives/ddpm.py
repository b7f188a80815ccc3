"""DDPM objective (Ho et al. 2020) with WDM's defaults, and the DDIM sampler (Song et al. 2021).

Pure functions of arrays and keys. Conventions (DESIGN.md §4, as guided-diffusion/wdm-3d):
- integer timesteps t in [0, T); `alpha_bar[t] = prod_{s<=t} (1 - beta_s)`;
  `z_t = sqrt(alpha_bar[t]) z0 + sqrt(1 - alpha_bar[t]) eps`;
- the model sees the raw integer t (as float) and predicts `x0`, `eps` or `v` (config);
- loss = mean squared error over every element (the 8 wavelet subbands weighted equally);
- optional skip preconditioning of an x0 model (`preconditioning='skip'`, as EDM's c_skip/c_out
  in VP form): `x0 = c_skip z_t + c_out F(z_t)` with `c_skip = a σ_d² / (a² σ_d² + s²)` and
  `c_out = σ_d s / sqrt(a² σ_d² + s²)` (a = √ab, s = √(1 − ab), σ_d = `sigma_data`, or one σ_d per channel from
  `sigma_data_channels`: per Haar subband, whose stds differ by up to 4×). The loss is
  still MSE on x0; the network only learns the residual of the optimal linear denoiser, so the
  near-identity at low noise comes for free and small models learn detail far sooner.
  `'none'` (WDM) uses the network output as x0 directly;
- samplers (`config.objective.sampler`): 'ddim' (default; Song et al., eta from config, any step
  count and spacing) and 'ancestral' (Ho et al.'s posterior q(z_{t'} | z_t, x0) on the same
  possibly respaced grid, as diffusers' DDPMScheduler: 'fixed_small' variance
  β̃ = (1 − ᾱ_{t'})/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_{t'}) or 'fixed_large' β = 1 − ᾱ_t/ᾱ_{t'}; 1000 steps =
  the original sampler). At step t → t_prev (t_prev = -1 means alpha_bar = 1) the predicted x0 is
  clipped by the space (wavelet: IDWT → clamp → DWT) and eps re-derived from the clipped x0, as
  guided-diffusion's `ddim_sample` does. No noise is added on the last step (t_prev = -1).
- inversion (`inversion_step`): deterministic DDIM run backwards, t → t_next > t, with the model
  evaluated at (z_t, t_next) — the time the forward step from t_next evaluates at — and
  `z_{t_next} = √ᾱ_{t_next} x0 + √(1 − ᾱ_{t_next}) eps`, `x0 = (z_t − √(1 − ᾱ_t) eps)/√ᾱ_t`
  (diffusers' DDIMInverseScheduler; from t = -1, x0 = z).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cf3d_jax.errors import ConfigError
from cf3d_jax.objectives.common import (LOSSES, MIN_SNR_GAMMA, ClipFn, ErrorFn, ModelEval,
                                        check_extra_weights, contrast_settings,
                                        extra_loss_weights,
                                        check_loss_weighting, check_snr_range, choose,
                                        family_default, no_preconditioning, no_weight,
                                        objective_settings, per_example_loss,
                                        sigma_data_array, sigma_data_from_settings)

DEFAULT_SAMPLE_STEPS = 25   # WDM's DDIM 25


# ---- schedules and sampler grids (registries: name → function) ------------------------------
BETA_SCHEDULES: dict[str, Callable[[int, float, float], np.ndarray]] = {
    "linear": lambda n, start, end: np.linspace(start, end, n, dtype=np.float64),
    "scaled_linear": lambda n, start, end: np.linspace(start ** 0.5, end ** 0.5, n,
                                                       dtype=np.float64) ** 2,
}

SPACINGS: dict[str, Callable[[int, int], np.ndarray]] = {
    "leading": lambda T, n: np.arange(n) * (T // n),
    "trailing": lambda T, n: np.round(np.arange(T, 0, -T / n)) - 1,
    "linspace": lambda T, n: np.round(np.linspace(0, T - 1, n)),
}


def make_betas(schedule: str, num_steps: int, beta_start: float, beta_end: float) -> np.ndarray:
  """Float64 betas `[T]`: 'linear' = linspace(start, end); 'scaled_linear' = linspace(√start, √end)²."""
  return choose("beta_schedule", schedule, BETA_SCHEDULES)(num_steps, beta_start, beta_end)


def sampling_timesteps(num_train_steps: int, num_steps: int, spacing: str) -> np.ndarray:
  """Descending integer timesteps `[num_steps]` visited by the sampler (diffusers' conventions).

  'leading': `arange(n) * (T // n)` (guided-diffusion's "ddimN" respacing: 0, 40, …, 960 for
  T=1000, n=25); 'trailing': `round(arange(T, 0, -T/n)) - 1`; 'linspace': `round(linspace(0, T-1, n))`.
  """
  if not 1 <= num_steps <= num_train_steps:
    raise ConfigError(f"sampler steps {num_steps} must lie in [1, {num_train_steps}]")
  steps = choose("timestep_spacing", spacing, SPACINGS)(num_train_steps, num_steps)
  return np.sort(steps.astype(np.int64))[::-1].copy()


def _gather(values: jnp.ndarray, t: jnp.ndarray, like: jnp.ndarray) -> jnp.ndarray:
  """values[t] broadcast to `like`'s rank: `[N] → [N, 1, 1, 1, 1]`."""
  out = values[t]
  return out.reshape(out.shape + (1,) * (like.ndim - out.ndim)).astype(like.dtype)


# ---- what the network predicts (config.objective.prediction) --------------------------------
class Parameterisation(NamedTuple):
  """One `prediction`: its regression target `(ab, z0, noise, t)` and the conversion of a
  prediction to `(x0, eps)` given `(out, z_t, √ab_t, √(1 − ab_t))`."""
  target: Callable[..., jnp.ndarray]
  x0_and_eps: Callable[..., tuple[jnp.ndarray, jnp.ndarray]]


def _v_target(ab, z0, noise, t):
  return _gather(jnp.sqrt(ab), t, z0) * noise - _gather(jnp.sqrt(1 - ab), t, z0) * z0


PREDICTIONS: dict[str, Parameterisation] = {
    "x0": Parameterisation(lambda ab, z0, noise, t: z0,
                           lambda out, z_t, sa, s1: (out, (z_t - sa * out) / s1)),
    "eps": Parameterisation(lambda ab, z0, noise, t: noise,
                            lambda out, z_t, sa, s1: ((z_t - s1 * out) / sa, out)),
    "v": Parameterisation(_v_target,
                          lambda out, z_t, sa, s1: (sa * z_t - s1 * out, s1 * z_t + sa * out)),
}


# ---- preconditioning, loss weighting, ancestral variance (functions of the objective) -------
def _skip_preconditioning(obj: "DDPM", out, z_t, t):
  """`x0 = c_skip z_t + c_out F` (the optimal linear denoiser plus the network's residual)."""
  ab = jnp.asarray(obj.alpha_bar, jnp.float32)
  a, s = _gather(jnp.sqrt(ab), t, z_t), _gather(jnp.sqrt(1 - ab), t, z_t)
  sd = sigma_data_array(obj.sigma_data, z_t)
  var = a ** 2 * sd ** 2 + s ** 2
  return (a * sd ** 2 / var) * z_t + (sd * s / jnp.sqrt(var)) * out


PRECONDITIONINGS = {"none": no_preconditioning, "skip": _skip_preconditioning}


def _min_snr_weight(obj: "DDPM", t, like):
  ab = jnp.asarray(obj.alpha_bar, jnp.float32)
  a, s = _gather(jnp.sqrt(ab), t, like), _gather(jnp.sqrt(1 - ab), t, like)
  return jnp.clip(a ** 2 / s ** 2, *obj.snr_range)


def _edm_weight(obj: "DDPM", t, like):
  ab = jnp.asarray(obj.alpha_bar, jnp.float32)
  a, s = _gather(jnp.sqrt(ab), t, like), _gather(jnp.sqrt(1 - ab), t, like)
  sd = sigma_data_array(obj.sigma_data, like)
  return (a ** 2 * sd ** 2 + s ** 2) / (sd * s) ** 2


LOSS_WEIGHTS = {"none": no_weight, "edm": _edm_weight, "min_snr": _min_snr_weight}


def _logit_normal_t(key: jax.Array, batch_size: int, num_train_steps: int,
                    logit_normal: tuple[float, float]) -> jnp.ndarray:
  """`floor(T · sigmoid(loc + scale·n))` `[N]` int32 in [0, T)."""
  loc, scale = logit_normal
  s = jax.nn.sigmoid(loc + scale * jax.random.normal(key, (batch_size,)))
  return jnp.clip(jnp.floor(s * num_train_steps), 0, num_train_steps - 1).astype(jnp.int32)


# Training timesteps: (key, N, T, logit_normal) → `[N]` int32 in [0, T).
TIME_SAMPLINGS = {
    "uniform": lambda key, batch_size, num_train_steps, logit_normal: jax.random.randint(
        key, (batch_size,), 0, num_train_steps),
    "logit-normal": _logit_normal_t,
}

# Variance of the ancestral step from (ᾱ_t, ᾱ', β) (see `DDPM.posterior`).
VARIANCES = {
    "fixed_small": lambda ab_t, ab_prev, beta: (1 - ab_prev) / (1 - ab_t) * beta,
    "fixed_large": lambda ab_t, ab_prev, beta: beta,
}


@dataclasses.dataclass(frozen=True)
class DDPM:
  """Discrete-time diffusion: training corruption, regression target, DDIM sampling step.

  The string fields name entries of this module's registries; `__post_init__` resolves each
  once (ConfigError naming the key for an unknown name) and the methods call what it chose."""
  betas: np.ndarray                     # float64 [T]
  prediction: str = "x0"                # PREDICTIONS
  num_sample_steps: int = 25
  eta: float = 0.0
  timestep_spacing: str = "leading"     # SPACINGS
  preconditioning: str = "none"         # PRECONDITIONINGS
  sigma_data: float | tuple[float, ...] = 0.5   # scalar, or one std per channel
  sampler: str = "ddim"                 # SAMPLERS
  ancestral_variance: str = "fixed_small"  # VARIANCES
  loss_kind: str = "mse"                # common.LOSSES
  loss_weighting: str = "none"          # 'none' | 'edm' (1/c_out²) | 'min_snr' (x0: clip(SNR, lo, hi))
  snr_range: tuple[float, float] = (0.0, MIN_SNR_GAMMA)  # (lo, hi) of 'min_snr'
  channel_weight_power: float = 0.0    # common.channel_weights: per-channel loss weights
  contrast_weight: float = 0.0         # common.contrast_weight_map: per-position loss weights
  contrast_source: str = "clean"       # ... of the clean z0 or of z_t
  contrast_channels: tuple[int, ...] = ()   # ... summed over these channels (() = all)
  time_sampling: str = "uniform"        # TIME_SAMPLINGS: training timesteps
  logit_normal: tuple[float, float] = (0.0, 1.0)   # (loc, scale) of 'logit-normal'
  final_time = -1                       # the 'clean' end of the sampler grid (alpha_bar = 1)
  # Resolved from the names above in __post_init__:
  _param: Parameterisation = dataclasses.field(init=False, repr=False, compare=False)
  _precondition: Callable[..., jnp.ndarray] = dataclasses.field(init=False, repr=False,
                                                                compare=False)
  _sampler_step: Callable[..., jnp.ndarray] = dataclasses.field(init=False, repr=False,
                                                                compare=False)
  _variance: Callable[..., jnp.ndarray] = dataclasses.field(init=False, repr=False, compare=False)
  _error: ErrorFn = dataclasses.field(init=False, repr=False, compare=False)
  _weight: Callable[..., Any] = dataclasses.field(init=False, repr=False, compare=False)
  _draw_time: Callable[..., jnp.ndarray] = dataclasses.field(init=False, repr=False,
                                                             compare=False)

  def __post_init__(self):
    check_extra_weights(self)   # channel and contrast weights: ConfigError early
    resolved = dict(
        _param=choose("prediction", self.prediction, PREDICTIONS),
        _precondition=choose("preconditioning", self.preconditioning, PRECONDITIONINGS),
        _sampler_step=choose("sampler", self.sampler, SAMPLERS, family="ddpm"),
        _variance=choose("ancestral_variance", self.ancestral_variance, VARIANCES),
        _error=choose("loss", self.loss_kind, LOSSES),
        _weight=choose("loss_weighting", self.loss_weighting, LOSS_WEIGHTS),
        _draw_time=choose("time_sampling", self.time_sampling, TIME_SAMPLINGS))
    if self.preconditioning == "skip" and self.prediction != "x0":
      raise ConfigError("config.objective.preconditioning='skip' needs "
                        f"config.objective.prediction='x0', got {self.prediction!r}")
    check_loss_weighting(self.loss_weighting, self.preconditioning)
    if self.loss_weighting == "min_snr" and self.prediction != "x0":
      raise ConfigError("config.objective.loss_weighting='min_snr' is implemented for "
                        f"prediction='x0'; got {self.prediction!r}")
    for name, value in resolved.items():
      object.__setattr__(self, name, value)

  @classmethod
  def from_config(cls, cfg, latent_shape=None) -> "DDPM":
    """Builds from `config.objective` (keys: num_train_steps, beta_schedule, beta_start,
    beta_end, prediction, num_sample_steps (0 = 25), eta, timestep_spacing, preconditioning,
    sigma_data or sigma_data_channels, sampler ('default' = 'ddim'), ancestral_variance, loss
    ('default' = 'mse'), loss_weighting, snr_range, time_sampling, logit_normal). `latent_shape` is unused (the rectified
    flow's time shift needs it)."""
    del latent_shape
    o = objective_settings(cfg)
    obj = cls(betas=make_betas(o["beta_schedule"], o["num_train_steps"], o["beta_start"],
                               o["beta_end"]),
              prediction=o["prediction"],
              num_sample_steps=int(o["num_sample_steps"]) or DEFAULT_SAMPLE_STEPS,
              eta=o["eta"], timestep_spacing=o["timestep_spacing"],
              preconditioning=o["preconditioning"], sigma_data=sigma_data_from_settings(o),
              sampler=family_default(o["sampler"], "ddim"),
              ancestral_variance=o["ancestral_variance"],
              loss_kind=family_default(o["loss"], "mse"), loss_weighting=o["loss_weighting"],
              snr_range=check_snr_range(o["snr_range"]),
              channel_weight_power=float(o["channel_weight_power"]),
              **contrast_settings(o),
              time_sampling=o["time_sampling"],
              logit_normal=tuple(float(v) for v in o["logit_normal"]))
    obj.timesteps()  # validates steps and spacing early.
    return obj

  @property
  def num_train_steps(self) -> int:
    return int(self.betas.shape[0])

  @property
  def alpha_bar(self) -> np.ndarray:
    """Float64 `[T]` cumulative product of (1 - beta)."""
    return np.cumprod(1.0 - self.betas)

  def sample_time(self, key: jax.Array, batch_size: int) -> jnp.ndarray:
    """Integer training timesteps `[N]` in [0, T): uniform (WDM, MAISI), or `floor(T s)` with
    s = sigmoid(loc + scale·n), n ~ N(0, 1) ('logit-normal': loc < 0 trains the low-noise end,
    where the fine detail is drawn, more often)."""
    return self._draw_time(key, batch_size, self.num_train_steps, self.logit_normal)

  def corrupt(self, z0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """`z_t = sqrt(ab_t) z0 + sqrt(1 - ab_t) noise`; z0, noise `[N, ...]`, t `[N]`."""
    ab = jnp.asarray(self.alpha_bar, jnp.float32)
    return _gather(jnp.sqrt(ab), t, z0) * z0 + _gather(jnp.sqrt(1 - ab), t, z0) * noise

  def target(self, z0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """What the network regresses: x0, eps, or `v = sqrt(ab) eps - sqrt(1-ab) x0`."""
    return self._param.target(jnp.asarray(self.alpha_bar, jnp.float32), z0, noise, t)

  def prediction_from_output(self, out: jnp.ndarray, z_t: jnp.ndarray, t: jnp.ndarray
                             ) -> jnp.ndarray:
    """The network output `F` as a prediction of `target` (applies the preconditioning)."""
    return self._precondition(self, out, z_t, t)

  def loss_weight(self, t: jnp.ndarray, like: jnp.ndarray) -> jnp.ndarray | None:
    """Per-(example, channel) loss weight at timesteps t `[N]`, broadcasting against `like`:
    'edm' = 1/c_out² (the loss becomes the MSE of the network output F against its unit-variance
    target, per channel: every noise level and every subband counts alike); 'min_snr' =
    clip(SNR_t, lo, hi) for x0 prediction, `snr_range` (lo, hi): (0, 5) is Hang et al. 2023's
    min-SNR-5; lo = 1 also keeps the high-noise steps at weight ≥ 1 (Salimans & Ho 2022's truncated
    SNR; measured at demo size, it weakened the prompt effect); 'none' = None."""
    return self._weight(self, t, like)

  def loss(self, prediction: jnp.ndarray, target: jnp.ndarray,
           t: jnp.ndarray | None = None, clean: jnp.ndarray | None = None,
           noisy: jnp.ndarray | None = None) -> jnp.ndarray:
    """Per-example loss `[N]` (MSE by default) over all remaining axes, weighted by
    `loss_weight(t)` when a weighting is configured (then t `[N]` is required), by the channel
    weights, and by `contrast_weight_map` of the clean z0 `clean` or of z_t `noisy`
    (`contrast_source`) when `contrast_weight` > 0."""
    weight = extra_loss_weights(self, self.loss_weight(t, target), target, clean, noisy)
    return per_example_loss(prediction, target, self._error, weight)

  def model_time(self, t: jnp.ndarray) -> jnp.ndarray:
    """The time value fed to the network: the raw integer timestep, as float32."""
    return t.astype(jnp.float32)

  def timesteps(self) -> np.ndarray:
    """Descending sampler timesteps `[S]`."""
    return sampling_timesteps(self.num_train_steps, self.num_sample_steps, self.timestep_spacing)

  def x0_and_eps(self, model_out: jnp.ndarray, z_t: jnp.ndarray, t: jnp.ndarray
                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Converts the network output to (x0, eps) at integer timesteps t `[N]`."""
    model_out = self.prediction_from_output(model_out, z_t, t)
    ab = jnp.asarray(self.alpha_bar, jnp.float32)
    sa, s1 = _gather(jnp.sqrt(ab), t, z_t), _gather(jnp.sqrt(1 - ab), t, z_t)
    return self._param.x0_and_eps(model_out, z_t, sa, s1)

  def ddim_step(self, model_out: jnp.ndarray, z_t: jnp.ndarray, t: jnp.ndarray,
                t_prev: jnp.ndarray, key: jax.Array,
                clip_x0: Callable[[jnp.ndarray], jnp.ndarray] | None = None) -> jnp.ndarray:
    """One DDIM update z_t → z_{t_prev}; t, t_prev `[N]` ints (t_prev < 0 means alpha_bar = 1).

    `x0` is clipped by `clip_x0` (if given) and eps re-derived from it; with eta > 0 fresh
    noise from `key` is added (never at the final step).
    """
    mean, sigma = self.ddim_mean_sigma(model_out, z_t, t, t_prev, self.eta, clip_x0)
    if self.eta == 0.0:
      return mean
    noise = jax.random.normal(key, z_t.shape, z_t.dtype)
    return mean + sigma * noise

  def ddim_mean_sigma(self, model_out: jnp.ndarray, z_t: jnp.ndarray, t: jnp.ndarray,
                      t_prev: jnp.ndarray, eta: float,
                      clip_x0: Callable[[jnp.ndarray], jnp.ndarray] | None = None
                      ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Mean `[N, ...]` and noise scale σ `[N, 1, ...]` of the DDIM update z_t → z_{t_prev} at
    `eta` (Song et al. 2021, eq. 12; η = 1 is DDPM's posterior with the 'fixed_small'
    variance); x0 clipped by `clip_x0` and eps re-derived from it. σ = 0 on the last step."""
    x0, _ = self.x0_and_eps(model_out, z_t, t)
    if clip_x0 is not None:
      x0 = clip_x0(x0)
    ab = jnp.asarray(self.alpha_bar, jnp.float32)
    ab_t = _gather(ab, t, z_t)
    has_prev = (t_prev >= 0).reshape(t_prev.shape + (1,) * (z_t.ndim - 1))
    ab_prev = jnp.where(has_prev, _gather(ab, jnp.maximum(t_prev, 0), z_t), 1.0)
    eps = (z_t - jnp.sqrt(ab_t) * x0) / jnp.sqrt(1 - ab_t)
    sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab_t)) * jnp.sqrt(1 - ab_t / ab_prev)
    mean = jnp.sqrt(ab_prev) * x0 + jnp.sqrt(jnp.maximum(1 - ab_prev - sigma ** 2, 0.0)) * eps
    return mean, sigma

  def stochastic_mean(self, model_eval: ModelEval, z_t: jnp.ndarray, t: jnp.ndarray,
                      t_prev: jnp.ndarray, clip_x0: ClipFn | None = None) -> jnp.ndarray:
    """The mean of the stochastic (η = 1, DDPM) update z_t → z_{t_prev} (one network call):
    what edit-friendly inversion (`guidance.edit_friendly_inversion`) measures its noise maps
    against."""
    return self.ddim_mean_sigma(model_eval(z_t, t), z_t, t, t_prev, 1.0, clip_x0)[0]

  def posterior(self, x0: jnp.ndarray, z_t: jnp.ndarray, t: jnp.ndarray, t_prev: jnp.ndarray
                ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Mean and variance of q(z_{t_prev} | z_t, x0) on a respaced grid (diffusers' DDPMScheduler).

    With ᾱ' = ᾱ_{t_prev} (1 if t_prev < 0), α = ᾱ_t/ᾱ', β = 1 − α: mean =
    √ᾱ' β/(1 − ᾱ_t) x0 + √α (1 − ᾱ')/(1 − ᾱ_t) z_t; variance 'fixed_small' (1 − ᾱ')/(1 − ᾱ_t) β
    or 'fixed_large' β, and 0 on the last step.
    """
    ab = jnp.asarray(self.alpha_bar, jnp.float32)
    ab_t = _gather(ab, t, z_t)
    has_prev = (t_prev >= 0).reshape(t_prev.shape + (1,) * (z_t.ndim - 1))
    ab_prev = jnp.where(has_prev, _gather(ab, jnp.maximum(t_prev, 0), z_t), 1.0)
    alpha = ab_t / ab_prev
    beta = 1.0 - alpha
    mean = (jnp.sqrt(ab_prev) * beta / (1 - ab_t)) * x0 + \
        (jnp.sqrt(alpha) * (1 - ab_prev) / (1 - ab_t)) * z_t
    var = self._variance(ab_t, ab_prev, beta)
    return mean, jnp.where(has_prev, jnp.maximum(var, 1e-20), 0.0)

  def ancestral_step(self, model_out: jnp.ndarray, z_t: jnp.ndarray, t: jnp.ndarray,
                     t_prev: jnp.ndarray, key: jax.Array, clip_x0: ClipFn | None = None
                     ) -> jnp.ndarray:
    """One ancestral DDPM update z_t → z_{t_prev} ~ q(· | z_t, x0̂) (x0̂ clipped by `clip_x0`)."""
    x0, _ = self.x0_and_eps(model_out, z_t, t)
    if clip_x0 is not None:
      x0 = clip_x0(x0)
    mean, var = self.posterior(x0, z_t, t, t_prev)
    return mean + jnp.sqrt(var) * jax.random.normal(key, z_t.shape, z_t.dtype)

  def sampler_step(self, model_eval: ModelEval, z_t: jnp.ndarray, t: jnp.ndarray,
                   t_prev: jnp.ndarray, key: jax.Array, clip_x0: ClipFn | None = None
                   ) -> jnp.ndarray:
    """The configured sampler's update z_t → z_{t_prev} (one network call)."""
    return self._sampler_step(self, model_eval(z_t, t), z_t, t, t_prev, key, clip_x0)

  def ode_step(self, model_eval: ModelEval, z_t: jnp.ndarray, t: jnp.ndarray,
               t_prev: jnp.ndarray, clip_x0: ClipFn | None = None) -> jnp.ndarray:
    """Deterministic DDIM (eta = 0) z_t → z_{t_prev}: the map that inversion undoes."""
    return dataclasses.replace(self, eta=0.0).ddim_step(model_eval(z_t, t), z_t, t, t_prev,
                                                        jax.random.key(0), clip_x0)

  def inversion_step(self, model_eval: ModelEval, z: jnp.ndarray, t: jnp.ndarray,
                     t_next: jnp.ndarray) -> jnp.ndarray:
    """DDIM inversion z_t → z_{t_next} (t_next > t; t = -1 is the clean end)."""
    _, eps = self.x0_and_eps(model_eval(z, t_next), z, t_next)
    ab = jnp.asarray(self.alpha_bar, jnp.float32)
    has_t = (t >= 0).reshape(t.shape + (1,) * (z.ndim - 1))
    ab_t = jnp.where(has_t, _gather(ab, jnp.maximum(t, 0), z), 1.0)
    ab_n = _gather(ab, t_next, z)
    x0 = (z - jnp.sqrt(1 - ab_t) * eps) / jnp.sqrt(ab_t)
    return jnp.sqrt(ab_n) * x0 + jnp.sqrt(1 - ab_n) * eps


# The samplers (config.objective.sampler; 'default' = 'ddim'): one update from the network output.
SAMPLERS = {"ddim": DDPM.ddim_step, "ancestral": DDPM.ancestral_step}

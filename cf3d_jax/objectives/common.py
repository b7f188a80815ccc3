"""Pieces every objective shares: per-example losses, loss weightings, broadcasting, the
model-call type, and the one reading of `config.objective` (`objective_settings`, `choose`).

`ModelEval(z [N, ...], t [N]) -> raw network output [N, ...]` is the network with the text (and
guidance) already bound and `t` in the objective's own time units; objectives turn the raw output
into predictions themselves (`prediction_from_output`), so preconditioning and guidance compose.

String options are resolved once, when an objective is built: `choose` looks a name up in the
registry of the option (a dict name → function) and the objective keeps the function, so no
method branches on a name.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from cf3d_jax.errors import ConfigError

ModelEval = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
ClipFn = Callable[[jnp.ndarray], jnp.ndarray]
ErrorFn = Callable[[jnp.ndarray], jnp.ndarray]
T = TypeVar("T")

MIN_SNR_GAMMA = 5.0   # Hang et al. 2023's γ

# The per-element error of each `config.objective.loss`.
LOSSES: dict[str, ErrorFn] = {"mse": jnp.square, "l1": jnp.abs}
LOSS_WEIGHTINGS = ("none", "edm", "min_snr")

# The one place `config.objective` keys may be missing: objective sections written by hand
# (tests, notebooks, direct `make_objective` callers) and configs recorded before a key existed
# lack the later keys. Each takes the value the objectives had before the key existed (sigma_data
# 0.5, not base_config's 0.3, for that reason). Sections built by `config_base.base_config` have
# every key, so for them these are never used.
OBJECTIVE_FALLBACKS: dict[str, Any] = {
    "num_sample_steps": 0, "sampler": "default", "loss": "default", "preconditioning": "none",
    "sigma_data": 0.5, "sigma_data_channels": (), "loss_weighting": "none",
    "snr_range": (0.0, MIN_SNR_GAMMA), "ancestral_variance": "fixed_small",
    "channel_weight_power": 0.0, "contrast_weight": 0.0, "contrast_source": "clean",
    "contrast_channels": (),
    "eta": 0.0, "timestep_spacing": "leading",
    "time_sampling": "uniform", "logit_normal": (0.0, 1.0), "time_shift": True,
    "shift_base_numel": 32 ** 3, "shift_scale": 1.0,
}


def objective_settings(cfg) -> dict[str, Any]:
  """`config.objective` (a ConfigDict or mapping) as a plain dict holding every key the
  objectives read: the section's own values over `OBJECTIVE_FALLBACKS`."""
  values = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  return {**OBJECTIVE_FALLBACKS, **values}


def choose(key: str, value: str, registry: Mapping[str, T], family: str = "") -> T:
  """`registry[value]`; ConfigError naming `config.objective.<key>` for a name it lacks
  (`family`: the objective, for options whose names differ between objectives)."""
  if value not in registry:
    offer = (f"the {family!r} objective offers 'default' or one of {tuple(registry)}" if family
             else f"expected one of {tuple(registry)}")
    raise ConfigError(f"config.objective.{key}={value!r}: {offer}")
  return registry[value]


def family_default(value: str, default: str) -> str:
  """'default' → the objective family's own choice (sampler, loss)."""
  return default if value == "default" else value


def no_preconditioning(obj, out: jnp.ndarray, z_t: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
  """preconditioning='none': the network output is the prediction."""
  return out


def no_weight(obj, t: jnp.ndarray | None, like: jnp.ndarray) -> None:
  """loss_weighting='none': no weight (t may be None)."""
  return None


def per_example_loss(prediction: jnp.ndarray, target: jnp.ndarray, error_fn: ErrorFn,
                     weight: jnp.ndarray | None = None) -> jnp.ndarray:
  """Mean of `error_fn(prediction − target)` (`LOSSES`: squared or absolute) over all but the
  batch axis → `[N]`; `weight` (broadcasting against the error, e.g. `[N, 1, 1, 1, C]`)
  multiplies it first."""
  err = error_fn(prediction.astype(jnp.float32) - target.astype(jnp.float32))
  if weight is not None:
    err = err * weight
  return jnp.mean(err.reshape(err.shape[0], -1), axis=1)


def check_loss_weighting(weighting: str, preconditioning: str) -> str:
  """`config.objective.loss_weighting` among LOSS_WEIGHTINGS; 'edm' needs skip
  preconditioning (ConfigError otherwise)."""
  choose("loss_weighting", weighting, dict.fromkeys(LOSS_WEIGHTINGS))
  if weighting == "edm" and preconditioning != "skip":
    raise ConfigError("config.objective.loss_weighting='edm' weights the loss by 1/c_out² of the "
                      "skip preconditioning; set config.objective.preconditioning='skip'")
  return weighting


def check_snr_range(value) -> tuple[float, float]:
  """`config.objective.snr_range` (lo, hi) of the 'min_snr' weighting: 0 ≤ lo ≤ hi."""
  value = tuple(float(v) for v in value)
  if len(value) != 2 or not 0.0 <= value[0] <= value[1]:
    raise ConfigError(f"config.objective.snr_range={value!r}: expected (lo, hi) with 0 <= lo <= hi")
  return value


def sigma_data_from_settings(settings: Mapping[str, Any]) -> float | tuple[float, ...]:
  """`sigma_data_channels` (one std per channel of the diffused tensor, e.g. per Haar subband)
  when set, else the scalar `sigma_data` (their ranges: `config_ranges.RANGES`)."""
  channels = tuple(float(v) for v in settings["sigma_data_channels"])
  return channels or float(settings["sigma_data"])


def sigma_data_array(sigma_data: float | tuple[float, ...], like: jnp.ndarray) -> jnp.ndarray:
  """The data std as an array broadcasting against `like` `[N, ..., C]`: a scalar, or `[C]`
  along the channel axis (ConfigError if its length is not C)."""
  sd = jnp.asarray(sigma_data, jnp.float32)
  if sd.ndim and sd.shape[0] != like.shape[-1]:
    raise ConfigError(f"config.objective.sigma_data_channels has {sd.shape[0]} values; the "
                      f"diffused tensor has {like.shape[-1]} channels")
  return sd


def channel_weights(sigma_data: float | tuple[float, ...], power: float
                    ) -> tuple[float, ...] | None:
  """`config.objective.channel_weight_power` p → one loss weight per diffused channel,
  `(max σ / σ_c)^p` with σ_c the per-channel data stds (`sigma_data_channels`): 1 for the
  widest channel, more for the quieter ones (p = 2: each channel's error measured against its
  own scale). None for p = 0. ConfigError for p > 0 without per-channel stds."""
  if power < 0:
    raise ConfigError(f"config.objective.channel_weight_power={power}: expected a number >= 0")
  if power == 0:
    return None
  sd = np.atleast_1d(np.asarray(sigma_data, np.float64))
  if sd.size < 2:
    raise ConfigError(f"config.objective.channel_weight_power={power} weights each channel by its "
                      "data std: set config.objective.sigma_data_channels (one std per channel; "
                      "python -m cf3d_jax.data.channel_stats measures them)")
  return tuple(float(w) for w in (sd.max() / sd) ** power)


def with_channel_weights(weight: jnp.ndarray | None, sigma_data: float | tuple[float, ...],
                         power: float, like: jnp.ndarray) -> jnp.ndarray | None:
  """`weight` (None or broadcasting against `like` `[N, ..., C]`) times the per-channel
  weights `[C]` of `channel_weights(sigma_data, power)` (power 0 = unchanged); ConfigError if
  their count is not C."""
  channel = channel_weights(sigma_data, power)
  if channel is None:
    return weight
  if len(channel) != like.shape[-1]:
    raise ConfigError(f"config.objective.channel_weight_power: sigma_data_channels has "
                      f"{len(channel)} values; the diffused tensor has {like.shape[-1]} channels")
  cw = jnp.asarray(channel, jnp.float32)
  return cw if weight is None else weight * cw


def contrast_weight_map(target: jnp.ndarray, sigma_data: float | tuple[float, ...],
                        strength: float, channels: tuple[int, ...] = ()) -> jnp.ndarray | None:
  """`config.objective.contrast_weight` λ → a per-position loss weight `[N, ..., 1]` from the
  clean target `[N, *spatial, C]`: `(1 + λ c / mean(c)) / (1 + λ)` (mean 1), with
  `c(p) = Σ_ch ((x_ch(p) − box3(x_ch)(p)) / σ_ch)²` the target's local contrast (its deviation
  from the 3^d box mean around p, per channel in units of that channel's data std), the mean
  over each example's positions; `channels` (indices; () = all) limits the sum Σ_ch (e.g. (0,):
  the Haar LLL subband alone, blobs and edges without the voxel-level detail). Small bright
  structures (lesions, edges) weigh more; flat tissue stays at about 1. The map is a constant of
  the target (no gradient). None for λ = 0."""
  if strength == 0:
    return None
  x = jax.lax.stop_gradient(target.astype(jnp.float32))
  sd = jnp.asarray(sigma_data, jnp.float32)
  nd = x.ndim - 2
  window = (1,) + (3,) * nd + (1,)
  local = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, (1,) * x.ndim, "SAME")
  count = jax.lax.reduce_window(jnp.ones_like(x[:1, ..., :1]), 0.0, jax.lax.add, window,
                                (1,) * x.ndim, "SAME")
  dev = jnp.square((x - local / count) / sd)
  if channels:
    dev = dev[..., jnp.asarray(channels)]
  c = jnp.sum(dev, axis=-1, keepdims=True)
  mean = jnp.mean(c, axis=tuple(range(1, x.ndim)), keepdims=True)
  return (1.0 + strength * c / jnp.maximum(mean, 1e-12)) / (1.0 + strength)


def check_contrast_weight(strength: float) -> float:
  """`config.objective.contrast_weight` λ ≥ 0."""
  if not strength >= 0:
    raise ConfigError(f"config.objective.contrast_weight={strength}: expected a number >= 0")
  return float(strength)


CONTRAST_SOURCES = ("clean", "noisy")


def check_contrast_source(source: str) -> str:
  """`config.objective.contrast_source`: 'clean' (the target z0: the optimum tilts toward
  contrast) or 'noisy' (z_t, which the network sees: the optimum is unchanged, only where the
  model's capacity goes)."""
  return choose("contrast_source", source, dict.fromkeys(CONTRAST_SOURCES))


def with_contrast_weights(weight: jnp.ndarray | None, clean: jnp.ndarray | None,
                          noisy: jnp.ndarray | None, sigma_data: float | tuple[float, ...],
                          strength: float, source: str, channels: tuple[int, ...] = ()
                          ) -> jnp.ndarray | None:
  """`weight` (None or broadcasting against z0 `[N, ..., C]`) times `contrast_weight_map` of the
  clean z0 (source 'clean') or of z_t (source 'noisy'); λ = 0: unchanged. ValueError when
  λ > 0 and that tensor is not given."""
  if strength == 0:
    return weight
  x = clean if source == "clean" else noisy
  if x is None:
    raise ValueError(f"objective.loss: config.objective.contrast_weight > 0 weighs each position "
                     f"by the local contrast of the {source} volume; pass "
                     f"{'clean=z0' if source == 'clean' else 'noisy=z_t'}")
  if channels and max(channels) >= x.shape[-1] or min(channels, default=0) < 0:
    raise ConfigError(f"config.objective.contrast_channels={tuple(channels)}: the diffused "
                      f"tensor has {x.shape[-1]} channels")
  spatial = contrast_weight_map(x, sigma_data, strength, tuple(channels))
  return spatial if weight is None else weight * spatial


def contrast_settings(o: Mapping[str, Any]) -> dict[str, Any]:
  """The contrast-weight fields of an objective from `objective_settings(cfg)` (checked by the
  objective's `__post_init__` through `check_extra_weights`)."""
  return dict(contrast_weight=float(o["contrast_weight"]), contrast_source=o["contrast_source"],
              contrast_channels=tuple(int(c) for c in o["contrast_channels"]))


def check_extra_weights(obj) -> None:
  """ConfigError early for an objective's bad per-channel or contrast weight settings."""
  channel_weights(obj.sigma_data, obj.channel_weight_power)
  check_contrast_weight(obj.contrast_weight)
  check_contrast_source(obj.contrast_source)


def extra_loss_weights(obj, weight: jnp.ndarray | None, like: jnp.ndarray,
                       clean: jnp.ndarray | None, noisy: jnp.ndarray | None
                       ) -> jnp.ndarray | None:
  """`weight` (an objective's noise-level weight, or None) times its per-channel weights
  (`channel_weight_power`) and its per-position contrast weights (`contrast_weight`), as the
  DDPM and rectified-flow losses apply them; `like` is the target `[N, ..., C]`."""
  weight = with_channel_weights(weight, obj.sigma_data, obj.channel_weight_power, like)
  return with_contrast_weights(weight, clean, noisy, obj.sigma_data, obj.contrast_weight,
                               obj.contrast_source, obj.contrast_channels)


def bcast(values: jnp.ndarray, like: jnp.ndarray) -> jnp.ndarray:
  """`[N]` → `[N, 1, …, 1]` with like's rank and dtype."""
  return values.reshape(values.shape + (1,) * (like.ndim - values.ndim)).astype(like.dtype)

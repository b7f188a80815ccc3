"""Training objectives and samplers, chosen by `config.objective.name`.

Every objective (`ddpm.DDPM`, `rflow.RectifiedFlow`) exposes the same members (the `Objective`
protocol), so the trainer and the sampler never branch on the name:
  training   `sample_time(key, n) → t [N]`, `corrupt(z0, noise, t) → z_t`,
             `target(z0, noise, t)`, `prediction_from_output(out, z_t, t)`, `loss(pred, target) → [N]`,
             `model_time(t)` (what the network sees);
  sampling   `timesteps()` (descending grid), `final_time` (the clean end),
             `sampler_step(model_eval, z, t, t_next, key, clip_x0)` (the configured sampler),
             `ode_step(model_eval, z, t, t_next, clip_x0)` (its deterministic ODE form),
             `inversion_step(model_eval, z, t, t_next)` (one step of the ODE run backwards),
where `model_eval(z, t)` is the (guided) network with the text bound (`guidance.sample_loop`).
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from cf3d_jax.config_ranges import check_section
from cf3d_jax.errors import ConfigError
from cf3d_jax.objectives import ddpm, rflow
from cf3d_jax.objectives.common import ClipFn, ModelEval, objective_settings


class Objective(Protocol):
  """A training objective and its sampler (`ddpm.DDPM`, `rflow.RectifiedFlow`): the members the
  trainer and the sampler call. z `[N, ...]`; t `[N]` in the objective's own time units."""
  num_train_steps: int          # T: times live in [0, T)
  final_time: float             # the clean end of the sampler grid (DDPM -1, rectified flow 0)

  # ---- training ----
  def sample_time(self, key: jax.Array, batch_size: int) -> jnp.ndarray:
    """Training times `[N]`."""

  def corrupt(self, z0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """z_t `[N, ...]` from clean z0 and noise `[N, ...]` at t `[N]`."""

  def target(self, z0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """What the network regresses `[N, ...]`."""

  def prediction_from_output(self, out: jnp.ndarray, z_t: jnp.ndarray, t: jnp.ndarray
                             ) -> jnp.ndarray:
    """The network output `[N, ...]` as a prediction of `target` (the preconditioning)."""

  def loss(self, prediction: jnp.ndarray, target: jnp.ndarray,
           t: jnp.ndarray | None = None, clean: jnp.ndarray | None = None,
           noisy: jnp.ndarray | None = None) -> jnp.ndarray:
    """Per-example loss `[N]` (t `[N]` needed when a loss weighting is configured; the clean
    z0 and/or z_t `[N, ...]` when `contrast_weight` > 0)."""

  def model_time(self, t: jnp.ndarray) -> jnp.ndarray:
    """The time value the network sees, float32 `[N]`."""

  # ---- sampling ----
  def timesteps(self) -> np.ndarray:
    """The sampler's descending time grid `[S]` (`final_time` follows the last)."""

  def sampler_step(self, model_eval: ModelEval, z: jnp.ndarray, t: jnp.ndarray,
                   t_next: jnp.ndarray, key: jax.Array, clip_x0: ClipFn | None = None
                   ) -> jnp.ndarray:
    """The configured sampler's update z_t → z_{t_next} (t_next < t)."""

  def ode_step(self, model_eval: ModelEval, z: jnp.ndarray, t: jnp.ndarray,
               t_next: jnp.ndarray, clip_x0: ClipFn | None = None) -> jnp.ndarray:
    """The deterministic (ODE) form of `sampler_step`: the map inversion undoes."""

  def inversion_step(self, model_eval: ModelEval, z: jnp.ndarray, t: jnp.ndarray,
                     t_next: jnp.ndarray) -> jnp.ndarray:
    """One step of the ODE run backwards, z_t → z_{t_next} (t_next > t)."""

OBJECTIVES = {"ddpm": ddpm.DDPM.from_config, "rflow": rflow.RectifiedFlow.from_config}


def build_objective(objective_config, latent_shape=None) -> Objective:
  """The objective named by `config.objective.name`, its options resolved against the
  registries (ConfigError naming the key for an unknown name or a condition between keys). The
  keys' own ranges are checked by the caller: `config_base.validate` or `make_objective`."""
  name = objective_config["name"]
  if name not in OBJECTIVES:
    raise ConfigError(f"config.objective.name={name!r}: expected one of {sorted(OBJECTIVES)}")
  return OBJECTIVES[name](objective_config, latent_shape)


def make_objective(objective_config, latent_shape=None) -> Objective:
  """Builds the objective named by `config.objective.name` from that section alone, checking
  its keys' ranges first (`config_ranges.check_section`); then `build_objective`.

  latent_shape: `(D, H, W, C)` of the diffused tensor (the rectified flow's resolution shift).
  """
  check_section(objective_settings(objective_config), "objective")
  return build_objective(objective_config, latent_shape)
